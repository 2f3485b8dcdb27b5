"""The CPU kernel of :func:`attn_audit.rows.dispatch.row_metrics`, compiled with numba.

One pass per query row computes everything :class:`~attn_audit.rows.dispatch.RowMetrics` holds,
without sorting the row (docs/methods.md §2.2):

1. max, min and count of the allowed keys (``-inf`` = masked), and the last allowed column
   (causal rows stop there);
2. ``d = s - max`` in float64, ``e = exp(d)`` with a vectorised exp (:func:`_exp_neg`,
   at most 2 ulp from the correctly rounded value), the row sums (mass, sum e^2, sum e d,
   sum d, sum d^2) and a bin index ``floor(-d / w)`` per key: ``num_bins`` of the row's own
   length (up to its last allowed key) spread over the row's logit range (capped at
   ``ln n + 16`` nats); keys further down share an overflow
   bin. The bin index is monotone in the score, so bins are contiguous in the descending
   order;
3. a histogram of bin masses and counts (one scatter pass);
4. per target (each eps; each eps with the sinks forced in; each top-k budget) the prefix
   sums locate the boundary bin, whose few keys are gathered and sorted: the count inside
   the bin is exact.

Every mass decision compares float64 sums with a threshold; when the two are closer than a
rigorous rounding margin (``_MARGIN_ULPS * (n + 8)`` units of 2^-53 of the row mass, which
covers this kernel's and the reference's own rounding), the row is flagged and the caller
recomputes it with the sort-based reference, so ``k_eps`` and ``k_eps_sinks`` always equal
:func:`~attn_audit.rows.dispatch.reference_row_metrics` exactly. Rows are split over threads
(``nogil`` kernels driven from a thread pool).

The kernel is compiled on first use and cached on disk by numba (a few seconds once).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np

from attn_audit.rows.cpu_stages import (
    _count_in_bin,
    _histogram,
    _num_bins,
    _region_sums,
    _row_extent,
    _scan,
    _search_mass,
    _search_ns,
    _sinks_below,
    _sort_small,
    _stream,
)

__all__ = ["rows_kernel", "split_rows", "FLT_NAMES"]

_MARGIN_ULPS = 8.0
_U64 = 2.0**-53

# layout of the per-row output arrays
N_INT = 2  # ints[:, 0] = n_keys, ints[:, 1] = n_bulk (k_eps / k_eps_sinks have their own arrays)
FLT_NAMES = ("participation", "entropy", "sink_mass", "local_mass", "bulk_mass", "bulk_mean",
             "bulk_std", "max_score", "max_abs_score")
N_FLT = len(FLT_NAMES)


def _sources_digest() -> int:
    """A digest of the other source files whose functions the kernel inlines
    (:mod:`attn_audit.rows.cpu_stages`, and :func:`attn_audit.rows.spec.num_bins`)."""
    from attn_audit.rows import cpu_stages as rows_cpu_stages
    from attn_audit.rows import spec as rows_spec

    h = hashlib.sha256()
    try:
        for mod in (rows_cpu_stages, rows_spec):
            h.update(Path(mod.__file__).read_bytes())
    except (OSError, TypeError):  # no readable source (a zip import, a frozen build): no digest
        return 0
    return int(h.hexdigest()[:15], 16)


def _compile(sources_digest: int):  # type: ignore[no-untyped-def]
    """The kernel, compiled by numba and cached on disk.

    numba keys a cached function on its own file's time stamp only, not on the files of the
    functions it inlines: after a change to rows/cpu_stages.py alone it would load the stale
    machine code (with a changed bin count, writing past its buffers). It also hashes the
    values a closure captures, so the kernel closes over a digest of those files.
    """

    @numba.njit(nogil=True, cache=True)
    def _rows(x, xi, mask, neg_inf, q_pos, n_rows_per_head, row0, row1, eps, budgets, sinks, window, nb_max, dcap,
              ints, k_all, k_ns, tail, flt, redo, write_w, w_out, mass, causal):  # type: ignore[no-untyped-def]
        """Rows [row0, row1) of x (rows, n); row i is query q_pos[i % n_rows_per_head].

        xi: the integer view of x; mask / neg_inf: see :func:`_scan`. With causal, keys after the
        row's query position are disallowed whatever x holds there.

        mass[i] receives the sum of exp(x[i] - row max) over allowed keys (0 for a row without
        any); with write_w, w_out[i] (rows, n) receives those weights (0 on masked keys).
        """
        _ = sources_digest  # a closure variable: part of numba's cache key (see _compile)
        # The per-target steps below stay written out in this loop: moved into stage functions
        # (boundaries, gather, exact counts, tails; with or without numba's inline="always")
        # they gave the same results ~5-7% slower on real SmolLM2 scores (A/B, 15-25 reps).
        n = x.shape[1]
        n_eps = eps.shape[0]
        n_bud = budgets.shape[0]
        e = np.empty(n)
        bins = np.empty(n, np.int32)
        hm = np.empty(nb_max + 2)
        hc = np.empty(nb_max + 2, np.int64)
        cm = np.empty(nb_max + 2)  # cm[b] = mass of bins < b
        cc = np.empty(nb_max + 2, np.int64)  # cc[b] = keys in bins < b
        slot = np.full(nb_max + 2, -1, np.int64)  # segment of a boundary bin, -1 elsewhere
        seg_bin = np.empty(n_eps * 2 + n_bud, np.int64)
        seg_off = np.empty(n_eps * 2 + n_bud + 1, np.int64)
        seg_pos = np.empty(n_eps * 2 + n_bud, np.int64)
        gv = np.empty(n)
        skip = np.empty(max(sinks, 1))
        used = np.empty(max(sinks, 1), np.bool_)
        b_all = np.empty(n_eps, np.int64)
        b_ns = np.empty(n_eps, np.int64)
        b_bd = np.empty(n_bud, np.int64)
        bits = np.empty(2, xi.dtype)  # decode order keys to floats through this
        vals = bits.view(x.dtype)
        for i in range(row0, row1):
            xr = x[i]
            q = q_pos[i % n_rows_per_head]
            if causal:
                ln = max(0, min(n, q + 1))
                while ln > 0 and xi[i, ln - 1] == neg_inf:
                    ln -= 1
            else:
                ln = _row_extent(xi[i], n, q, mask, neg_inf)
            kmx, kmn, cnt = _scan(xi[i], 0, ln, mask, neg_inf)
            bits[0] = kmx ^ (mask if kmx < 0 else mask ^ mask)
            bits[1] = kmn ^ (mask if kmn < 0 else mask ^ mask)
            mx = np.float64(vals[0])
            mn = np.float64(vals[1])
            ints[i, 0] = cnt
            mass[i] = 0.0
            if cnt == 0:
                if write_w:
                    w_out[i, :] = 0.0
                ints[i, 1] = 0
                for t in range(n_eps):
                    k_all[i, t] = 0
                    k_ns[i, t] = 0
                for t in range(n_bud):
                    tail[i, t] = np.nan
                for t in range(9):
                    flt[i, t] = np.nan
                flt[i, 7] = -np.inf
                flt[i, 8] = -np.inf
                redo[i] = False
                continue
            nb = _num_bins(ln)  # bins for this row's own length (causal rows are shorter than n)
            span = min(mx - mn, dcap)
            inv_w = nb / span if span > 0.0 else 0.0
            z, s2, sed, s1, s11 = _stream(xr, ln, mx, inv_w, nb, e, bins)
            mass[i] = z
            if write_w:
                wr = w_out[i]
                for j in range(ln):
                    wr[j] = e[j]
                wr[ln:] = 0.0
            _histogram(e, bins, ln, nb, hm, hc)
            tol = _MARGIN_ULPS * (ln + 8) * _U64 * z
            # sink and local-window regions (sinks: columns < s0; local: (q - window, q])
            s0 = min(sinks, ln)
            m_s, n_s, d_s, dd_s = _region_sums(e, xr, mx, 0, s0)
            l0 = max(s0, q - window + 1)
            l1 = min(q + 1, ln)
            m_l, n_l, d_l, dd_l = _region_sums(e, xr, mx, l0, max(l0, l1))
            n_b = cnt - n_s - n_l
            ints[i, 1] = n_b
            flt[i, 0] = z * z / s2
            flt[i, 1] = math.log(z) - sed / z
            flt[i, 2] = m_s / z
            flt[i, 3] = m_l / z
            flt[i, 4] = max((z - m_s - m_l) / z, 0.0)
            if n_b >= 2:
                mean_d = (s1 - d_s - d_l) / n_b
                var = max((s11 - dd_s - dd_l) / n_b - mean_d * mean_d, 0.0)
                flt[i, 5] = mx + mean_d
                flt[i, 6] = math.sqrt(var)
            else:
                flt[i, 5] = np.nan
                flt[i, 6] = np.nan
            flt[i, 7] = mx
            flt[i, 8] = max(abs(mx), abs(mn))
            # prefix sums over bins (the masked bin nb + 1 is never part of them)
            cm[0] = 0.0
            cc[0] = 0
            for b in range(nb + 1):
                cm[b + 1] = cm[b] + hm[b]
                cc[b + 1] = cc[b] + hc[b]
            # boundary bin of every target
            bad = False
            for t in range(n_eps):
                thr = (1.0 - eps[t]) * z
                b_all[t] = _search_mass(cm, nb, thr)
                if m_s - thr > tol:
                    b_ns[t] = -2  # the sinks alone reach the target: k = |S|
                elif thr - m_s <= tol:
                    b_ns[t] = -2
                    bad = True
                else:
                    b_ns[t] = _search_ns(cm, nb, thr - m_s, e, bins, s0)
                if b_all[t] > nb or b_ns[t] > nb:
                    bad = True
            for t in range(n_bud):
                bb = min(budgets[t], cnt)
                b_bd[t] = -1
                if bb < cnt:
                    lo = 0
                    hi = nb + 1
                    while lo < hi:  # first bin with cc[b + 1] >= bb
                        mid = (lo + hi) // 2
                        if cc[mid + 1] >= bb:
                            hi = mid
                        else:
                            lo = mid + 1
                    b_bd[t] = lo
            if bad:
                redo[i] = True
                continue
            # gather the keys of the boundary bins, one contiguous segment per bin
            n_seg = 0
            seg_off[0] = 0
            for t in range(2 * n_eps + n_bud):
                if t < n_eps:
                    b = b_all[t]
                elif t < 2 * n_eps:
                    b = b_ns[t - n_eps]
                else:
                    b = b_bd[t - 2 * n_eps]
                    if b >= nb:
                        b = -1  # the overflow bin is bounded, not resolved (below)
                if b >= 0 and slot[b] < 0:
                    slot[b] = n_seg
                    seg_bin[n_seg] = b
                    seg_pos[n_seg] = seg_off[n_seg]
                    seg_off[n_seg + 1] = seg_off[n_seg] + hc[b]
                    n_seg += 1
            for j in range(ln):
                k = slot[bins[j]]
                if k >= 0:
                    gv[seg_pos[k]] = e[j]
                    seg_pos[k] += 1
            for k in range(n_seg):
                _sort_small(gv, seg_off[k], seg_off[k + 1])
            ok_all = True
            for t in range(n_eps):
                thr = (1.0 - eps[t]) * z
                b = b_all[t]
                k = slot[b]
                c, ok = _count_in_bin(gv[seg_off[k] : seg_off[k + 1]], cm[b], thr, tol, skip, 0, used)
                k_all[i, t] = min(cc[b] + c, cnt)
                ok_all = ok_all and ok
                if b_ns[t] == -2:
                    k_ns[i, t] = n_s
                    continue
                b = b_ns[t]
                k = slot[b]
                m_below, c_below = _sinks_below(e, bins, s0, b)
                n_skip = 0
                for j in range(s0):
                    if bins[j] == b:
                        skip[n_skip] = e[j]
                        n_skip += 1
                c, ok = _count_in_bin(gv[seg_off[k] : seg_off[k + 1]], m_s + cm[b] - m_below, thr,
                                      tol, skip, n_skip, used)
                k_ns[i, t] = n_s + min(cc[b] - c_below + c, cnt - n_s)
                ok_all = ok_all and ok
            for t in range(n_bud):
                b = b_bd[t]
                if b < 0:
                    tail[i, t] = 0.0
                    continue
                need = min(budgets[t], cnt) - cc[b]
                if b >= nb:
                    # overflow bin: all its keys lie more than dcap nats below the max, together
                    # < n e^-(ln n + 16) = 1.1e-7 of the mass; take the mean share
                    top = cm[b] + hm[b] * need / max(hc[b], 1)
                else:
                    k = slot[b]
                    top = cm[b]
                    for u in range(seg_off[k + 1] - 1, seg_off[k + 1] - 1 - need, -1):
                        top += gv[u]
                tail[i, t] = max(1.0 - top / z, 0.0)
            for k in range(n_seg):
                slot[seg_bin[k]] = -1
            redo[i] = not ok_all

    return _rows


_rows = _compile(_sources_digest())


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def _pool(threads: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE != threads:
        if _POOL is not None:
            _POOL.shutdown(wait=True)
        _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="attn-audit-rows")
        _POOL_SIZE = threads
    return _POOL


def split_rows(kernel: Callable[[int, int], None], rows: int, threads: int) -> None:
    """Run ``kernel(row0, row1)`` over rows [0, rows) on up to ``threads`` threads (nogil
    kernels): chunks handed out on demand (rows differ in length), the calling thread works too."""
    threads = max(1, min(threads, rows // 64 or 1))
    if threads == 1 or rows == 0:
        kernel(0, rows)
        return
    step = max(32, -(-rows // (4 * threads)))
    starts = iter(range(0, rows, step))  # next() on it is atomic under the GIL

    def work() -> None:
        for a in starts:
            kernel(a, min(rows, a + step))

    futures = [_pool(threads - 1).submit(work) for _ in range(threads - 1)]
    work()
    for f in futures:
        f.result()


def rows_kernel(
    x: np.ndarray,
    q_pos: np.ndarray,
    rows_per_head: int,
    eps: tuple[float, ...],
    budgets: tuple[int, ...],
    sinks: int,
    window: int,
    threads: int = 1,
    weights_out: np.ndarray | None = None,
    causal: bool = False,
) -> dict[str, np.ndarray]:
    """Per-row metrics of x (rows, n), float32 or float64 C-contiguous, ``-inf`` = masked.

    Row i is query position ``q_pos[i % rows_per_head]`` (q_pos: int64 (rows_per_head,)).
    Returns numpy arrays with leading dimension ``rows``: ``n_keys``, ``n_bulk`` (int64),
    ``k_eps``, ``k_eps_sinks`` (int64 (rows, E)), ``tail_mass`` (float64 (rows, B)), the
    float64 fields named in :data:`FLT_NAMES`, ``mass`` (float64, sum of exp(s - row max))
    and ``redo`` (bool: rows the caller must recompute with the sort-based reference).
    ``weights_out`` (rows, n), if given, receives the unnormalised attention weights
    exp(s - row max) (0 on masked keys), so that ``weights_out / mass`` is the softmax.
    ``causal``: keys j > q_pos of the row are disallowed whatever x holds (no need to mask them).
    """
    rows, n = x.shape
    from attn_audit.rows.spec import bin_span_cap, num_bins

    nb = num_bins(n)
    dcap = bin_span_cap(n)
    ints = np.empty((rows, N_INT), np.int64)
    k_all = np.empty((rows, len(eps)), np.int64)
    k_ns = np.empty((rows, len(eps)), np.int64)
    tail = np.empty((rows, len(budgets)), np.float64)
    flt = np.empty((rows, N_FLT), np.float64)
    redo = np.zeros(rows, np.bool_)
    mass = np.empty(rows, np.float64)
    eps_a = np.asarray(eps, dtype=np.float64)
    bud_a = np.asarray(budgets, dtype=np.int64)
    q = np.ascontiguousarray(q_pos, dtype=np.int64)
    ity = np.int32 if x.dtype == np.float32 else np.int64
    xi = x.view(ity)
    neg_inf = np.array([-np.inf], dtype=x.dtype).view(ity)[0]
    args = (x, xi, ity(np.iinfo(ity).max), neg_inf, q, rows_per_head)
    write_w = weights_out is not None
    w_out = weights_out if write_w else np.empty((1, 1), np.float32)
    rest = (eps_a, bud_a, int(sinks), int(window), nb, dcap, ints, k_all, k_ns, tail, flt, redo,
            write_w, w_out, mass, bool(causal))
    split_rows(lambda a, b: _rows(*args, a, b, *rest), rows, threads)
    out = {"n_keys": ints[:, 0], "n_bulk": ints[:, 1], "k_eps": k_all, "k_eps_sinks": k_ns,
           "tail_mass": tail, "redo": redo, "mass": mass}
    for j, name in enumerate(FLT_NAMES):
        out[name] = flt[:, j]
    return out
