"""Vectorised torch kernel of :func:`attn_audit.rows.dispatch.row_metrics` (any torch device).

Algorithm (no row is sorted)
----------------------------
Rows are processed query-major (every head of a query together) in blocks, and streamed in
cache-sized chunks; masked trailing key columns (causal) are skipped.

1. Stream: ``d = s - max`` exactly (float64), masses ``e = exp(d)`` in float64, row sums
   (total mass, sum e^2, sum e d, moments of d), and a histogram of every row over ``nb``
   (about n/4) bins ``floor(-d / w)``: the width ``w`` spreads the row's own logit range
   (capped at ``ln n + 16`` nats) over the bins; masked and far keys go to an overflow bin.
   The bin index is monotone in the score, so a bin's keys are contiguous in the descending
   order.  Bin masses and counts come from two ``scatter_add_``.
2. Search: cumulative bin masses / counts give, for every target (each eps; each eps with
   the sinks forced in, a piecewise search that removes the sink keys; each top-k budget),
   the boundary bin, the exact mass and count before it, and the bin's mass and count.
3. Most targets are settled from the bin alone: every key of bin b has a mass within
   [e^-(b+1)w, e^-bw], which with the bin's mass and count bounds the mass of its j largest
   keys; if the bounds decide ``prefix >= 1 - eps`` with a margin, k is exact.
4. Otherwise only the keys of the unresolved boundary bins (a few per bin) plus the sink
   keys are gathered, sorted, and summed: exact count inside the bin.
5. Every decision carries a rigorous float64 rounding margin (a multiple of n 2^-53 of the
   row mass, which covers the reference's own rounding).  Rows whose decision falls inside
   the margin (exact ties with the threshold, e.g. uniform rows) or whose boundary bins are
   crowded are recomputed with the reference routine itself, so k_eps and k_eps_sinks
   always equal :func:`reference_row_metrics` exactly.

Everything is vectorised torch (Python loops run over blocks and chunks only), so the same
code runs on CUDA.  Large temporaries live in per-thread scratch buffers that are reused
across calls (:func:`clear_workspace` frees them).

Modules: this one drives the blocks (:func:`torch_row_metrics`) and finishes the per-row
results; :mod:`attn_audit.rows.torch_stream` holds step 1, :mod:`attn_audit.rows.torch_select`
steps 2-4.
"""

from __future__ import annotations

import torch

from attn_audit.config import MeasureSpec
from attn_audit.rows.reference import _exact_sorted, _finish_regions
from attn_audit.rows.spec import RowMetrics, _check_inputs
from attn_audit.rows.spec import num_bins as _num_bins
from attn_audit.rows.torch_select import (
    _bin_bounds,
    _locate,
    _mass_from_bounds,
    _prefix_bounds,
    _search_ns,
    _select,
    _take,
    _Targets,
)
from attn_audit.rows.torch_stream import (
    _E_CLAMP,
    _Block,
    _stream,
    _workspace,
)

__all__ = ["torch_row_metrics"]

_U64 = 2.0**-53  # float64 unit roundoff
_TAIL_TOL = 1e-7  # accepted half-width (fraction of the row mass) of a bound-based tail
_BLOCK_ELEMS = 1 << 21  # scores per block (bounds the block scratch memory)


def _region_stats(
    xr: torch.Tensor, m: torch.Tensor, q: torch.Tensor, spec: MeasureSpec
) -> dict[str, torch.Tensor]:
    """Sink and local-window sums of a block, in float64, in block order.

    xr: float (Rb, G, n) view of the scores; m: float64 (Rb * G,) shift (row max, 0 for
    empty rows); q: int64 (Rb,) query positions.
    Returns float64 (Rb * G,) tensors m_s / m_l (sums of exp(s - m) over allowed sink /
    local keys), n_s / n_l (counts), d_s / d_l and dd_s / dd_l (sums of s - m, (s - m)^2).
    """
    rb_, g, n = xr.shape
    dev = xr.device
    s0 = min(spec.sinks, n)
    ninf = float("-inf")
    parts = [xr[..., :s0].reshape(rb_ * g, s0).to(torch.float64)]
    if spec.window > 0:
        t = torch.arange(spec.window, device=dev, dtype=torch.int64)
        cols = q[:, None] - t[None, :]  # (Rb, W)
        valid = (cols >= s0) & (cols < n)
        idx = cols.clamp(0, n - 1)[:, None, :].expand(rb_, g, spec.window)
        xl = torch.gather(xr, 2, idx).to(torch.float64)
        xl = torch.where(valid[:, None, :], xl, ninf).reshape(rb_ * g, spec.window)
        parts.append(xl)
    v = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    a = v > ninf
    vm = torch.nan_to_num_(v.sub_(m[:, None]), nan=0.0, neginf=0.0)  # 0 where not allowed
    ev = torch.exp(vm).mul_(a)
    vv = vm * vm
    af = a.to(torch.float64)
    out: dict[str, torch.Tensor] = {}
    for tag, sl in (("s", slice(0, s0)), ("l", slice(s0, v.shape[1]))):
        out["m_" + tag] = ev[:, sl].sum(1)
        out["n_" + tag] = af[:, sl].sum(1)
        out["d_" + tag] = vm[:, sl].sum(1)
        out["dd_" + tag] = vv[:, sl].sum(1)
    return out


