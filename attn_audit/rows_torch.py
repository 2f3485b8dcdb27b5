"""Vectorised torch kernel of :func:`attn_audit.rows.row_metrics` (any torch device).

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
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from attn_audit.rows import (
    bin_span_cap as _dcap,
    num_bins as _num_bins,
    RowMetrics,
    RowSpec,
    _check_inputs,
    _exact_sorted,
    _finish_regions,
)

__all__ = ["torch_row_metrics", "clear_workspace"]

_CLAMP = -300.0
"""Floor of the exp() argument: e^-300 and its square are normal float64 numbers, which
keeps the vectorised exp / products on their fast path (``exp(-inf)`` and underflowing
results are 10-100x slower on CPU).  Masked keys get this floor too; they are kept out of
every count and their mass (< n * 5e-131) is part of the error budget."""

_E_CLAMP = math.exp(_CLAMP)
_U64 = 2.0**-53  # float64 unit roundoff
_DELTA = 1e-6  # relative widening of the per-bin bounds on a key's mass
_TAIL_TOL = 1e-7  # accepted half-width (fraction of the row mass) of a bound-based tail
_OVER = 16  # width of the overflow bin group (keys spread over it by column)
_BLOCK_ELEMS = 1 << 21  # scores per block (bounds the block scratch memory)


_WS = threading.local()


def _workspace(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A per-thread scratch tensor reused across calls; content undefined.

    Large temporaries are taken from here: a fresh multi-megabyte allocation is returned
    to the OS when freed and costs page faults on every call.
    """
    cache = getattr(_WS, "bufs", None)
    if cache is None:
        cache = _WS.bufs = {}
    numel = math.prod(shape)
    # Tensors made under inference_mode cannot be updated in place outside it (and the other
    # way round costs version counters), so each mode keeps its own buffers.
    key = (name, dtype, str(device), torch.is_inference_mode_enabled())
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        cache[key] = buf
    return buf[:numel].view(shape)


def clear_workspace() -> None:
    """Release the scratch buffers kept by :func:`row_metrics` in the calling thread."""
    _WS.bufs = {}


def _bins_(f: torch.Tensor, neg_iw: torch.Tensor, nb: int) -> torch.Tensor:
    """In place: float32 (..., c) shifted scores fl32(s - max) (<= 0, -inf allowed) ->
    float32 bins, integer part in [0, nb + _OVER); neg_iw: float32 (...,).

    Keys beyond the last regular bin (masked keys, keys too far below the max) go to the
    overflow group nb .. nb + _OVER - 1, spread by column: scatter_add into one single bin
    would serialise on that address (3x slower).
    """
    c = f.shape[-1]
    cap = _workspace("cap", (c,), torch.float32, f.device)
    torch.remainder(torch.arange(c, device=f.device), _OVER, out=cap).add_(nb)
    f.mul_(neg_iw[..., None])
    return torch.minimum(f, cap, out=f)


def _last_allowed_col(x: torch.Tensor, hint: int) -> int:
    """1 + index of the last column of x (..., n) that may hold an allowed key (0: none).

    hint: a guess (max query position + 1, right for causal masks) verified with one
    reduction over the columns it would skip; exact search otherwise.
    """
    n = x.shape[-1]
    if n == 0:
        return 0
    hint = min(max(hint, 0), n)
    if hint == n:
        return n
    if hint > 0 and bool(x[..., hint:].amax(-1).amax() == float("-inf")):
        return hint
    cols = (x.amax(dim=tuple(range(x.dim() - 1))) > float("-inf")).nonzero()
    return int(cols[-1, 0].item()) + 1 if cols.numel() else 0


