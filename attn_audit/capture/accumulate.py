"""Streaming per-head reducers: every batch is folded into fixed-size state, then dropped.

Memory does not grow with the number of sequences except for a few numbers per sequence (used
for bootstrap intervals). The per-row work (scores of one block of query rows, exact k_eps via
:mod:`attn_audit.rows.dispatch`) stays on the model's device; only small aggregates and the bounded
reservoir samples move to the CPU.

The row metrics go into running totals (:mod:`attn_audit.capture.totals`); Q/K vectors (for
Gaussianity) and per-row features (for the theory comparison) are kept in bounded,
deterministic, mergeable samples (:mod:`attn_audit.capture.reservoir`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attn_audit.capture.interface import (
    AttentionCall,
    allowed_mask,
    scores,
    sink_column,
)
from attn_audit.capture.pattern_totals import PatternTotals
from attn_audit.capture.reservoir import Reservoir, priorities
from attn_audit.capture.totals import RowTotals
from attn_audit.config import MeasureSpec
from attn_audit.errors import CaptureError
from attn_audit.rows.dispatch import RowMetrics, row_metrics

PATTERN_CHUNK_ELEMS = 1 << 22  # scores elements per step of the pattern measurement (float64 copies)


@dataclass(frozen=True)
class AccumulateConfig:
    """What to measure (``measure``) and how the samples for the statistics are drawn."""

    measure: MeasureSpec = MeasureSpec()
    seed: int = 0
    reservoir_size: int = 2048
    row_reservoir_size: int = 512
    thin: int = 4  # take every m-th position into the Q/K reservoir (less autocorrelation)
    block_elements: int = 1 << 24  # max scores elements per block (float32)
    causal_block_rows: int = 256  # row block size for causal models


class Accumulator:
    """Per-layer, per-head running aggregates for one sequence length.

    Call :meth:`begin_batch` before each forward pass and let :mod:`attn_audit.capture.interface` deliver
    each layer's :class:`AttentionCall` to ``self``; :meth:`summary` returns numpy aggregates.

    The geometry is per layer: ``info["layer_heads"]`` (when the heads or head size vary between
    layers, as :func:`attn_audit.capture.loop.probe_sites` reads them from the calls) lists each
    site's (heads, kv heads, d_qk); ``num_heads`` / ``num_kv_heads`` are then the largest. The
    (layer, head) arrays are sized by the largest; a layer with fewer heads fills its first ones
    and the rest stay empty (no rows; :mod:`attn_audit.assemble` emits no record for them).
    """

    def __init__(self, info: dict[str, Any], seq_len: int, num_sequences: int, cfg: AccumulateConfig) -> None:
        self.cfg = cfg
        self.seq_len = seq_len
        self.L, self.H, self.Hkv = info["num_layers"], info["num_heads"], info["num_kv_heads"]
        self.geometry = layer_geometry(info)  # per site: (heads, kv heads, d_qk)
        self.causal = bool(info["causal"])
        self.spec = cfg.measure
        E, B = len(self.spec.eps), len(self.spec.budgets)
        L, H = self.L, self.H
        self.totals = RowTotals(L, H, seq_len, num_sequences, E, B, self.spec.min_keys)
        # kernel-pattern coverage on the same rows (attn_audit.rows.patterns); None: not measured
        self.patterns = PatternTotals(L, H, seq_len, self.spec) if self.spec.patterns else None
        self.max_q_norm = np.zeros((L, H))
        self.max_k_norm = np.zeros((L, self.Hkv))
        self.scale = np.zeros(L)
        self.head_dim = int(info["head_dim"])
        # attention-input norms ||x|| (after the pre-norm): running max and a log-spaced histogram
        self.x_norm_edges = torch.logspace(-3, 5, 1025, dtype=torch.float64)
        self.x_norm_hist = np.zeros((L, 1026), dtype=np.int64)
        self.x_norm_max = np.zeros(L)
        self.tokens = Reservoir(cfg.reservoir_size)
        self.rows = Reservoir(cfg.row_reservoir_size)
        self.layers_seen: set[int] = set()
        self.row_logits: dict[int, torch.Tensor] = {}
        self._rng = np.random.default_rng(cfg.seed)
        self._row_index = self._choose_rows()
        self._buffers: dict[str, torch.Tensor] = {}
        self._sanitised_call = False

    # -- batch set-up ------------------------------------------------------------------------
    def _choose_rows(self) -> torch.Tensor:
        """Query positions measured in every sequence (all, or a seeded sample of eligible rows)."""
        first = self.spec.min_keys - 1 if self.causal else 0
        eligible = np.arange(max(first, 0), self.seq_len)
        n = self.spec.rows_per_sequence
        if n is None or n >= len(eligible):
            return torch.from_numpy(np.arange(self.seq_len))
        chosen = np.sort(self._rng.choice(eligible, size=n, replace=False))
        return torch.from_numpy(chosen)

    @property
    def sampled(self) -> bool:
        return len(self._row_index) < self.seq_len

    def begin_batch(self, seq_start: int, attention_mask: torch.Tensor) -> None:
        """Record the batch's padding mask (batch, pos) and plan the reservoir updates."""
        self.seq_start = seq_start
        self.mask = attention_mask.bool()
        b, s = self.mask.shape
        rows = self._row_index[self._row_index < s]
        self.batch_rows = rows
        valid = self.mask.cpu().numpy()
        # Q/K token reservoir: thinned positions, sinks excluded (reported apart).
        pos = np.arange(s)[None, :]
        tok_ok = valid & (pos >= self.spec.sinks) & (pos % self.cfg.thin == 0)
        bi, pi = np.nonzero(tok_ok)
        self._tok_sel = (torch.from_numpy(bi), torch.from_numpy(pi))
        self.tokens.plan(priorities(self.cfg.seed, bi + seq_start, pi, salt=1), np.stack([bi + seq_start, pi], 1))
        # row-feature reservoir: measured rows with enough keys
        r = rows.numpy()
        row_ok = valid[:, r]
        bi2, ri2 = np.nonzero(row_ok)
        self._row_sel = (torch.from_numpy(bi2), torch.from_numpy(ri2))
        self.rows.plan(priorities(self.cfg.seed, bi2 + seq_start, r[ri2], salt=2),
                       np.stack([bi2 + seq_start, r[ri2]], 1))

    # -- projection hooks (pre-RoPE sites, attention input) -----------------------------------
    def on_projection(self, layer: int, site: str, t: torch.Tensor) -> None:
        """Fold a projection hook's tensor: "x" (batch, pos, hidden), "q_pre"/"k_pre"
        (batch, pos, heads·d_head)."""
        mask = self.mask.to(t.device)
        if site == "x":
            norms = t.float().norm(dim=-1)[mask].double().cpu()
            norms = norms[torch.isfinite(norms)]
            if norms.numel():
                self.x_norm_max[layer] = max(self.x_norm_max[layer], float(norms.max()))
                idx = torch.bucketize(norms, self.x_norm_edges)
                self.x_norm_hist[layer] += torch.bincount(idx, minlength=1026).numpy()
            return
        b, s_len, width = t.shape
        d = self.geometry[layer][2]
        bi, pi = self._tok_sel
        self.tokens.update((layer, site), t.view(b, s_len, width // d, d)[bi, pi])

    def x_norm_quantile(self, layer: int, q: float) -> float | None:
        """Upper edge of the histogram bin holding the q-quantile of ||x|| (conservative)."""
        hist = self.x_norm_hist[layer]
        total = hist.sum()
        if total == 0:
            return None
        idx = int(np.searchsorted(np.cumsum(hist), q * total))
        edges = self.x_norm_edges.numpy()
        return float(min(edges[min(idx, len(edges) - 1)], self.x_norm_max[layer]))

    # -- the consumer ------------------------------------------------------------------------
    def __call__(self, call: AttentionCall) -> torch.Tensor | None:
        """Fold one layer's attention call into the aggregates.

        Returns the layer's attention output (batch, pos, head, d_head) when it was computed
        from the measured weights (see ``_can_fuse``), else None (the model's kernel runs).
        """
        layer = call.layer
        got = (call.query.shape[1], call.key.shape[1])
        want = self.geometry[layer][:2] if layer < self.L else None
        if want is None or got != want or (call.probs is None and call.query.shape[-1] != self.geometry[layer][2]):
            raise CaptureError(
                f"attention call {layer} has {got[0]} query / {got[1]} key heads (d_qk {call.query.shape[-1]}); the "
                f"model info says {self.L} sites, this one {want} (d_qk {self.geometry[layer][2] if want else '-'})"
            )
        H = got[0]
        self.layers_seen.add(layer)
        self.scale[layer] = call.scaling
        if call.probs is not None:  # eager-probabilities fallback: no Q/K to measure or sample
            return self._fold_probs(call)
        q, k = call.query, call.key
        mask = self.mask.to(q.device)
        # non-finite tokens (fp16 overflow, broken weights): count, zero, and drop their rows
        # (a token's norm is non-finite iff one of its coordinates is, or |x| > 1e19 overflows
        # float32 squares: such a token is broken either way)
        qn = q.float().norm(dim=-1)  # (batch, head, pos)
        kn = k.float().norm(dim=-1)
        q_bad = ~torch.isfinite(qn)
        k_bad = ~torch.isfinite(kn) & mask[:, None, :]
        self._sanitised_call = bool(q_bad.any()) or bool(k_bad.any())
        if self._sanitised_call:
            call = _sanitised(call)
            q, k = call.query, call.key
            qn = q.float().norm(dim=-1)
            kn = k.float().norm(dim=-1)
        qn = qn.masked_fill(~mask[:, None, :], 0)
        kn = kn.masked_fill(~mask[:, None, :], 0)
        Hkv = got[1]
        self.max_q_norm[layer, :H] = np.maximum(self.max_q_norm[layer, :H], qn.amax(dim=(0, 2)).cpu().numpy())
        self.max_k_norm[layer, :Hkv] = np.maximum(self.max_k_norm[layer, :Hkv], kn.amax(dim=(0, 2)).cpu().numpy())
        bi, pi = self._tok_sel
        self.tokens.update((layer, "q"), q[bi, :, pi])
        self.tokens.update((layer, "k"), k[bi, :, pi])
        seq_bad = k_bad.any(-1).repeat_interleave(H // Hkv, dim=1)  # (batch, head)
        rows = self.batch_rows.to(q.device)
        self._bad = (q_bad, seq_bad)
        m, out = self._measure(call, rows, mask)
        feats = self.totals.fold(layer, m, rows, mask, q_bad, seq_bad, self.seq_start)
        self.rows.update(layer, feats[self._row_sel[0], :, self._row_sel[1]])
        if out is None:
            return None
        return out.transpose(1, 2).to(call.query.dtype).contiguous()  # (batch, pos, head, d_head)

    def _fold_probs(self, call: AttentionCall) -> None:
        """Fold a fallback call (the model's eager probabilities): the row metrics of its
        log-probabilities (the same softmax); Q/K norms stay NaN (unknown), no Q/K samples."""
        mask = self.mask.to(call.probs.device)
        self.max_q_norm[call.layer] = np.nan
        self.max_k_norm[call.layer] = np.nan
        none = torch.zeros(mask.shape[0], call.probs.shape[1], mask.shape[1], dtype=torch.bool, device=mask.device)
        rows = self.batch_rows.to(mask.device)
        self._bad = (none, none[:, :, 0])
        m, _ = self._measure(call, rows, mask)
        feats = self.totals.fold(call.layer, m, rows, mask, none, none[:, :, 0], self.seq_start)
        self.rows.update(call.layer, feats[self._row_sel[0], :, self._row_sel[1]])
        return None

    def _measure(self, call: AttentionCall, rows: torch.Tensor,
                 mask: torch.Tensor) -> tuple[RowMetrics, torch.Tensor | None]:
        """Row metrics of the query rows ``rows`` (R,), block by block of rows, fields (G, R);
        and the layer's output (batch, head, pos, d_head) when it is computed here (see
        ``_can_fuse``), else None."""
        q, layer = call.query, call.layer
        b, keys_total = q.shape[0], call.key.shape[2]
        H, Hkv = self.geometry[layer][:2]  # this layer's heads
        groups = H // Hkv
        step = max(1, self.cfg.block_elements // max(b * H * keys_total, 1))
        causal = call.is_causal and _mask_is_causal(call)
        if causal:
            # causal rows only see keys up to their own position: small row blocks with keys cut
            # at the block's last row skip most of the masked upper triangle (~45% of the work)
            step = min(step, self.cfg.causal_block_rows)
        # Every query row measured on CPU: the kernel also writes the attention weights, and this
        # call returns the layer's output (weights @ V, eager attention's own formula) in place of
        # the model's sdpa, which would compute Q K^T a second time.
        if not call.plain:
            return self._measure_with_sink(call, rows), None
        fuse = self._can_fuse(call, rows)
        # plain causal attention without padding: the kernel applies "key <= query" itself and
        # the scores need no -inf written into them
        causal_only = (causal and not call.sliding_window and q.shape[2] == keys_total
                       and bool(mask.all()))
        out = torch.empty(b, H, q.shape[2], call.value.shape[-1]) if fuse else None  # d_v may differ
        on_cpu = q.device.type == "cpu"  # (a GPU's caching allocator makes fresh blocks cheap)
        parts = []
        est = self._pattern_estimates(call, mask)
        for start in range(0, len(rows), step):
            blk = rows[start : start + step]
            n_keys = int(blk.max()) + 1 if causal else keys_total
            s = scores(call, blk, n_keys, masked=not causal_only,  # (batch, head, R, keys)
                       out=self._buffer("scores", (b, H, len(blk), n_keys)) if on_cpu else None)
            w = self._buffer("weights", s.shape) if fuse else None
            m = row_metrics(s.reshape(b * H, len(blk), n_keys), blk, self.spec, causal=causal_only,
                            weights_out=None if w is None else w.view(b * H, len(blk), n_keys))
            parts.append(m)
            if est is not None:
                self._fold_patterns(call, s, blk, m, mask, est, causal_only)
            if start + step >= len(rows):
                self._sample_row_logits(layer, s[:, :, -1], int(blk[-1]), mask)
            del s
            if out is not None and w is not None:
                r = len(blk)
                v = call.value[:, :, :n_keys].float()  # (batch, kv_head, keys, d_head)
                o = torch.matmul(w.view(b, Hkv, groups * r, n_keys), v).view(b, H, r, -1)
                # mass >= 1 on rows with an allowed key (their max weight is exp(0)); 0 rows stay 0
                out[:, :, start : start + r] = o / m.mass.view(b, H, r, 1).clamp_min(1.0).float()
        # one fold per layer call: the per-row metrics of all blocks side by side (G, rows, ...)
        m = parts[0] if len(parts) == 1 else RowMetrics(**{
            f: torch.cat([getattr(p, f) for p in parts], dim=1) for f in parts[0].to_dict()})
        return m, out

    def _pattern_estimates(self, call: AttentionCall, mask: torch.Tensor) -> Any:
        """The layer call's dynamic selections (block-topk order, vertical-slash ranks), or None
        when no pattern is measured (or the call is the eager-probabilities fallback: no Q/K to
        estimate blocks from)."""
        if self.patterns is None or call.probs is not None:
            return None
        from attn_audit.rows.patterns import VS_LAST_Q, layer_estimates

        n = call.query.shape[2]
        last = torch.arange(max(n - VS_LAST_Q, 0), n, device=call.query.device)
        allowed_last = None
        if call.query.shape[2] == call.key.shape[2]:
            allowed_last = allowed_mask(call, last) & mask[:, None, None, :]
        pats = self.spec.patterns if call.is_causal else tuple(p for p in self.spec.patterns if p != "vertical-slash")
        return layer_estimates(call.query, call.key, call.scaling, self.spec.block_size, call.is_causal,
                               pats, allowed_last)

    def _fold_patterns(self, call: AttentionCall, s: torch.Tensor, blk: torch.Tensor, m: RowMetrics,
                       mask: torch.Tensor, est: Any, causal_only: bool) -> None:
        """Fold the patterns' coverage of the row block ``blk`` (scores ``s``: (batch, head, R, keys))."""
        from attn_audit.rows.patterns import pattern_rows

        assert self.patterns is not None
        b, h, r, n = s.shape
        q_bad, seq_bad = self._bad
        valid = self.totals.valid_rows(m, blk, mask, q_bad, seq_bad)
        flat = s.reshape(b * h, r, n)
        step = max(1, PATTERN_CHUNK_ELEMS // max(b * h * n, 1))  # bounded float64 work copies
        for r0 in range(0, r, step):
            pr = pattern_rows(flat[:, r0:r0 + step], blk[r0:r0 + step], self.spec.eps, self.spec.block_size,
                              self.spec.sinks, call.is_causal, self.spec.patterns, est, b,
                              keys_total=call.key.shape[2], mask_after=causal_only)
            self.patterns.fold(call.layer, pr, valid[:, :, r0:r0 + step])

    def _measure_with_sink(self, call: AttentionCall, rows: torch.Tensor) -> RowMetrics:
        """Row metrics when a sink logit takes mass without being a key (gpt-oss ``s_aux``).

        The sink becomes column 0 of each row (keys shift to 1..n, query positions with them, so
        the causal, local-window and sink positions keep their meaning). It is a per-row constant,
        kept at no cost: ``k_eps`` is the number of keys that, with the sink, reach 1 - eps (the
        kernels' sink-forced count with the sink column as the only forced one, less that column);
        ``k_eps_sinks`` also forces the first ``sinks`` keys. ``sink_mass`` includes the sink's
        share; ``n_keys`` counts keys only.
        """
        from dataclasses import replace

        b, keys_total = call.query.shape[0], call.key.shape[2]
        H = call.query.shape[1]
        step = max(1, self.cfg.block_elements // max(b * H * (keys_total + 1), 1))
        parts = []
        for start in range(0, len(rows), step):
            blk = rows[start : start + step]
            s = scores(call, blk, keys_total)  # (batch, head, R, keys), -inf where not allowed
            if start + step >= len(rows):
                self._sample_row_logits(call.layer, s[:, :, -1], int(blk[-1]), self.mask.to(s.device))
            aug = torch.cat([sink_column(call, s, blk), s], dim=-1).reshape(b * H, len(blk), keys_total + 1)
            alone = row_metrics(aug, blk + 1, replace(self.spec, sinks=1))
            m = row_metrics(aug, blk + 1, replace(self.spec, sinks=self.spec.sinks + 1))
            m.n_keys = (m.n_keys - 1).clamp_min(0)
            m.k_eps = (alone.k_eps_sinks - 1).clamp_min(0)
            m.k_eps_sinks = (m.k_eps_sinks - 1).clamp_min(0)
            parts.append(m)
        if len(parts) == 1:
            return parts[0]
        return RowMetrics(**{f: torch.cat([getattr(p, f) for p in parts], dim=1) for f in parts[0].to_dict()
                             if getattr(parts[0], f) is not None})

    def _can_fuse(self, call: AttentionCall, rows: torch.Tensor) -> bool:
        """Whether this call's output can come from the measured weights: every query row is
        measured, on CPU (the compiled kernel), without a KV cache, and no earlier consumer
        changed Q or K (non-finite tokens are zeroed for the statistics only)."""
        s_len = call.query.shape[2]
        return (
            call.probs is None
            and call.query.device.type == "cpu"
            and len(rows) == s_len == call.key.shape[2]
            and bool((rows == torch.arange(s_len)).all())
            and not self._sanitised_call
        )

    def _buffer(self, name: str, shape: torch.Size) -> torch.Tensor:
        """A reused float32 scratch tensor of ``shape`` (fresh large allocations page-fault)."""
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=torch.float32)
            self._buffers[name] = buf
        return buf[:numel].view(shape)

    ROW_LOGITS_PER_ROW = 64
    ROW_LOGITS_CAP = 4096

    def _sample_row_logits(self, layer: int, last: torch.Tensor, pos: int, mask: torch.Tensor) -> None:
        """Keep standardized bulk logits (sinks and the local window left out) of one row per
        sequence, up to ``ROW_LOGITS_CAP`` values per head (docs/methods.md §4.1).

        Args:
            last: (batch, head, keys) scores of the row at position ``pos``.
        """
        have = self.row_logits.get(layer)
        if have is not None and have.shape[1] >= self.ROW_LOGITS_CAP:
            return
        keys = torch.arange(last.shape[-1], device=last.device)
        bulk = (keys >= self.spec.sinks) & ~((keys > pos - self.spec.window) & (keys <= pos))
        vals = last[..., bulk]  # (batch, head, n_bulk)
        ok = mask[:, pos] & torch.isfinite(vals).all(-1).all(-1)
        vals = vals[ok]
        if vals.shape[0] == 0 or vals.shape[-1] < 8:
            return
        vals = (vals - vals.mean(-1, keepdim=True)) / vals.std(-1, keepdim=True).clamp_min(1e-12)
        gen = torch.Generator().manual_seed(int(priorities(self.cfg.seed, np.array([self.seq_start]), np.array([layer]), 3)[0] * 2**31))
        pick = torch.randperm(vals.shape[-1], generator=gen)[: self.ROW_LOGITS_PER_ROW].to(vals.device)
        chunk = vals[..., pick].transpose(0, 1).reshape(last.shape[1], -1).cpu().float()  # (head, values)
        merged = chunk if have is None else torch.cat([have, chunk], dim=1)
        self.row_logits[layer] = merged[:, : self.ROW_LOGITS_CAP]

    # -- checkpoints ----------------------------------------------------------------------------
    _ARRAYS = ("max_q_norm", "max_k_norm", "scale", "x_norm_hist", "x_norm_max")

    def state(self) -> dict[str, np.ndarray]:
        """Everything needed to continue later, as plain numpy arrays (saved with np.savez)."""
        st: dict[str, np.ndarray] = {name: getattr(self, name) for name in self._ARRAYS}
        st.update(self.totals.state())
        if self.patterns is not None:
            st.update(self.patterns.state())
        st["layers_seen"] = np.array(sorted(self.layers_seen), dtype=np.int64)
        for layer, t in self.row_logits.items():
            st[f"row_logits.{layer}"] = t.numpy()
        st.update(self.tokens.to_state("tokens"))
        st.update(self.rows.to_state("rows"))
        return st

    def load_state(self, st: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state` (from the same configuration)."""
        for name in self._ARRAYS:
            getattr(self, name)[...] = st[name]
        self.totals.load_state(st)
        if self.patterns is not None:
            self.patterns.load_state(st)
        self.layers_seen = set(int(x) for x in st["layers_seen"])
        self.row_logits = {int(k.split(".")[1]): torch.from_numpy(np.array(v))
                           for k, v in st.items() if k.startswith("row_logits.")}
        self.tokens.load_state("tokens", st)
        self.rows.load_state("rows", st)

    def merge_state(self, other: dict[str, np.ndarray]) -> None:
        """Fold another process's :meth:`state` (disjoint sequences of the same run) into this one.

        Counts, sums and histograms add, maxima take the max, reservoirs keep the smallest
        priorities of the union (so the sample equals the one a single process would keep).
        """
        self.totals.merge_state(other)
        if self.patterns is not None:
            self.patterns.merge_state(other)
        self.x_norm_hist += other["x_norm_hist"]
        for name in ("max_q_norm", "max_k_norm", "scale", "x_norm_max"):
            arr = getattr(self, name)
            arr[...] = np.maximum(arr, other[name])
        self.layers_seen |= set(int(x) for x in other["layers_seen"])
        for k, v in other.items():  # ranks hold consecutive sequence blocks: append in rank order
            if k.startswith("row_logits."):
                layer = int(k.split(".")[1])
                t = torch.from_numpy(np.array(v))
                have = self.row_logits.get(layer)
                both = t if have is None else torch.cat([have, t], dim=1)
                self.row_logits[layer] = both[:, : self.ROW_LOGITS_CAP]
        self.tokens.merge_state("tokens", other)
        self.rows.merge_state("rows", other)

    # -- results -------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Plain numpy aggregates (no torch) for :mod:`attn_audit.assemble.sparsity` and the pipeline."""
        tokens, row_data = self.tokens.data, self.rows.data  # each gathers its items once
        samples_q = {l: tokens[(l, "q")].numpy() for l in range(self.L) if (l, "q") in tokens}
        samples_k = {l: tokens[(l, "k")].numpy() for l in range(self.L) if (l, "k") in tokens}
        pre = {
            site: {l: tokens[(l, site)].numpy() for l in range(self.L) if (l, site) in tokens}
            for site in ("q_pre", "k_pre")
        }
        rows = {l: row_data[l].numpy() for l in range(self.L) if l in row_data}
        t = self.totals
        return {
            "seq_len": self.seq_len,
            "k_hist": t.k_hist.numpy(),
            "pos_k": t.pos_k,
            "pos_kfrac": t.pos_kfrac,
            "pos_rows": t.pos_rows,
            "seq_k": t.seq_k,
            "seq_kfrac": t.seq_kfrac,
            "seq_ksink": t.seq_ksink,
            "seq_rows": t.seq_rows,
            "tail": t.tail,
            "sums": t.sums,
            "max_abs_score": t.max_abs_score,
            "max_q_norm": self.max_q_norm,
            "max_k_norm": self.max_k_norm,
            "scale": self.scale,
            "nonfinite_rows": t.nonfinite_rows,
            "samples_q": samples_q,
            "samples_k": samples_k,
            "samples_q_pre": pre["q_pre"],
            "samples_k_pre": pre["k_pre"],
            "x_norm_max": self.x_norm_max.copy(),
            "x_norm_p999": np.array([self.x_norm_quantile(l, 0.999) or np.nan for l in range(self.L)]),
            "row_features": rows,
            "row_logits": {l: t.numpy() for l, t in self.row_logits.items()},
            "row_feature_names": ["n_keys", "bulk_std", "bulk_mass", "sink_mass", "valid"]
            + [f"k_eps[{i}]" for i in range(len(self.spec.eps))],
            "rows_sampled": self.sampled,
            "rows_per_sequence": len(self._row_index) if self.sampled else None,
            "layers_seen": sorted(self.layers_seen),
            "patterns": None if self.patterns is None else self.patterns.summary(),
        }


def layer_geometry(info: dict[str, Any]) -> list[tuple[int, int, int]]:
    """Each attention site's (heads, kv heads, d_qk): ``info["layer_heads"]`` where the heads or
    the head size vary between layers, else the model's one geometry for every site."""
    per_layer = info.get("layer_heads")
    if per_layer:
        return [(int(h), int(kv), int(d)) for h, kv, d in per_layer]
    return [(int(info["num_heads"]), int(info["num_kv_heads"]), int(info["head_dim"]))] * int(info["num_layers"])


def _mask_is_causal(call: AttentionCall) -> bool:
    """Whether no query row may see a later key (the mask, if any, agrees with ``is_causal``;
    a module marked causal can still be handed a bidirectional mask)."""
    q_len, k_len = call.query.shape[2], call.key.shape[2]
    if call.attention_mask is None:
        return q_len == k_len
    if q_len != k_len:
        return False
    later = torch.ones(q_len, k_len, dtype=torch.bool, device=call.query.device).triu_(1)
    return not bool((allowed_mask(call) & later).any())


def _sanitised(call: AttentionCall) -> AttentionCall:
    """A copy of ``call`` with non-finite Q/K entries zeroed (their rows are dropped anyway)."""
    from dataclasses import replace

    return replace(
        call,
        query=torch.nan_to_num(call.query, nan=0.0, posinf=0.0, neginf=0.0),
        key=torch.nan_to_num(call.key, nan=0.0, posinf=0.0, neginf=0.0),
    )