def _block_metrics(
    xr: torch.Tensor, q: torch.Tensor, spec: MeasureSpec, nb: int, rr: int, force_fallback: bool
) -> dict[str, torch.Tensor]:
    """All metrics of a block, xr: float (Rb, G, n) view (query r, head g), q (Rb,).

    Returns flat tensors in block order (row r * G + g) keyed like RowMetrics plus
    ``redo`` (bool): rows whose k_eps / k_eps_sinks / tail_mass must be recomputed by the
    exact sort-based routine.
    """
    rb_, g, n = xr.shape
    s0 = min(spec.sinks, n)
    blk = _Block(rb_ * g, n, nb, s0, xr.device)
    _stream(xr, q.tolist(), blk, nb, s0, rr)

    empty = blk.m == float("-inf")
    mz = torch.where(empty, 0.0, blk.m)
    hist = _histogram(blk, nb)
    z = hist[0][:, -1].clone()  # row mass
    # error margin (unnormalised mass): float64 rounding of exp, of the accumulation in the
    # bins and of the reference's own softmax and cumulative sums, plus the clamp of the
    # exp argument; a generous multiple of n * 2^-53.
    tol = (64.0 * (n + nb) * _U64 + 1e-12) * z + 2 * n * _E_CLAMP

    tz, t_all, tz_ns, t_ns = _mass_targets(spec, blk, s0, z, hist)
    ns_need = tz_ns > tol[:, None]
    redo = (tz_ns.abs() <= tol[:, None]).any(1)
    redo |= (t_all.b >= nb).any(1) | (ns_need & (t_ns.b >= nb)).any(1)
    k_all, k_ns, ok_all, ok_ns = _bound_counts(tz, t_all, tz_ns, t_ns, blk.neg_iw, nb, tol)
    ok_ns = ok_ns | ~ns_need
    t_bd, j_bd, top, ok_bd = _budget_tops(spec, blk, nb, z, hist)

    need = ~(ok_all.all(1) & ok_ns.all(1) & ok_bd.all(1)) & ~redo & ~empty
    if force_fallback:
        redo = torch.ones_like(redo)
        need = torch.zeros_like(redo)
    if bool(need.any()):
        fams = [(t_all, tz, ok_all, "all"), (t_ns, tz_ns, ok_ns, "ns")]
        if t_bd is not None:
            fams.append((t_bd, j_bd, ok_bd, "count"))
        _resolve_exact(xr, blk, nb, s0, need, mz, tol, fams, [k_all, k_ns, top], redo)

    out = _count_fields(blk, empty, k_all, k_ns, ns_need)
    out.update(_float_fields(xr, q, spec, blk, empty, mz, z, top))
    out["redo"] = redo & ~empty
    return out


def _histogram(blk: _Block, nb: int) -> tuple[torch.Tensor, ...]:
    """Cumulative bin histogram of a block, the overflow group merged into bin nb.

    Returns (cm, cc, hm, hc), the argument order of :func:`_locate`: cm float64 / cc
    float32 (rows, nb + 1) cumulative bin masses / counts (scratch buffers), hm float64 /
    hc float32 (rows, nb + 1) the bin masses / counts (views of the block's histogram).
    """
    rows, dev = blk.hm.shape[0], blk.hm.device
    blk.hm[:, nb] = blk.hm[:, nb:].sum(1)
    blk.hc[:, nb] = blk.hc[:, nb:].sum(1)
    hm, hc = blk.hm[:, : nb + 1], blk.hc[:, : nb + 1]
    cm = torch.cumsum(hm, 1, out=_workspace("cm", (rows, nb + 1), torch.float64, dev))
    cc = torch.cumsum(hc, 1, out=_workspace("cc", (rows, nb + 1), torch.float32, dev))
    return cm, cc, hm, hc


