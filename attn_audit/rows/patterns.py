"""Kernel sparsity patterns: which keys each pattern keeps, and how much of each row's mass.

A kernel does not pick single keys per row: it computes whole ``block × block`` tiles
(``block`` = ``--block-size``, default 64; key block ``j // block``, query block ``i // block``)
or, for MInference's vertical-slash pattern, whole key columns and diagonals. The patterns, each
with a one-number **budget level** ``b = 0 .. nb`` (``nb = ceil(n / block)``; level ``nb``
keeps every key):

- ``row-topk`` (the oracle bound, not a kernel): the ``b·block`` largest probabilities of the
  row; its exact k_eps is the row kernel's (:mod:`attn_audit.rows.dispatch`).
- ``block-oracle``: the ``b`` key blocks holding the most of the row's own mass: the fewest
  blocks any block-sparse kernel could keep for that row (a bound for every per-query-block
  selection).
- ``block-topk``: the ``b`` key blocks a kernel selects for the row's query block from the input
  alone (FlexPrefill / XAttention style): the diagonal block first, then the key blocks by the
  mean-pooled score ``mean(q in query block) · mean(k in key block) · scale``
  (:func:`block_estimate_order`); key blocks after the query block (causal) last.
- ``streaming``: the sink block (key block 0, when ``sinks > 0``) plus a local window of ``b``
  key blocks ending at the row's own block (StreamingLLM / DuoAttention / MInference A-shape;
  non-causal: ``b`` blocks either side).
- ``vertical-slash``: MInference's estimate from the attention of the last 64 queries of the
  sequence: its column sums rank key columns, its diagonal sums rank offsets ``i - j``; the first
  30 columns and the 100 nearest diagonals come first, as MInference forces them
  (:func:`vertical_slash_order`). Level ``b`` keeps the top ``b·block`` columns and the top
  ``b·block`` diagonals.

:func:`pattern_rows` returns, for a block of measured query rows, the mass each pattern keeps at
every level and the smallest level reaching ``1 − eps``. The same selection functions build the
block masks of :mod:`attn_audit.apply`, so what the audit measures is what the applied model runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PATTERNS = ("row-topk", "block-oracle", "block-topk", "streaming", "vertical-slash")
DYNAMIC = ("block-topk", "vertical-slash")  # selected from the current input
VS_LAST_Q = 64  # MInference: queries whose attention ranks columns and diagonals
VS_FORCED_COLUMNS = 30  # MInference keeps the first 30 key columns whatever their score
VS_FORCED_DIAGONALS = 100  # ... and the 100 nearest diagonals


def num_blocks(n: int, block: int) -> int:
    """Blocks of ``block`` positions covering ``n`` positions (the last one may be partial)."""
    return -(-n // block)


def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of positions: (B, H, n, d) -> (B, H, nb, d) float32 (the last
    block averages only the positions it has)."""
    b, h, n, d = x.shape
    nb = num_blocks(n, block)
    pad = nb * block - n
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
    sums = xf.view(b, h, nb, block, d).sum(3)
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = block - pad
    return sums / counts[:, None]


def block_estimate_order(query: torch.Tensor, key: torch.Tensor, scaling: float, block: int,
                         causal: bool) -> torch.Tensor:
    """Per query block, the key blocks in the order the ``block-topk`` kernel takes them.

    query: (B, H, n_q, d); key: (B, Hkv, n_k, d) (query head h reads KV head h // (H / Hkv)).
    Returns int64 (B, H, nqb, nkb): ``order[..., qb, r]`` = the key block taken r-th by query
    block ``qb``. Diagonal block first, then by mean-pooled score; under ``causal`` the key
    blocks after ``qb`` come last (they hold no allowed key).
    """
    bsz, hq = query.shape[:2]
    groups = hq // key.shape[1]
    qp = _pool(query, block)  # (B, H, nqb, d)
    kp = _pool(key, block).repeat_interleave(groups, dim=1)  # (B, H, nkb, d)
    est = torch.matmul(qp, kp.transpose(-1, -2)) * scaling  # (B, H, nqb, nkb)
    nqb, nkb = est.shape[-2:]
    qb = torch.arange(nqb, device=est.device)[:, None]
    kb = torch.arange(nkb, device=est.device)[None, :]
    est = est.masked_fill(kb == qb, float("inf"))
    if causal:
        est = est.masked_fill(kb > qb, float("-inf"))
    # stable: ties (e.g. the -inf future blocks) keep ascending block order
    return torch.sort(est, dim=-1, descending=True, stable=True).indices


