"""The per-row stages of the compiled CPU row kernel (:mod:`attn_audit.rows.cpu`).

Each is a small numba function over one row (scan, stream, histogram, searches over the
cumulative histogram, the exact count inside a boundary bin, region sums); the kernel
``rows.cpu._rows`` chains them, and LLVM inlines them there. Shapes: ``x`` / ``xi`` one row
of scores (float32 / float64) and its integer view, ``e`` float64 masses, ``bins`` int32.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from attn_audit.rows.spec import num_bins


def _prefer_wide_vectors() -> None:
    """On AVX-512 hosts, let LLVM vectorise with 512-bit registers (its default tuning caps
    loops at 256 bits on those CPUs): the exp / sums pass runs ~1.3x faster, the kernel ~10%.

    Takes effect only before numba sets up its CPU target in the process (declaring the
    intrinsics below already does, so this runs first), never overrides a
    user's own ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``. The features are part of numba's
    cache key, so cached code never crosses CPUs.
    """
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return
    from llvmlite import binding as llvm

    features = llvm.get_host_cpu_features()
    if features.get("avx512f") and features.get("avx512bw"):
        numba.config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"


_prefer_wide_vectors()

_num_bins = numba.njit(cache=True)(num_bins)

_FM = {"nsz", "arcp", "contract", "reassoc"}
"""Fast-math flags of the streaming loops: reassociation lets LLVM vectorise the sums. No
``nnan`` / ``ninf``: masked keys are -inf."""

_CLAMP = -300.0
"""Floor of the exp() argument: e^-300 and its square are normal float64 numbers (no slow
subnormal arithmetic); keys further down carry less than n * 5e-131 of the mass."""

_LN2_HI = 6.93147180369123816490e-01  # fdlibm's split of ln 2: k * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00


@intrinsic
def _i64_as_f64(typingctx, x):  # type: ignore[no-untyped-def]
    """Reinterpret the bits of an int64 as a float64 (vectorises, unlike a table lookup)."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@numba.njit(fastmath={"contract"}, cache=True)
def _exp_neg(d: float) -> float:
    """exp(d) for d in [-700, 0], within 2 ulp.

    Cody-Waite reduction d = k ln2 + r (|r| <= ln2 / 2, exact with fdlibm's split), degree-13
    Taylor polynomial of e^r (truncation < 2^-56), scaled by 2^k built from its bits. No
    reassociation here: it would undo the exact reduction.
    """
    k = np.rint(d * _INV_LN2)
    r = d - k * _LN2_HI
    r = r - k * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return p * _i64_as_f64((np.int64(k) + 1023) << 52)


@numba.njit(cache=True)
def _scan(xi, lo, hi, mask, neg_inf):  # type: ignore[no-untyped-def]
    """Order keys of the max and of the min over allowed keys, and the allowed count, of
    x[lo:hi], read through its integer view xi (int32 for float32, int64 for float64).

    The key ``b ^ (mask if b < 0 else 0)`` of a float's bits b orders like the float (mask =
    the integer type's max); integer reductions vectorise, float max / min here do not.
    neg_inf: the bits of -inf (masked keys).
    """
    zero = mask ^ mask
    mxk = ~mask
    mnk = mask
    c = 0
    for j in range(lo, hi):
        b = xi[j]
        k = b ^ (mask if b < zero else zero)
        mxk = max(mxk, k)
        a = b != neg_inf
        mnk = min(mnk, k if a else mask)
        c += 1 if a else 0
    return mxk, mnk, c


@numba.njit(cache=True)
def _row_extent(xi, n, q, mask, neg_inf):  # type: ignore[no-untyped-def]
    """1 + the last allowed column of x[:n]; q + 1 (the causal guess) is verified first."""
    ln = n
    if 0 <= q < n - 1:
        if _scan(xi, q + 1, n, mask, neg_inf)[2] == 0:
            ln = q + 1
    while ln > 0 and xi[ln - 1] == neg_inf:  # padding or other masks
        ln -= 1
    return ln


