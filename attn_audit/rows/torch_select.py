"""Steps 2-4 of the torch row kernel (:mod:`attn_audit.rows.torch_kernel`): the boundary bin of every
target from the cumulative histogram, the bound-based decisions that settle most targets
from the bin alone, and the exact count inside the boundary bins left over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attn_audit.rows.torch_stream import _CLAMP, _OVER

_DELTA = 1e-6  # relative widening of the per-bin bounds on a key's mass


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
        cand = torch.searchsorted(cm, tgt.contiguous(), side="left").view(bsz, t, p.shape[1])
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
    g = xr.shape[1]
    rq, rg = rows // g, rows % g
    sc = min(s0, bi.shape[1])
    rr, cidx, cnt, ok, lmax = _boundary_keys(bi, nb, sc, cap, fams)
    key = _key_matrix(xr, rq, rg, mz, bi, nb, sc, rr, cidx, cnt, lmax)
    pb, cs_all, cs_ns, nsc = _sorted_masses(key, neg_iw, nb, sc)
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


def _boundary_keys(
    bi: torch.Tensor,
    nb: int,
    sc: int,
    cap: int,
    fams: list[tuple[_Targets, torch.Tensor, torch.Tensor, str]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The non-sink keys of u rows that lie in a boundary bin of an active target.

    bi: int64 (u, c) bins of the keys, the first sc columns the sinks (not selected);
    fams: as in :func:`_select`.  Returns rr, cidx int64 (L,) row and column - sc of the
    selected keys (row-major), cnt int64 (u,) keys per row, ok bool (u,) (False: more than
    cap keys; such rows get none) and lmax (int) the largest count.
    """
    u = bi.shape[0]
    sel = torch.zeros(u, nb + _OVER, dtype=torch.bool, device=bi.device)
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
    return rr, cidx, cnt, ok, lmax


def _key_matrix(
    xr: torch.Tensor, rq: torch.Tensor, rg: torch.Tensor, mz: torch.Tensor, bi: torch.Tensor,
    nb: int, sc: int, rr: torch.Tensor, cidx: torch.Tensor, cnt: torch.Tensor, lmax: int,
) -> torch.Tensor:
    """The gathered keys of u rows as exact shifted scores s - max, float64 (u, sc + lmax).

    xr: float (Rb, G, n) scores; rq, rg: int64 (u,) query / head of each row; mz: float64
    (u,); bi: int64 (u, c) bins; rr, cidx, cnt, lmax: from :func:`_boundary_keys`.
    Columns: the sc sink keys (-inf where masked), then each row's selected keys; -inf pads.
    """
    u = bi.shape[0]
    dev = bi.device
    ninf = float("-inf")
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
    return key


def _sorted_masses(
    key: torch.Tensor, neg_iw: torch.Tensor, nb: int, sc: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sort the gathered keys of u rows (descending) and accumulate their masses.

    key: float64 (u, L) from :func:`_key_matrix`; neg_iw: float32 (u,).  Returns pb int64
    (u, L) bins of the sorted keys, cs_all / cs_ns float64 (u, L) cumulative masses of all
    keys / of the non-sink keys, nsc int64 (u, L) cumulative number of non-sink keys
    (cs_ns = cs_all and nsc = None when sc == 0).
    """
    ks, order = torch.sort(key, dim=1, descending=True)
    # bins of the sorted keys, recomputed exactly as in the stream (fl32 of the exact
    # shift, times the same float32 inverse width): non-decreasing along each row
    pb = ks.to(torch.float32).mul_(neg_iw[:, None]).clamp_(max=float(nb)).to(torch.int64)
    valid = ks > float("-inf")
    ms = torch.where(valid, torch.exp(ks.clamp(min=_CLAMP)), 0.0)
    cs_all = ms.cumsum(1)
    if sc:
        is_ns = order >= sc
        cs_ns = torch.where(is_ns, ms, 0.0).cumsum(1)
        nsc = is_ns.cumsum(1)
    else:
        cs_ns, nsc = cs_all, None
    return pb, cs_all, cs_ns, nsc


def _take(tg: _Targets, idx: torch.Tensor) -> _Targets:
    """Rows idx of a target family."""
    return _Targets(tg.b[idx], tg.a[idx], tg.cb[idx], tg.m[idx], tg.c[idx])