class _Block:
    """State of one block of rows, in block order (row i = (r, g), i = r * G + g).

    Per row (B,): m (float64 row max, -inf if empty), n_i, lo (minus the logit range),
    sd / sdd (sums of d = s - max and d^2 over allowed keys, float64), s2 / sed (sums of
    e^2 and e * d, e = exp(d)), neg_iw (float32, minus the inverse bin width).
    hm: float64 (B, W) bin masses, hc: float32 (B, W) bin counts (W = nb + _OVER).
    es: float64, sa: float32 (B, s0) sink masses / allowed flags, sbin: int64 (B, s0).
    bi: int64 (B, n) bins (scratch; valid in the first c1 columns of each chunk),
    chunks: list of (first row, end row, c1).
    """

    def __init__(self, b: int, n: int, nb: int, s0: int, device: torch.device) -> None:
        f32 = dict(dtype=torch.float32, device=device)
        f64 = dict(dtype=torch.float64, device=device)
        self.m = torch.full((b,), float("-inf"), **f64)
        self.n_i = torch.zeros(b, **f64)
        self.lo = torch.zeros(b, **f64)
        self.sd = torch.zeros(b, **f64)
        self.sdd = torch.zeros(b, **f64)
        self.s2 = torch.ones(b, **f64)
        self.sed = torch.zeros(b, **f64)
        self.neg_iw = torch.full((b,), -1.0, **f32)
        w = nb + _OVER
        self.hm = _workspace("hm", (b, w), torch.float64, device).zero_()
        self.hc = _workspace("hc", (b, w), torch.float32, device).zero_()
        self.es = torch.zeros(b, s0, **f64)
        self.sa = torch.zeros(b, s0, **f32)
        self.sbin = torch.full((b, s0), w, dtype=torch.int64, device=device)
        self.bi = _workspace("bi", (b, n), torch.int64, device)
        self.chunks: list[tuple[int, int, int]] = []


def _stream(
    xb: torch.Tensor, qb: list[int], blk: _Block, nb: int, s0: int, rr: int
) -> None:
    """Streaming pass over a block: row statistics and bin histograms.

    xb: float (Rb, G, n) view of the scores (query position r, head g); qb: the Rb query
    positions (hints for skipping masked trailing columns); rr: query positions per chunk.
    Masses are float64 (exact shift, exp in float64) so that the exactness margin stays at
    the float64 level; the bins use the float32 shift.  Chunk temporaries live in reused
    scratch buffers.
    """
    rb_, g, n = xb.shape
    dcap = _dcap(n)
    ninf = float("-inf")
    f32, f64 = torch.float32, torch.float64
    dev = xb.device
    w = nb + _OVER
    for r0 in range(0, rb_, rr):
        r1 = min(rb_, r0 + rr)
        i0, i1 = r0 * g, r1 * g
        xc = xb[r0:r1]
        c1 = _last_allowed_col(xc, max(qb[r0:r1]) + 1)  # skip masked trailing columns
        blk.chunks.append((i0, i1, c1))
        if c1 == 0:
            continue
        shp = (r1 - r0, g, c1)
        xt = xc[..., :c1]
        m = xt.amax(-1).to(f64)
        empty = m == ninf
        mz = torch.where(empty, 0.0, m)
        # two float64 buffers only (small working set): nd -> e, ndz -> clamped nd
        nd = _workspace("nd", shp, f64, dev)  # float64, exact s - max
        nd.copy_(xt)
        nd.sub_(mz[..., None])
        f = _workspace("f", shp, f32, dev)
        if xt.dtype == f64:
            f.copy_(nd)
        else:
            torch.sub(xt, mz.to(f32)[..., None], out=f)  # = fl32(nd)
        ndz = torch.nan_to_num(
            nd, nan=0.0, posinf=0.0, neginf=0.0, out=_workspace("ndz", shp, f64, dev)
        )
        lo = ndz.amin(-1)
        blk.sd[i0:i1] = ndz.sum(-1).view(-1)
        blk.sdd[i0:i1] = (torch.linalg.vector_norm(ndz, dim=-1) ** 2).view(-1)
        a = torch.gt(xt, ninf, out=_workspace("a", shp, f32, dev))
        blk.n_i[i0:i1] = a.sum(-1).view(-1)
        ndc = torch.clamp(nd, min=_CLAMP, out=ndz)
        e = torch.exp(ndc, out=nd)
        blk.s2[i0:i1] = (torch.linalg.vector_norm(e, dim=-1) ** 2).view(-1)
        blk.sed[i0:i1] = ndc.mul_(e).sum(-1).view(-1)
        blk.m[i0:i1] = m.view(-1)
        blk.lo[i0:i1] = lo.view(-1)
        dmax = (-lo).clamp(min=1e-30, max=dcap)
        neg_iw = (-(nb - 0.5) / dmax).to(f32)
        blk.neg_iw[i0:i1] = neg_iw.view(-1)
        bi = blk.bi[i0:i1].view(r1 - r0, g, n)[..., :c1]
        bi.copy_(_bins_(f, neg_iw, nb))
        blk.hm[i0:i1].view(r1 - r0, g, w).scatter_add_(2, bi, e)
        blk.hc[i0:i1].view(r1 - r0, g, w).scatter_add_(2, bi, a)
        sc = min(s0, c1)
        if sc:
            blk.es[i0:i1, :sc] = e[..., :sc].reshape(-1, sc)
            blk.sa[i0:i1, :sc] = a[..., :sc].reshape(-1, sc)
            blk.sbin[i0:i1, :sc] = bi[..., :sc].reshape(-1, sc)