def _mass_targets(
    spec: MeasureSpec, blk: _Block, s0: int, z: torch.Tensor, hist: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, _Targets, torch.Tensor, _Targets]:
    """Boundary bins of the mass targets (1 - eps) z of every row.

    z: float64 (rows,) row masses; hist: (cm, cc, hm, hc) from :func:`_histogram`.
    Returns tz float64 (rows, E) with its boundary bins t_all (all keys), and tz_ns (tz
    minus the sink mass) with the bins t_ns of the non-sink keys (tz, t_all if s0 == 0).
    """
    thr = torch.tensor([1.0 - e for e in spec.eps], dtype=torch.float64, device=z.device)
    tz = (thr[None, :] * z[:, None]).contiguous()
    t_all = _locate(torch.searchsorted(hist[0], tz, side="left"), *hist)
    if not s0:
        return tz, t_all, tz, t_all
    es = blk.es * blk.sa.to(torch.float64)
    m_s = es.sum(1)
    tz_ns = (tz - m_s[:, None]).contiguous()
    return tz, t_all, tz_ns, _search_ns(tz_ns, *hist, es, blk.sa, blk.sbin)


def _bound_counts(
    tz: torch.Tensor, t_all: _Targets, tz_ns: torch.Tensor, t_ns: _Targets,
    neg_iw: torch.Tensor, nb: int, tol: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counts of every mass target from its boundary bin alone (no key needed).

    tz / tz_ns: float64 (rows, E) targets of the families t_all / t_ns; neg_iw: float32
    (rows,); tol: float64 (rows,) error margin.  Returns k_all, k_ns float64 (rows, E)
    counts (valid where resolved) and ok_all, ok_ns bool (rows, E) (resolved).
    """
    n_eps = tz.shape[1]
    bb = torch.cat([t_all.b, t_ns.b], 1).clamp(max=nb - 1)
    lo, hi = _bin_bounds(bb, neg_iw)
    r_m = torch.cat([tz - t_all.a, tz_ns - t_ns.a], 1)
    j_m, ok_m = _mass_from_bounds(
        r_m, torch.cat([t_all.m, t_ns.m], 1), torch.cat([t_all.c, t_ns.c], 1), lo, hi, tol
    )
    k_all = t_all.cb + j_m[:, :n_eps]
    k_ns = t_ns.cb + j_m[:, n_eps:]
    return k_all, k_ns, ok_m[:, :n_eps], ok_m[:, n_eps:]


def _budget_tops(
    spec: MeasureSpec, blk: _Block, nb: int, z: torch.Tensor, hist: tuple[torch.Tensor, ...]
) -> tuple[_Targets | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Top-k masses of the budgets (k = min(budget, n_i)) from their boundary bins.

    z: float64 (rows,) row masses; hist: (cm, cc, hm, hc) from :func:`_histogram`.
    Returns the boundary bins t_bd and the rank j_bd float64 (rows, B) inside them (both
    None without budgets), the top-k mass top float64 (rows, B) (bound midpoint) and ok_bd
    bool (rows, B) (True: settled, within _TAIL_TOL of the row mass).
    """
    rows, dev = z.shape[0], z.device
    if not spec.budgets:
        top = torch.empty((rows, 0), dtype=torch.float64, device=dev)
        return None, None, top, torch.ones((rows, 0), dtype=torch.bool, device=dev)
    bud = torch.tensor(spec.budgets, dtype=torch.float32, device=dev)
    beff = torch.minimum(bud[None, :], blk.n_i.to(torch.float32)[:, None]).clamp_(min=1.0)
    t_bd = _locate(torch.searchsorted(hist[1], beff.contiguous(), side="left"), *hist)
    j_bd = beff.to(torch.float64) - t_bd.cb
    lo_b, hi_b = _bin_bounds(t_bd.b.clamp(max=nb - 1), blk.neg_iw)
    low, upp = _prefix_bounds(j_bd, t_bd.m, t_bd.c, lo_b, hi_b)
    over = t_bd.b >= nb  # keys beyond the cap: at most ~1e-7 of the mass in all
    top = torch.where(
        over,
        t_bd.a + t_bd.m * (j_bd / t_bd.c.clamp_min(1.0)).clamp(max=1.0),
        t_bd.a + 0.5 * (low + upp),
    )
    ok_bd = over | ((upp - low) <= 2.0 * _TAIL_TOL * z[:, None])
    return t_bd, j_bd, top, ok_bd


def _resolve_exact(
    xr: torch.Tensor, blk: _Block, nb: int, s0: int, need: torch.Tensor, mz: torch.Tensor,
    tol: torch.Tensor, fams: list[tuple[_Targets, torch.Tensor, torch.Tensor, str]],
    dst: list[torch.Tensor], redo: torch.Tensor,
) -> None:
    """Exact resolution inside the boundary bins, chunk group by chunk group (in place).

    xr: float (Rb, G, n) scores; need: bool (rows,) rows with an unsettled target; mz, tol:
    float64 (rows,); fams: (targets, values, settled (rows, T) bool, kind) per family (see
    :func:`_select`); dst: per family the float64 (rows, T) result, whose unsettled entries
    of the rows ``need`` are overwritten; redo: bool (rows,), set where that fails.
    """
    n = xr.shape[2]
    cap = max(256, n // 4)
    for i0, i1, c in _groups(blk.chunks, n):
        nsel = need[i0:i1]
        cnt = int(nsel.sum().item())
        if cnt == 0:
            continue
        for j0, j1, c1 in blk.chunks:  # stale columns of the group's shorter chunks
            if i0 <= j0 < i1 and c1 < c:
                blk.bi[j0:j1, c1:c] = nb
        if cnt * 2 >= i1 - i0:
            idx = torch.arange(i0, i1, device=xr.device)
            biv = blk.bi[i0:i1, :c]
        else:
            idx = i0 + nsel.nonzero().squeeze(1)
            biv = blk.bi[idx, :c]
        act = need[idx][:, None]
        sub = [(_take(tg, idx), tv[idx], act & ~done[idx], k) for tg, tv, done, k in fams]
        vals, ok = _select(xr, idx, mz[idx], blk.neg_iw[idx], biv, nb, s0, cap, tol[idx], sub)
        for (_, _, a, _), v, d in zip(sub, vals, dst):
            d[idx] = torch.where(a, v, d[idx])
        redo[idx] |= ~ok & need[idx]


def _count_fields(
    blk: _Block, empty: torch.Tensor, k_all: torch.Tensor, k_ns: torch.Tensor,
    ns_need: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Integer fields of a block: n_keys int64 (rows,), k_eps / k_eps_sinks int64 (rows, E).

    k_all / k_ns: float64 (rows, E) counts over all keys / over the non-sink keys (used
    where ns_need, bool (rows, E)); empty: bool (rows,) rows without an allowed key.
    """
    k_all = torch.minimum(k_all, blk.n_i[:, None])
    k_ns = torch.where(ns_need, k_ns, 0.0)
    n_s = blk.sa.to(torch.float64).sum(1)
    return {
        "n_keys": blk.n_i.to(torch.int64),
        "k_eps": torch.where(empty[:, None], 0, k_all.to(torch.int64)),
        "k_eps_sinks": torch.where(empty[:, None], 0, (n_s[:, None] + k_ns).to(torch.int64)),
    }


def _float_fields(
    xr: torch.Tensor, q: torch.Tensor, spec: MeasureSpec, blk: _Block, empty: torch.Tensor,
    mz: torch.Tensor, z: torch.Tensor, top: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Float fields of a block (and n_bulk): float64 (rows,), tail_mass (rows, B).

    xr: float (Rb, G, n) scores, q: int64 (Rb,); empty: bool (rows,) (NaN / -inf there);
    mz, z: float64 (rows,) shift and row mass; top: float64 (rows, B) top-k masses.
    """
    nan = float("nan")
    out: dict[str, torch.Tensor] = {}
    tail = (1.0 - top / z[:, None]).clamp_min(0.0)
    out["tail_mass"] = torch.where(empty[:, None], nan, tail)
    out["participation"] = torch.where(empty, nan, z * z / blk.s2)
    out["entropy"] = torch.where(empty, nan, torch.log(z) - blk.sed / z)
    reg = _region_stats(xr, mz, q, spec)
    fin = _finish_regions(reg, z, blk.n_i, blk.sd, blk.sdd, mz)
    for key in ("sink_mass", "local_mass", "bulk_mass"):
        out[key] = torch.where(empty, nan, fin[key])
    out["bulk_mean"] = fin["bulk_mean"]
    out["bulk_std"] = fin["bulk_std"]
    out["n_bulk"] = fin["n_bulk"].to(torch.int64)
    out["max_score"] = blk.m
    out["max_abs_score"] = torch.where(
        empty, float("-inf"), torch.maximum(blk.m.abs(), (blk.m + blk.lo).abs())
    )
    return out


def _groups(chunks: list[tuple[int, int, int]], n: int) -> list[tuple[int, int, int]]:
    """Merge consecutive chunks (first row, end row, c1) into groups (first, end, width)
    whose padded area exceeds the streamed area by at most 30%."""
    out: list[tuple[int, int, int]] = []
    for i0, i1, c1 in chunks:
        if c1 == 0:
            continue
        if out:
            g0, g1, gc = out[-1]
            area = sum((j1 - j0) * cj for j0, j1, cj in chunks if g0 <= j0 < g1)
            cw = max(gc, c1)
            if g1 == i0 and (i1 - g0) * cw <= 1.3 * (area + (i1 - i0) * c1) and (
                (i1 - g0) * cw <= _BLOCK_ELEMS
            ):
                out[-1] = (g0, i1, cw)
                continue
        out.append((i0, i1, c1))
    return out


@torch.no_grad()
def torch_row_metrics(
    scores: torch.Tensor,
    q_pos: torch.Tensor,
    spec: MeasureSpec,
    *,
    chunk_elems: int = 1 << 19,
    force_fallback: bool = False,
) -> RowMetrics:
    """:func:`attn_audit.rows.dispatch.row_metrics` with the vectorised torch kernel (any device).

    Same arguments, result and guarantees as ``row_metrics``; ``chunk_elems`` scores are
    streamed per step, and bins nb .. nb + _OVER - 1 form the overflow bin.
    """
    g, r, n = _check_inputs(scores, q_pos)
    dev = scores.device
    n_eps, n_bud = len(spec.eps), len(spec.budgets)
    f64 = dict(dtype=torch.float64, device=dev)
    i64 = dict(dtype=torch.int64, device=dev)
    nan = float("nan")
    res = {
        "n_keys": torch.zeros(g, r, **i64),
        "k_eps": torch.zeros(g, r, n_eps, **i64),
        "k_eps_sinks": torch.zeros(g, r, n_eps, **i64),
        "tail_mass": torch.full((g, r, n_bud), nan, **f64),
        "n_bulk": torch.zeros(g, r, **i64),
    }
    for k in ("participation", "entropy", "sink_mass", "local_mass", "bulk_mass",
              "bulk_mean", "bulk_std"):
        res[k] = torch.full((g, r), nan, **f64)
    res["max_score"] = torch.full((g, r), float("-inf"), **f64)
    res["max_abs_score"] = torch.full((g, r), float("-inf"), **f64)
    if g * r == 0 or n == 0:
        return RowMetrics(**res)

    x = scores if scores.stride(-1) == 1 else scores.contiguous()
    xt = x.transpose(0, 1)  # (R, G, n) view: query-major, every head of a query together
    q = q_pos.to(device=dev, dtype=torch.int64)
    nb = _num_bins(n)
    rr = max(1, chunk_elems // (g * n))
    rblk = max(rr, (_BLOCK_ELEMS // (g * n)) // rr * rr)
    redo_rows: list[torch.Tensor] = []
    for r0 in range(0, r, rblk):
        r1 = min(r, r0 + rblk)
        out = _block_metrics(xt[r0:r1], q[r0:r1], spec, nb, rr, force_fallback)
        redo = out.pop("redo")
        for k, v in out.items():
            res[k][:, r0:r1] = v.view(r1 - r0, g, *v.shape[1:]).transpose(0, 1)
        if bool(redo.any()):
            i = redo.nonzero().squeeze(1)
            redo_rows.append(torch.stack([i % g, r0 + i // g], 1))
    if redo_rows:
        gr = torch.cat(redo_rows)
        step = max(1, (1 << 22) // n)
        for a0 in range(0, gr.shape[0], step):
            gi, ri = gr[a0 : a0 + step].unbind(1)
            _, _, k, ks, tail = _exact_sorted(x[gi, ri], spec)
            res["k_eps"][gi, ri] = k
            res["k_eps_sinks"][gi, ri] = ks
            res["tail_mass"][gi, ri] = tail
    return RowMetrics(**res)
