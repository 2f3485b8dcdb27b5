"""Step 1 of the torch row kernel (:mod:`attn_audit.rows.torch_kernel`): the block of rows, the
per-thread scratch workspace, and the streaming pass (row max, float64 masses and row sums,
the histogram bin of every key).
"""

from __future__ import annotations

import math
import threading

import torch

from attn_audit.rows.spec import bin_span_cap as _dcap

_CLAMP = -300.0
"""Floor of the exp() argument: e^-300 and its square are normal float64 numbers, which
keeps the vectorised exp / products on their fast path (``exp(-inf)`` and underflowing
results are 10-100x slower on CPU).  Masked keys get this floor too; they are kept out of
every count and their mass (< n * 5e-131) is part of the error budget."""

_E_CLAMP = math.exp(_CLAMP)
_OVER = 16  # width of the overflow bin group (keys spread over it by column)


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
