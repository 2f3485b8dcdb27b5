"""Running per-layer, per-head totals of the measured rows' metrics for one sequence length:
the exact k_eps histogram, k_eps sums by position bin and by sequence (for the bootstrap),
tail masses, entropy / participation / sink / local / bulk sums and the largest |score|.

Used by :class:`attn_audit.capture.accumulate.Accumulator`, which feeds it each layer's
:class:`~attn_audit.rows.dispatch.RowMetrics`; fixed size whatever the number of rows folded in (a few
numbers per sequence for the bootstrap), checkpointed and merged as plain numpy arrays.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from attn_audit.rows.dispatch import RowMetrics

SUM_NAMES = ("entropy", "participation", "sink_mass", "local_mass", "bulk_mass")


class RowTotals:
    """Totals over every measured, valid row (batch, head, row) of a layer.

    A row counts when its query token is not padding, has at least ``min_keys`` allowed keys,
    and neither its Q, its sequence's K nor its scores hold NaN/inf (those rows are counted in
    ``nonfinite_rows`` instead).

    ``num_heads`` is the largest layer's; a layer with fewer heads (the number of heads read
    from ``m``) folds into its first ones, the others stay empty.
    """

    ADDED = ("pos_k", "pos_kfrac", "pos_rows", "seq_k", "seq_kfrac", "seq_ksink", "seq_rows", "tail",
             "nonfinite_rows")  # fmt: skip
    ARRAYS = (*ADDED, "max_abs_score")

    def __init__(self, num_layers: int, num_heads: int, seq_len: int, num_sequences: int,
                 num_eps: int, num_budgets: int, min_keys: int) -> None:  # fmt: skip
        L, H, E, B = num_layers, num_heads, num_eps, num_budgets
        self.H, self.E, self.B, self.seq_len, self.min_keys = H, E, B, seq_len, min_keys
        self.k_hist = torch.zeros(L, H, E, seq_len + 1, dtype=torch.int64)
        self.nbins = max(1, int(math.floor(math.log2(seq_len))) + 1)
        self.pos_k = np.zeros((L, H, E, self.nbins))
        self.pos_kfrac = np.zeros((L, H, E, self.nbins))
        self.pos_rows = np.zeros((L, H, self.nbins), dtype=np.int64)
        self.seq_k = np.zeros((num_sequences, L, H, E))
        self.seq_kfrac = np.zeros((num_sequences, L, H, E))
        self.seq_ksink = np.zeros((num_sequences, L, H, E))
        self.seq_rows = np.zeros((num_sequences, L, H), dtype=np.int64)
        self.tail = np.zeros((L, H, B))
        self.sums = {name: np.zeros((L, H)) for name in SUM_NAMES}
        self.max_abs_score = np.full((L, H), -np.inf)
        self.nonfinite_rows = np.zeros((L, H), dtype=np.int64)

    def valid_rows(self, m: RowMetrics, blk: torch.Tensor, mask: torch.Tensor, q_bad: torch.Tensor,
                   seq_bad: torch.Tensor) -> torch.Tensor:
        """Bool (batch, head, R): the rows :meth:`fold` counts (same rule, for other totals
        folded beside these, e.g. :class:`attn_audit.capture.pattern_totals.PatternTotals`)."""
        b, R = mask.shape[0], len(blk)
        n = m.n_keys.view(b, -1, R)
        H = n.shape[1]
        ok_q = mask[:, blk][:, None, :] & ~q_bad[:, :, blk] & ~seq_bad[:, :, None]
        finite = torch.isfinite(m.max_abs_score.view(b, H, R)) & torch.isfinite(m.entropy.view(b, H, R))
        return mask[:, blk][:, None, :] & (n >= max(self.min_keys, 1)) & ok_q & finite

    def fold(self, layer: int, m: RowMetrics, blk: torch.Tensor, mask: torch.Tensor, q_bad: torch.Tensor,
             seq_bad: torch.Tensor, seq_start: int) -> torch.Tensor:  # fmt: skip
        """Add the row metrics ``m`` (fields (batch·head, R, ...)) of query rows ``blk`` (R,) of
        sequences ``seq_start ..``; ``mask`` (batch, pos) is the padding mask, ``q_bad``
        (batch, head, pos) and ``seq_bad`` (batch, head) flag non-finite Q / K.

        Returns per-row features (batch, head, R, F) for the row reservoir.
        """
        E = self.E
        b = mask.shape[0]
        R = len(blk)
        n = m.n_keys.view(b, -1, R)
        H = n.shape[1]  # this layer's heads (<= self.H)
        k_eps = m.k_eps.view(b, H, R, E)
        ok_q = mask[:, blk][:, None, :] & ~q_bad[:, :, blk] & ~seq_bad[:, :, None]
        finite = torch.isfinite(m.max_abs_score.view(b, H, R)) & torch.isfinite(m.entropy.view(b, H, R))
        allowed = mask[:, blk][:, None, :] & (n >= max(self.min_keys, 1))
        valid = allowed & ok_q & finite
        self.nonfinite_rows[layer, :H] += (allowed & ~(ok_q & finite)).sum(dim=(0, 2)).cpu().numpy()
        vf = valid.double()
        nd = n.double().clamp(min=1)
        kfrac = k_eps.double() / nd[..., None]
        # exact distribution of k_eps: histogram over integers 0..seq_len
        kk = k_eps.clamp(0, self.seq_len).long()
        h_idx = torch.arange(H, device=kk.device).view(1, H, 1, 1)
        e_idx = torch.arange(E, device=kk.device).view(1, 1, 1, E)
        flat = ((h_idx * E + e_idx) * (self.seq_len + 1) + kk)[valid]
        self.k_hist[layer, :H] += torch.bincount(flat.flatten(), minlength=H * E * (self.seq_len + 1)).view(
            H, E, self.seq_len + 1
        ).cpu()
        vE = vf[..., None]
        sl = slice(seq_start, seq_start + b)
        self.seq_k[sl, layer, :H] += (k_eps.double() * vE).sum(2).cpu().numpy()
        self.seq_kfrac[sl, layer, :H] += (kfrac * vE).sum(2).cpu().numpy()
        self.seq_ksink[sl, layer, :H] += (m.k_eps_sinks.view(b, H, R, E).double() * vE).sum(2).cpu().numpy()
        self.seq_rows[sl, layer, :H] += valid.sum(2).cpu().numpy()
        # by position: log2 bins of n_i
        pbin = torch.floor(torch.log2(nd)).long().clamp(0, self.nbins - 1)  # (b, H, R)
        hb = (torch.arange(H, device=pbin.device).view(1, H, 1) * self.nbins + pbin)[valid]  # valid rows
        self.pos_rows[layer, :H] += torch.bincount(hb, minlength=H * self.nbins).view(H, self.nbins).cpu().numpy()
        heb = (hb[:, None] // self.nbins * E + e_idx.view(1, E)) * self.nbins + (hb % self.nbins)[:, None]
        for acc, val in ((self.pos_k, k_eps.double()[valid]), (self.pos_kfrac, kfrac[valid])):
            acc[layer, :H] += torch.bincount(heb.flatten(), weights=val.flatten(),
                                         minlength=H * E * self.nbins).view(H, E, self.nbins).cpu().numpy()
        nb = self.B
        tail = m.tail_mass.view(b, H, R, nb).double().nan_to_num(0.0)
        self.tail[layer, :H] += (tail * vf[..., None]).sum(dim=(0, 2)).cpu().numpy()
        for name in self.sums:
            val = getattr(m, name).view(b, H, R).double().nan_to_num(0.0)
            self.sums[name][layer, :H] += (val * vf).sum(dim=(0, 2)).cpu().numpy()
        mx = m.max_abs_score.view(b, H, R).double().masked_fill(~valid, -math.inf).amax(dim=(0, 2))
        self.max_abs_score[layer, :H] = np.maximum(self.max_abs_score[layer, :H], mx.cpu().numpy())
        feats = torch.stack(
            [
                n.double(),
                m.bulk_std.view(b, H, R).double(),
                m.bulk_mass.view(b, H, R).double(),
                m.sink_mass.view(b, H, R).double(),
                valid.double(),
                *[k_eps[..., e].double() for e in range(E)],
            ],
            dim=-1,
        )
        return feats

    def state(self) -> dict[str, np.ndarray]:
        """The totals as plain numpy arrays (checkpoint keys)."""
        st: dict[str, np.ndarray] = {name: getattr(self, name) for name in self.ARRAYS}
        st["k_hist"] = self.k_hist.numpy()
        for name, arr in self.sums.items():
            st[f"sums.{name}"] = arr
        return st

    def load_state(self, st: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state`."""
        for name in self.ARRAYS:
            getattr(self, name)[...] = st[name]
        self.k_hist = torch.from_numpy(np.array(st["k_hist"]))
        for name in self.sums:
            self.sums[name][...] = st[f"sums.{name}"]

    def merge_state(self, other: dict[str, np.ndarray]) -> None:
        """Add another process's :meth:`state` (disjoint sequences): counts and sums add, the
        largest |score| takes the max."""
        for name in self.ADDED:
            getattr(self, name)[...] += other[name]
        self.max_abs_score[...] = np.maximum(self.max_abs_score, other["max_abs_score"])
        self.k_hist += torch.from_numpy(np.array(other["k_hist"]))
        for name in self.sums:
            self.sums[name] += other[f"sums.{name}"]