@numba.njit(fastmath=_FM, cache=True)
def _stream(x, ln, mx, inv_w, nb, e, bins):  # type: ignore[no-untyped-def]
    """Masses e (float64, 0 on masked keys), bins (nb + 1 = masked) and the row sums."""
    z = 0.0
    s2 = 0.0
    sed = 0.0
    s1 = 0.0
    s11 = 0.0
    fnb = np.float64(nb)
    for j in range(ln):
        v = x[j]
        a = v > -np.inf
        d = np.float64(v) - mx
        dd = d if a else 0.0
        ev = _exp_neg(max(dd, _CLAMP)) if a else 0.0
        e[j] = ev
        z += ev
        s2 += ev * ev
        sed += ev * dd
        s1 += dd
        s11 += dd * dd
        bins[j] = np.int32(min(-dd * inv_w, fnb)) if a else nb + 1
    return z, s2, sed, s1, s11


@numba.njit(cache=True)
def _histogram(e, bins, ln, nb, hm, hc):  # type: ignore[no-untyped-def]
    hm[: nb + 2] = 0.0
    hc[: nb + 2] = 0
    for j in range(ln):
        b = bins[j]
        hm[b] += e[j]
        hc[b] += 1


@numba.njit(cache=True)
def _search_mass(cm, nb, target):  # type: ignore[no-untyped-def]
    """First bin b with cm[b + 1] >= target (nb + 1 if none); cm are prefix masses."""
    lo = 0
    hi = nb + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cm[mid + 1] >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


@numba.njit(cache=True)
def _sort_small(a, lo, hi):  # type: ignore[no-untyped-def]
    """Sort a[lo:hi] ascending in place: insertion sort for the usual few keys of a bin."""
    if hi - lo > 32:
        a[lo:hi].sort()
        return
    for u in range(lo + 1, hi):
        v = a[u]
        w = u - 1
        while w >= lo and a[w] > v:
            a[w + 1] = a[w]
            w -= 1
        a[w + 1] = v


@numba.njit(cache=True)
def _sinks_below(e, bins, s0, b):  # type: ignore[no-untyped-def]
    """Mass and count of the sink keys (columns < s0, allowed) in bins < b."""
    m = 0.0
    c = 0
    for j in range(s0):
        if bins[j] < b:
            m += e[j]
            c += 1
    return m, c


@numba.njit(cache=True)
def _search_ns(cm, nb, target, e, bins, s0):  # type: ignore[no-untyped-def]
    """First bin b whose non-sink prefix mass through b reaches target (nb + 1 if none)."""
    lo = 0
    hi = nb + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cm[mid + 1] - _sinks_below(e, bins, s0, mid + 1)[0] >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


@numba.njit(cache=True)
def _count_in_bin(seg, start, target, tol, skip, n_skip, used):  # type: ignore[no-untyped-def]
    """Smallest t >= 1 with start + (the t largest values of seg) >= target, and whether the
    decision is clear of the rounding margin (False: the caller recomputes the row).

    seg is sorted ascending; the values skip[:n_skip] (sink keys of this bin, for the
    non-sink family) are passed over once each (used: scratch flags, at least n_skip).
    """
    acc = start
    if target - acc <= tol:
        return 1, False
    used[:n_skip] = False
    t = 0
    for u in range(seg.shape[0] - 1, -1, -1):
        v = seg[u]
        hit = False
        for w in range(n_skip):
            if not used[w] and skip[w] == v:
                used[w] = True
                hit = True
                break
        if hit:
            continue
        t += 1
        acc += v
        if acc >= target:
            prev = acc - v
            return t, (acc - target > tol) and (target - prev > tol)
    return max(t, 1), False


@numba.njit(fastmath=_FM, cache=True)
def _region_sums(e, x, mx, j0, j1):  # type: ignore[no-untyped-def]
    """Mass, allowed count, sum d and sum d^2 over columns [j0, j1)."""
    m = 0.0
    c = 0
    sd = 0.0
    sdd = 0.0
    for j in range(j0, j1):
        v = x[j]
        if v > -np.inf:
            d = np.float64(v) - mx
            m += e[j]
            c += 1
            sd += d
            sdd += d * d
    return m, c, sd, sdd