def _at(t: torch.Tensor, p: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """t (B, W) at columns p (B, T) as float64, ``fill`` where p < 0 (p clamped above)."""
    g = torch.gather(t, 1, p.clamp(0, t.shape[1] - 1)).to(torch.float64)
    return torch.where(p >= 0, g, fill)


def _bin_bounds(b: torch.Tensor, neg_iw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds lo, hi (float64 (B, T)) on the mass exp(nd) of any key in bin b (B, T).

    A key in bin b has ``b <= fl32(-fl32(nd) * iw) < b + 1``; widening by _DELTA covers
    the float32 rounding of the shift and of the product, and the rounding of exp().
    """
    w = (-1.0 / neg_iw.to(torch.float64))[:, None]
    bf = b.to(torch.float64)
    hi = torch.exp(-bf * w * (1.0 - _DELTA)) * (1.0 + _DELTA)
    lo = torch.exp(-(bf + 1.0) * w * (1.0 + _DELTA)) * (1.0 - _DELTA)
    return lo, hi


def _prefix_bounds(
    j: torch.Tensor, m: torch.Tensor, c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on the mass of the j largest of c keys of total mass m, each in [lo, hi].

    All float64 (B, T); returns (lower, upper).  Uses that the j largest have at least the
    average mass and that the other c - j keys lie in [lo, hi].
    """
    cs = c.clamp_min(1.0)
    lower = torch.maximum(torch.maximum(j * lo, j * m / cs), m - (cs - j) * hi)
    upper = torch.minimum(j * hi, m - (cs - j) * lo)
    lower = torch.where(j > 0, lower, 0.0)
    upper = torch.where(j > 0, upper, 0.0)
    return lower, upper


def _mass_from_bounds(
    r: torch.Tensor,
    mb: torch.Tensor,
    c: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    tol: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Number j of keys of the boundary bin needed to add mass r, from the bin alone.

    r: float64 (B, T) mass still needed when the bin starts; mb, c: bin mass and count;
    lo, hi: bounds on a key's mass in the bin; tol: float64 (B,) error margin.
    Returns j (float64, valid where resolved) and resolved (bool), both (B, T).
    """
    cs = c.clamp_min(1.0)
    big = 2.0**52
    j1 = torch.ceil((r / lo).clamp(max=big))
    j2 = torch.ceil((r * cs / mb.clamp_min(1e-300)).clamp(max=big))
    j3 = torch.ceil((cs - (mb - r) / hi).clamp(max=big))
    j = torch.minimum(torch.minimum(j1, j2), j3).clamp(min=1.0)
    j = torch.minimum(j, cs)
    lower, _ = _prefix_bounds(j, mb, c, lo, hi)
    _, upper_prev = _prefix_bounds(j - 1.0, mb, c, lo, hi)
    t = tol[:, None]
    return j, (c >= 1.0) & (lower - r > t) & (r - upper_prev > t)


@dataclass
class _Targets:
    """Boundary bins of one family of targets of B rows, all (B, T).

    b: int64 boundary bin (nb: the overflow bin); a / cb: float64 mass / count of the
    counted keys before the bin; m / c: float64 mass / count of the counted keys in it.
    """

    b: torch.Tensor
    a: torch.Tensor
    cb: torch.Tensor
    m: torch.Tensor
    c: torch.Tensor


def _locate(
    b: torch.Tensor, cm: torch.Tensor, cc: torch.Tensor, hm: torch.Tensor, hc: torch.Tensor
) -> _Targets:
    """Masses and counts around bins b (B, T) (all keys).

    cm / cc: (B, nb + 1) cumulative bin masses (float64) / counts (float32); hm / hc: bin
    masses / counts; bin nb is the (merged) overflow bin.
    """
    b = b.clamp(max=cm.shape[1] - 1)
    return _Targets(b, _at(cm, b - 1), _at(cc, b - 1), _at(hm, b), _at(hc, b))


def _search_ns(
    tz: torch.Tensor, cm: torch.Tensor, cc: torch.Tensor, hm: torch.Tensor,
    hc: torch.Tensor, es: torch.Tensor, sa: torch.Tensor, sbin: torch.Tensor,
) -> _Targets:
    """First bin where the cumulative non-sink mass reaches tz (B, T).

    The non-sink cumulative mass is cm(b) - S(b), S a step function with one step per
    sink (es / sa / sbin: (B, s0) sink masses (0 if masked), allowed flags and bins); it is
    searched one constant piece at a time.
    """
    bsz, t = tz.shape
    w = cm.shape[1]
    f64 = torch.float64
    if sbin.shape[1] == 1:
        sb, se, ss = sbin, es, sa.to(f64)
        b1 = torch.searchsorted(cm, tz, side="left")
        b2 = torch.searchsorted(cm, (tz + se).contiguous(), side="left")
        b = torch.where(b1 < sb, b1, torch.maximum(b2, sb))
    else:
        sb, order = torch.sort(sbin, dim=1)
        se = torch.gather(es, 1, order)
        ss = torch.gather(sa, 1, order).to(f64)
        zero = torch.zeros(bsz, 1, dtype=f64, device=tz.device)
        p = torch.cat([zero, se.cumsum(1)], 1)  # S on each piece, (B, s0 + 1)
        start = torch.cat([zero.to(torch.int64), sb], 1)
        stop = torch.cat([sb, torch.full_like(zero, w, dtype=torch.int64)], 1)
        tgt = (tz[:, :, None] + p[:, None, :]).reshape(bsz, -1)
        cand = torch.searchsorted(cm, tgt.contiguous(), side="left").view(bsz, t, -1)
        cand = torch.maximum(cand, start[:, None, :])
        cand = torch.where(cand < stop[:, None, :], cand, w)
        b = cand.amin(-1)
    tg = _locate(b, cm, cc, hm, hc)
    before = (sb[:, None, :] < tg.b[:, :, None]).to(f64)  # (B, T, s0)
    inside = (sb[:, None, :] == tg.b[:, :, None]).to(f64)
    tg.a = tg.a - (before * se[:, None, :]).sum(-1)
    tg.cb = tg.cb - (before * ss[:, None, :]).sum(-1)
    tg.m = tg.m - (inside * se[:, None, :]).sum(-1)
    tg.c = tg.c - (inside * ss[:, None, :]).sum(-1)
    return tg


def _seg_solve(
    tg: _Targets,
    tz: torch.Tensor,
    pb: torch.Tensor,
    cs: torch.Tensor,
    nsc: torch.Tensor | None,
    tol: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact count inside the boundary bins from the sorted boundary keys.

    tg: boundary bins of the targets tz (u, T); pb: int64 (u, L) bins of the sorted keys
    (non-decreasing); cs: float64 (u, L) cumulative masses of the counted keys along the
    row (keys that do not count add 0); nsc: int64 (u, L) cumulative number of counted keys
    (None: every key counts); tol: float64 (u,).
    Returns k float64 (u, T) and ok bool (u, T).
    """
    b = tg.b.contiguous()
    st = torch.searchsorted(pb, b, side="left")
    en = torch.searchsorted(pb, b, side="right")
    base = _at(cs, st - 1)
    # first position whose cumulative mass reaches the target (cs is non-decreasing)
    p = torch.searchsorted(cs, (tz - tg.a + base).contiguous(), side="left")
    p = torch.maximum(p, st)
    if nsc is None:
        q = (p - st).to(torch.float64)
        nseg = (en - st).to(torch.float64)
    else:
        c0 = _at(nsc, st - 1)
        q = _at(nsc, p - 1) - c0
        nseg = _at(nsc, en - 1) - c0
    inb = p < en
    hi_v = torch.where(inb, tg.a - base + _at(cs, p), float("inf"))
    lo_v = torch.where(p > st, tg.a - base + _at(cs, p - 1), tg.a)
    t = tol[:, None]
    ok = inb & (nseg == tg.c) & (hi_v - tz > t) & (tz - lo_v > t)
    return tg.cb + q + 1.0, ok


def _select(
    xr: torch.Tensor,
    rows: torch.Tensor,
    mz: torch.Tensor,
    neg_iw: torch.Tensor,
    bi: torch.Tensor,
    nb: int,
    s0: int,
    cap: int,
    tol: torch.Tensor,
    fams: list[tuple[_Targets, torch.Tensor, torch.Tensor, str]],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Exact resolution by sorting the keys of the boundary bins of u rows.

    xr: float (Rb, G, n) scores of the block; rows: int64 (u,) block rows (r * G + g);
    mz: float64 (u,) their shift (row max); neg_iw: float32 (u,) their minus inverse bin
    width; bi: int64 (u, c) their bins (all valid);
    tol: float64 (u,); fams: (targets, target values, active (u, T) bool, kind) with kind
    "all" / "ns" (mass targets, values = mass) or "count" (values = rank j inside the bin).
    Only the bins of active targets (plus the sink keys) are gathered and sorted.
    Returns per family float64 (u, T) (k for mass families, the top mass for "count") and
    ok bool (u,) (False: recompute the row with the exact sort-based routine).
    """
    u, c = bi.shape
    dev = bi.device
    g = xr.shape[1]
    rq, rg = rows // g, rows % g
    ninf = float("-inf")
    sc = min(s0, c)
    w = nb + _OVER
    sel = torch.zeros(u, w, dtype=torch.bool, device=dev)
    for tg, _, act, _ in fams:
        sel.scatter_(1, torch.where(act, tg.b, nb), True)
    sel[:, nb:] = False
    msk = torch.gather(sel, 1, bi[:, sc:])
    rr, cidx = msk.nonzero(as_tuple=True)
    cnt = torch.bincount(rr, minlength=u)
    ok = cnt <= cap
    lmax = int(cnt.max().item()) if u else 0
    if lmax > cap:
        keep = ok[rr]
        rr, cidx = rr[keep], cidx[keep]
        cnt = torch.where(ok, cnt, 0)
        lmax = int(cnt.max().item())
    width = max(sc + lmax, 1)
    key = torch.full((u, width), ninf, dtype=torch.float64, device=dev)
    if sc:
        allowed_s = bi[:, :sc] < nb
        xs = xr[rq, rg, :sc].to(torch.float64) - mz[:, None]  # exact s - max
        key[:, :sc] = torch.where(allowed_s, xs, ninf)
    if lmax:
        start = torch.cumsum(cnt, 0) - cnt
        pos = sc + torch.arange(rr.numel(), device=dev) - start[rr]
        key[rr, pos] = xr[rq[rr], rg[rr], sc + cidx].to(torch.float64) - mz[rr]
    ks, order = torch.sort(key, dim=1, descending=True)
    # bins of the sorted keys, recomputed exactly as in the stream (fl32 of the exact
    # shift, times the same float32 inverse width): non-decreasing along each row
    pb = ks.to(torch.float32).mul_(neg_iw[:, None]).clamp_(max=float(nb)).to(torch.int64)
    valid = ks > ninf
    ms = torch.where(valid, torch.exp(ks.clamp(min=_CLAMP)), 0.0)
    cs_all = ms.cumsum(1)
    if sc:
        is_ns = order >= sc
        cs_ns = torch.where(is_ns, ms, 0.0).cumsum(1)
        nsc = is_ns.cumsum(1)
    else:
        cs_ns, nsc = cs_all, None
    vals: list[torch.Tensor] = []
    for tg, tv, act, kind in fams:
        if kind == "count":
            st = torch.searchsorted(pb, tg.b.contiguous(), side="left")
            en = torch.searchsorted(pb, tg.b.contiguous(), side="right")
            j = tv.to(torch.int64)
            ok &= ((en - st >= j) | ~act).all(1)
            vals.append(tg.a + _at(cs_all, st + j - 1) - _at(cs_all, st - 1))
        else:
            ns = kind == "ns"
            k, okf = _seg_solve(tg, tv, pb, cs_ns if ns else cs_all, nsc if ns else None, tol)
            ok &= (okf | ~act).all(1)
            vals.append(k)
    return vals, ok


def _region_stats(
    xr: torch.Tensor, m: torch.Tensor, q: torch.Tensor, spec: RowSpec
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
    xr: torch.Tensor, q: torch.Tensor, spec: RowSpec, nb: int, rr: int, force_fallback: bool
) -> dict[str, torch.Tensor]:
    """All metrics of a block, xr: float (Rb, G, n) view (query r, head g), q (Rb,).

    Returns flat tensors in block order (row r * G + g) keyed like RowMetrics plus
    ``redo`` (bool): rows whose k_eps / k_eps_sinks / tail_mass must be recomputed by the
    exact sort-based routine.
    """
    rb_, g, n = xr.shape
    rows = rb_ * g
    dev = xr.device
    f64 = torch.float64
    s0 = min(spec.sinks, n)
    blk = _Block(rows, n, nb, s0, dev)
    _stream(xr, q.tolist(), blk, nb, s0, rr)

    empty = blk.m == float("-inf")
    mz = torch.where(empty, 0.0, blk.m)
    n_i = blk.n_i
    # merge the overflow group into one bin nb
    blk.hm[:, nb] = blk.hm[:, nb:].sum(1)
    blk.hc[:, nb] = blk.hc[:, nb:].sum(1)
    hm, hc = blk.hm[:, : nb + 1], blk.hc[:, : nb + 1]
    cm = torch.cumsum(hm, 1, out=_workspace("cm", (rows, nb + 1), f64, dev))
    cc = torch.cumsum(hc, 1, out=_workspace("cc", (rows, nb + 1), torch.float32, dev))
    z = cm[:, -1].clone()
    # error margin (unnormalised mass): float64 rounding of exp, of the accumulation in the
    # bins and of the reference's own softmax and cumulative sums, plus the clamp of the
    # exp argument; a generous multiple of n * 2^-53.
    tol = (64.0 * (n + nb) * _U64 + 1e-12) * z + 2 * n * _E_CLAMP

    n_eps, n_bud = len(spec.eps), len(spec.budgets)
    thr = torch.tensor([1.0 - e for e in spec.eps], dtype=f64, device=dev)
    tz = (thr[None, :] * z[:, None]).contiguous()
    t_all = _locate(torch.searchsorted(cm, tz, side="left"), cm, cc, hm, hc)
    if s0:
        es = blk.es * blk.sa.to(f64)
        m_s = es.sum(1)
        tz_ns = (tz - m_s[:, None]).contiguous()
        t_ns = _search_ns(tz_ns, cm, cc, hm, hc, es, blk.sa, blk.sbin)
    else:
        tz_ns = tz
        t_ns = t_all
    ns_need = tz_ns > tol[:, None]
    redo = (tz_ns.abs() <= tol[:, None]).any(1)
    redo |= (t_all.b >= nb).any(1) | (ns_need & (t_ns.b >= nb)).any(1)

    # bound-based resolution (no key needed) of every target
    bb = torch.cat([t_all.b, t_ns.b], 1).clamp(max=nb - 1)
    lo, hi = _bin_bounds(bb, blk.neg_iw)
    r_m = torch.cat([tz - t_all.a, tz_ns - t_ns.a], 1)
    j_m, ok_m = _mass_from_bounds(
        r_m, torch.cat([t_all.m, t_ns.m], 1), torch.cat([t_all.c, t_ns.c], 1), lo, hi, tol
    )
    k_all = t_all.cb + j_m[:, :n_eps]
    k_ns = t_ns.cb + j_m[:, n_eps:]
    ok_all = ok_m[:, :n_eps]
    ok_ns = ok_m[:, n_eps:] | ~ns_need

    if n_bud:
        bud = torch.tensor(spec.budgets, dtype=torch.float32, device=dev)
        beff = torch.minimum(bud[None, :], n_i.to(torch.float32)[:, None]).clamp_(min=1.0)
        t_bd = _locate(torch.searchsorted(cc, beff.contiguous(), side="left"), cm, cc, hm, hc)
        j_bd = beff.to(f64) - t_bd.cb
        lo_b, hi_b = _bin_bounds(t_bd.b.clamp(max=nb - 1), blk.neg_iw)
        low, upp = _prefix_bounds(j_bd, t_bd.m, t_bd.c, lo_b, hi_b)
        over = t_bd.b >= nb  # keys beyond the cap: at most ~1e-7 of the mass in all
        top = torch.where(
            over,
            t_bd.a + t_bd.m * (j_bd / t_bd.c.clamp_min(1.0)).clamp(max=1.0),
            t_bd.a + 0.5 * (low + upp),
        )
        ok_bd = over | ((upp - low) <= 2.0 * _TAIL_TOL * z[:, None])
    else:
        top = torch.empty((rows, 0), dtype=f64, device=dev)
        ok_bd = torch.ones((rows, 0), dtype=torch.bool, device=dev)

    need = ~(ok_all.all(1) & ok_ns.all(1) & ok_bd.all(1)) & ~redo & ~empty
    if force_fallback:
        redo = torch.ones_like(redo)
        need = torch.zeros_like(redo)

    # ---- exact resolution inside the boundary bins, chunk group by chunk group -----------
    if bool(need.any()):
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
                idx = torch.arange(i0, i1, device=dev)
                biv = blk.bi[i0:i1, :c]
            else:
                idx = i0 + nsel.nonzero().squeeze(1)
                biv = blk.bi[idx, :c]
            act = need[idx][:, None]
            fams = [
                (_take(t_all, idx), tz[idx], act & ~ok_all[idx], "all"),
                (_take(t_ns, idx), tz_ns[idx], act & ~ok_ns[idx], "ns"),
            ]
            if n_bud:
                fams.append((_take(t_bd, idx), j_bd[idx], act & ~ok_bd[idx], "count"))
            vals, row_ok = _select(
                xr, idx, mz[idx], blk.neg_iw[idx], biv, nb, s0, cap, tol[idx], fams
            )
            k_all[idx] = torch.where(fams[0][2], vals[0], k_all[idx])
            k_ns[idx] = torch.where(fams[1][2], vals[1], k_ns[idx])
            if n_bud:
                top[idx] = torch.where(fams[2][2], vals[2], top[idx])
            redo[idx] |= ~row_ok & need[idx]

    k_all = torch.minimum(k_all, n_i[:, None])
    k_ns = torch.where(ns_need, k_ns, 0.0)
    n_s = blk.sa.to(f64).sum(1)
    out: dict[str, torch.Tensor] = {}
    out["n_keys"] = n_i.to(torch.int64)
    out["k_eps"] = torch.where(empty[:, None], 0, k_all.to(torch.int64))
    out["k_eps_sinks"] = torch.where(empty[:, None], 0, (n_s[:, None] + k_ns).to(torch.int64))
    tail = (1.0 - top / z[:, None]).clamp_min(0.0)
    out["tail_mass"] = torch.where(empty[:, None], float("nan"), tail)
    nan = float("nan")
    out["participation"] = torch.where(empty, nan, z * z / blk.s2)
    out["entropy"] = torch.where(empty, nan, torch.log(z) - blk.sed / z)
    reg = _region_stats(xr, mz, q, spec)
    fin = _finish_regions(reg, z, n_i, blk.sd, blk.sdd, mz)
    for key in ("sink_mass", "local_mass", "bulk_mass"):
        out[key] = torch.where(empty, nan, fin[key])
    out["bulk_mean"] = fin["bulk_mean"]
    out["bulk_std"] = fin["bulk_std"]
    out["n_bulk"] = fin["n_bulk"].to(torch.int64)
    out["max_score"] = blk.m
    out["max_abs_score"] = torch.where(
        empty, float("-inf"), torch.maximum(blk.m.abs(), (blk.m + blk.lo).abs())
    )
    out["redo"] = redo & ~empty
    return out


def _take(tg: _Targets, idx: torch.Tensor) -> _Targets:
    """Rows idx of a target family."""
    return _Targets(tg.b[idx], tg.a[idx], tg.cb[idx], tg.m[idx], tg.c[idx])


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
    spec: RowSpec,
    *,
    chunk_elems: int = 1 << 19,
    force_fallback: bool = False,
) -> RowMetrics:
    """:func:`attn_audit.rows.row_metrics` with the vectorised torch kernel (any device).

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