def vertical_slash_order(query: torch.Tensor, key: torch.Tensor, scaling: float,
                         allowed_last: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference's vertical and slash rankings from the last ``VS_LAST_Q`` queries.

    query: (B, H, n, d); key: (B, Hkv, n, d) (a plain prefill: query i is key position i).
    allowed_last: bool, broadcastable to (B, H, last, n): the model's mask for the last queries
        (default causal).
    Returns (columns, diagonals), int64 (B, H, n) each: key columns, and offsets ``i - j``, in
    the order the pattern takes them (forced ones first in position order, then by the summed
    attention of the last queries, stable).
    """
    bsz, hq, n, _ = query.shape
    groups = hq // key.shape[1]
    last = min(VS_LAST_Q, n)
    q = query[:, :, n - last:].float()
    k = key.float().repeat_interleave(groups, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (B, H, last, n)
    qi = torch.arange(n - last, n, device=s.device)[:, None]
    kj = torch.arange(n, device=s.device)[None, :]
    ok = (kj <= qi) if allowed_last is None else allowed_last.to(s.device).expand_as(s)
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)
    vertical = p.sum(-2)  # (B, H, n)
    offset = (qi - kj).clamp_min(0).expand(last, n)  # i - j; future keys carry 0 mass
    slash = torch.zeros(bsz, hq, n, device=s.device).scatter_add_(
        -1, offset.reshape(1, 1, -1).expand(bsz, hq, -1), p.reshape(bsz, hq, -1))
    idx = torch.arange(n, device=s.device)
    vertical = vertical.masked_fill(idx < VS_FORCED_COLUMNS, float("inf"))
    slash = slash.masked_fill(idx < VS_FORCED_DIAGONALS, float("inf"))
    cols = _order_forced_first(vertical, idx < VS_FORCED_COLUMNS)
    diags = _order_forced_first(slash, idx < VS_FORCED_DIAGONALS)
    return cols, diags


def _order_forced_first(score: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Indices by descending score, the forced ones (score inf) first in ascending index."""
    n = score.shape[-1]
    # the forced entries sort by -index (so ascending index), the rest by score; one sort
    key = torch.where(forced, 2.0 * n - torch.arange(n, device=score.device, dtype=torch.float64),
                      score.double().clamp(max=float(n)))
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


def rank_of(order: torch.Tensor) -> torch.Tensor:
    """Inverse permutation along the last dim: ``rank[..., order[..., r]] = r``."""
    r = torch.empty_like(order)
    r.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return r


@dataclass
class PatternRows:
    """Per measured row (leading shape (G, R)): ``kept[name]`` float64 (G, R, nb + 1), the mass
    the pattern keeps at each level 0..nb; ``need[name]`` int64 (G, R, E), the smallest level
    whose kept mass reaches ``1 − eps`` (``nb + 1`` if none: only by rounding)."""

    kept: dict[str, torch.Tensor]
    need: dict[str, torch.Tensor]


@dataclass
class LayerEstimates:
    """The input-dependent orders of one layer call (see :func:`layer_estimates`)."""

    block_order: torch.Tensor | None  # (B, H, nqb, nkb)
    vs_columns: torch.Tensor | None  # (B, H, n)
    vs_diagonals: torch.Tensor | None  # (B, H, n)


def layer_estimates(query: torch.Tensor, key: torch.Tensor, scaling: float, block: int, causal: bool,
                    patterns: tuple[str, ...], allowed_last: torch.Tensor | None = None) -> LayerEstimates:
    """The dynamic patterns' selections for one layer call (once per call, all rows share them)."""
    order = block_estimate_order(query, key, scaling, block, causal) if "block-topk" in patterns else None
    cols = diags = None
    if "vertical-slash" in patterns and query.shape[2] == key.shape[2]:
        cols, diags = vertical_slash_order(query, key, scaling, allowed_last)
    return LayerEstimates(order, cols, diags)


@torch.no_grad()
def pattern_rows(scores: torch.Tensor, q_pos: torch.Tensor, eps: tuple[float, ...], block: int,
                 sinks: int, causal: bool, patterns: tuple[str, ...], est: LayerEstimates,
                 batch: int, keys_total: int | None = None, mask_after: bool = False,
                 use_kernel: bool = True) -> PatternRows:
    """Each pattern's kept mass by level on the rows of one block of query rows.

    scores: (G, R, n) pre-softmax logits, disallowed keys -inf, ``G = batch · H`` (batch major);
        ``n`` may stop short of the sequence's ``keys_total`` keys (causal row blocks cut at
        their last row); levels always run over ``nb = ceil(keys_total / block)``.
    q_pos: int64 (R,) query positions; est: the layer's :func:`layer_estimates`.
    mask_after: keys after each row's position are disallowed whatever ``scores`` holds there.
    Probabilities are computed in float64 (the brute force of the tests does the same). On a
    CPU the compiled kernel of :mod:`attn_audit.rows.patterns_cpu` does the work (the same
    numbers to float64 rounding); elsewhere, or with ``use_kernel=False``, torch does.
    """
    g, r, n = scores.shape
    nb = num_blocks(keys_total or n, block)
    dev = scores.device
    if use_kernel and dev.type == "cpu":
        return _kernel_rows(scores, q_pos, eps, block, nb, sinks, causal, patterns, est, mask_after)
    x = scores.double()
    if mask_after:
        late = torch.arange(n, device=dev)[None, :] > q_pos.to(dev)[:, None]
        x = x.masked_fill(late, float("-inf"))
    p = torch.softmax(x, dim=-1).nan_to_num(0.0)  # (G, R, n)
    p = torch.nn.functional.pad(p, (0, nb * block - n))
    n = nb * block
    bm = p.view(g, r, nb, block).sum(-1)  # (G, R, nb)
    zero = torch.zeros(g, r, 1, dtype=p.dtype, device=dev)
    qb = (q_pos.to(dev) // block)  # (R,)
    kept: dict[str, torch.Tensor] = {}
    if "row-topk" in patterns:
        srt = torch.sort(p, dim=-1, descending=True).values.cumsum(-1)
        at = torch.arange(1, nb + 1, device=dev) * block - 1
        kept["row-topk"] = torch.cat([zero, srt[..., at]], -1)
    if "block-oracle" in patterns:
        kept["block-oracle"] = torch.cat([zero, torch.sort(bm, -1, descending=True).values.cumsum(-1)], -1)
    if "block-topk" in patterns and est.block_order is not None:
        order = est.block_order[:, :, qb.clamp(max=est.block_order.shape[2] - 1)]  # (B, H, R, nkb)
        order = order.reshape(g, r, -1)
        kept["block-topk"] = torch.cat([zero, torch.gather(bm, -1, order).cumsum(-1)], -1)
    if "streaming" in patterns:
        kept["streaming"] = _streaming_kept(bm, qb, sinks, causal)
    if "vertical-slash" in patterns and est.vs_columns is not None:
        kept["vertical-slash"] = _vs_kept(p, q_pos.to(dev), est, block, nb, batch)
    thresholds = torch.tensor([1.0 - e for e in eps], dtype=p.dtype, device=dev)
    need = {}
    for name, curve in kept.items():
        # smallest level with kept >= 1 - eps; the curves are non-decreasing in the level
        need[name] = (curve[..., None, :] < thresholds[:, None]).sum(-1)
    return PatternRows(kept, need)


def _kernel_rows(scores: torch.Tensor, q_pos: torch.Tensor, eps: tuple[float, ...], block: int, nb: int,
                 sinks: int, causal: bool, patterns: tuple[str, ...], est: LayerEstimates,
                 mask_after: bool) -> PatternRows:
    """:func:`pattern_rows` by the compiled CPU kernel (scores (G, R, n) on the CPU)."""
    from attn_audit.rows.patterns_cpu import pattern_kernel

    g, r, n = scores.shape
    x = scores.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # half / bfloat16 values are exact in float32
    x = x.reshape(g * r, n).contiguous().numpy()
    order = cols = diags = None
    if "block-topk" in patterns and est.block_order is not None:
        bo = est.block_order
        order = bo.reshape(g, bo.shape[2], bo.shape[3]).cpu().numpy()
        if order.shape[2] != nb:
            raise ValueError(f"block order has {order.shape[2]} key blocks, expected {nb}")
    if "vertical-slash" in patterns and est.vs_columns is not None:
        cols = rank_of(est.vs_columns).reshape(g, -1).cpu().numpy()
        diags = rank_of(est.vs_diagonals).reshape(g, -1).cpu().numpy()
    kept, need = pattern_kernel(x, q_pos.cpu().numpy(), r, eps, block, nb, sinks, causal, patterns,
                                mask_after, order, cols, diags, threads=torch.get_num_threads())
    return PatternRows({k: torch.from_numpy(v).view(g, r, -1) for k, v in kept.items()},
                       {k: torch.from_numpy(v).view(g, r, -1) for k, v in need.items()})


def _streaming_kept(bm: torch.Tensor, qb: torch.Tensor, sinks: int, causal: bool) -> torch.Tensor:
    """Kept mass (G, R, nb + 1) of sink block + window of w = 0..nb key blocks."""
    g, r, nb = bm.shape
    kb = torch.arange(nb, device=bm.device)
    dist = qb[:, None] - kb[None, :]  # (R, nb): how far back each key block lies
    if not causal:
        dist = dist.abs()
    # key blocks at distance d enter the window at w = d + 1 (future blocks under causal: never,
    # they carry no mass; put them at the end)
    enter = torch.where(dist >= 0, dist + 1, torch.full_like(dist, nb))
    by_w = torch.zeros(g, r, nb + 1, dtype=bm.dtype, device=bm.device)
    by_w.scatter_add_(-1, enter.clamp(max=nb).expand(g, r, nb), bm)
    curve = by_w.cumsum(-1)
    if sinks > 0:  # the sink block counts from w = 0 until the window reaches it
        w = torch.arange(nb + 1, device=bm.device)
        sink_out = (enter[:, 0][:, None] > w[None, :])  # (R, nb + 1)
        curve = curve + bm[..., :1] * sink_out
    return curve


def _vs_kept(p: torch.Tensor, q_pos: torch.Tensor, est: LayerEstimates, block: int, nb: int,
             batch: int) -> torch.Tensor:
    """Kept mass (G, R, nb + 1) of vertical-slash at levels b (top b·block columns and diagonals)."""
    n = est.vs_columns.shape[-1]  # the sequence's keys (p is zero-padded to whole blocks)
    g, r = p.shape[:2]
    p = p[..., :n]
    col_rank = rank_of(est.vs_columns)[..., :n].reshape(g, 1, -1)  # (G, 1, n)
    diag_rank = rank_of(est.vs_diagonals).reshape(g, -1)  # (G, n_all)
    off = (q_pos[:, None] - torch.arange(n, device=p.device)[None, :]).clamp_min(0)  # (R, n)
    dr = torch.gather(diag_rank[:, None, :].expand(g, r, diag_rank.shape[-1]), -1,
                      off.clamp(max=diag_rank.shape[-1] - 1).expand(g, r, n))
    level = (torch.minimum(col_rank.expand(g, r, n), dr) // block + 1).clamp(max=nb)  # (G, R, n)
    curve = torch.zeros(g, r, nb + 1, dtype=p.dtype, device=p.device).scatter_add_(-1, level, p)
    return curve.cumsum(-1)


def vs_budget(level: int, block: int) -> tuple[int, int]:
    """(vertical_size, slash_size) of vertical-slash level ``level``."""
    return level * block, level * block


__all__ = [
    "DYNAMIC", "PATTERNS", "LayerEstimates", "PatternRows", "block_estimate_order", "layer_estimates",
    "num_blocks", "pattern_rows", "rank_of", "vertical_slash_order", "vs_budget",
]
