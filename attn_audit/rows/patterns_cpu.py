"""The CPU kernel of :func:`attn_audit.rows.patterns.pattern_rows`, compiled with numba.

The torch formulation of :func:`~attn_audit.rows.patterns.pattern_rows` makes a dozen passes over
float64 copies of the (G, R, n) probabilities (softmax, padding, a full sort for ``row-topk``,
the rank gathers of ``vertical-slash``): on a CPU it cost 2.4 times the model's forward in the
default audit. This kernel does the same work one row at a time, in one pass over the row's
float32 scores, with the row in cache:

1. the float64 softmax over the row's allowed keys (up to its last allowed key);
2. the block masses ``bm`` (nb blocks of ``block`` keys);
3. each pattern's kept-mass curve at levels 0..nb, exactly as the torch code defines it (the
   ``row-topk`` sort covers the allowed keys only), and the smallest level reaching
   ``1 − eps`` per eps.

The results equal the torch path to float64 rounding (sums are taken in another order); the
tests compare both, and both with a key-by-key brute force (tests/rows/test_patterns.py).
Rows are split over threads (``nogil`` kernel driven from a thread pool), as in
:mod:`attn_audit.rows.cpu`.
"""

from __future__ import annotations

import numba
import numpy as np

from attn_audit.rows.cpu import split_rows
from attn_audit.rows.cpu_stages import _exp_neg
from attn_audit.rows.patterns import PATTERNS

__all__ = ["PATTERN_SLOTS", "pattern_kernel"]

PATTERN_SLOTS = PATTERNS
"""The patterns in the order of the kernel's ``want`` flags and output slots."""


_BUCKETS = 1024  # 16 per octave: 64 octaves below the row's largest probability, then one more


@numba.njit(nogil=True, cache=True)
def _top_sums(p, pbits, ln, block, nb, curve, idx, cnt, off, buf):  # type: ignore[no-untyped-def]
    """curve[lv] = the sum of the ``min(lv·block, ln)`` largest of p[:ln] (p >= 0), lv = 1..nb.

    A bucket sort by the top 16 bits of the float64 (sign, exponent, 4 mantissa bits: monotone
    for p >= 0), relative to the row's largest bucket (values more than 64 octaves below share
    the last bucket); only the buckets a target rank cuts are sorted. pbits is p's int64 view;
    idx (n,), cnt / off (_BUCKETS,) and buf (n,) are scratch.
    """
    if ln == 0:
        for lv in range(1, nb + 1):
            curve[lv] = 0.0
        return
    kmax = pbits[0] >> 48
    for j in range(1, ln):
        kmax = max(kmax, pbits[j] >> 48)
    for b in range(_BUCKETS):
        cnt[b] = 0
    for j in range(ln):
        d = min(kmax - (pbits[j] >> 48), _BUCKETS - 1)
        idx[j] = d
        cnt[d] += 1
    o = 0
    for b in range(_BUCKETS):
        off[b] = o
        o += cnt[b]
    for j in range(ln):  # scatter in bucket order (off[] becomes each bucket's end)
        d = idx[j]
        buf[off[d]] = p[j]
        off[d] += 1
    acc = 0.0
    pos = 0
    b = 0
    for lv in range(1, nb + 1):
        m = min(lv * block, ln)
        while off[b] < m:  # the bucket holding rank m - 1
            b += 1
        end = off[b]
        start = end - cnt[b]
        if m < end and pos <= start:  # the target cuts this bucket: order it (once), descending
            buf[start:end].sort()
            lo, hi = start, end - 1
            while lo < hi:  # reverse in place (no allocation in the row loop)
                t = buf[lo]
                buf[lo] = buf[hi]
                buf[hi] = t
                lo += 1
                hi -= 1
        while pos < m:
            acc += buf[pos]
            pos += 1
        curve[lv] = acc


@numba.njit(nogil=True, cache=True)
def _pattern_rows(x, q_pos, per_head, row0, row1, mask_after, block, nb, sinks, causal, want,
                  order, col_level, diag_level, thr, kept, need):  # type: ignore[no-untyped-def]
    """Rows [row0, row1) of the scores x (rows, n); row i is query ``q_pos[i % per_head]`` of
    group ``i // per_head``.

    order: int64 (G, nqb, nb), the block-topk key-block order per query block;
    col_level / diag_level: int64 (G, n_vs), the vertical-slash level at which each key column /
    offset enters (rank // block + 1);
    kept: float64 (5, rows, nb + 1) and need: int64 (5, rows, E), written for the wanted slots.
    """
    n = x.shape[1]
    npad = nb * block
    n_eps = thr.shape[0]
    nqb = order.shape[1]
    n_vs = col_level.shape[1]
    p = np.zeros(npad)  # the row's probabilities, valid up to its ln
    srt = np.empty(npad)
    bm = np.empty(nb)
    bsrt = np.empty(nb)
    by_w = np.empty(nb + 1)
    curve = np.empty(nb + 1)
    pbits = p.view(np.int64)
    bk_idx = np.empty(npad, np.int64)
    bk_cnt = np.empty(_BUCKETS, np.int64)
    bk_end = np.empty(_BUCKETS, np.int64)
    for i in range(row0, row1):
        q = q_pos[i % per_head]
        g = i // per_head
        ln = min(n, q + 1) if mask_after else n
        while ln > 0 and not (x[i, ln - 1] > -np.inf):
            ln -= 1
        mx = -np.inf
        for j in range(ln):
            v = np.float64(x[i, j])
            if v > mx:
                mx = v
        z = 0.0
        for j in range(ln):  # exp within 2 ulp (rows.cpu_stages), vectorised; below e^-700: 0
            v = np.float64(x[i, j])
            e = _exp_neg(max(v - mx, -700.0)) if v > -np.inf else 0.0
            p[j] = e
            z += e
        if z > 0.0:
            for j in range(ln):
                p[j] = p[j] / z
        else:  # no allowed key: the softmax is NaN, taken as 0 (torch's nan_to_num)
            ln = 0
        # p is read up to ln only (stale values lie beyond); blocks past the row's keys hold 0
        nbl = (ln + block - 1) // block
        for j in range(ln, nbl * block):
            p[j] = 0.0
        for b in range(nbl):
            s = 0.0
            for j in range(b * block, (b + 1) * block):
                s += p[j]
            bm[b] = s
        for b in range(nbl, nb):
            bm[b] = 0.0
        qb = q // block
        for slot in range(5):
            if not want[slot]:
                continue
            curve[0] = 0.0
            if slot == 0:  # row-topk: the b*block largest probabilities
                _top_sums(p, pbits, ln, block, nb, curve, bk_idx, bk_cnt, bk_end, srt)
            elif slot == 1:  # block-oracle: the b heaviest key blocks
                for b in range(nb):
                    bsrt[b] = bm[b]
                bsrt.sort()
                acc = 0.0
                for lv in range(1, nb + 1):
                    acc += bsrt[nb - lv]
                    curve[lv] = acc
            elif slot == 2:  # block-topk: the estimated order of the row's query block
                qq = min(qb, nqb - 1)
                acc = 0.0
                for lv in range(1, nb + 1):
                    acc += bm[order[g, qq, lv - 1]]
                    curve[lv] = acc
            elif slot == 3:  # streaming: a window of w blocks ending at the row's block (+ sink block)
                for w in range(nb + 1):
                    by_w[w] = 0.0
                enter0 = nb
                for kb in range(nb):
                    dist = qb - kb
                    if not causal and dist < 0:
                        dist = -dist
                    enter = dist + 1 if dist >= 0 else nb
                    if kb == 0:
                        enter0 = enter
                    by_w[min(enter, nb)] += bm[kb]
                acc = 0.0
                for w in range(nb + 1):
                    acc += by_w[w]
                    curve[w] = acc + (bm[0] if sinks > 0 and enter0 > w else 0.0)
            else:  # vertical-slash: the top b*block columns and diagonals
                for w in range(nb + 1):
                    by_w[w] = 0.0
                for j in range(min(n_vs, ln)):  # keys from ln on carry no mass
                    off = min(max(q - j, 0), n_vs - 1)
                    by_w[min(col_level[g, j], diag_level[g, off], nb)] += p[j]
                acc = 0.0
                for w in range(nb + 1):
                    acc += by_w[w]
                    curve[w] = acc
            for lv in range(nb + 1):
                kept[slot, i, lv] = curve[lv]
            for e in range(n_eps):
                c = 0
                for lv in range(nb + 1):  # the curves are non-decreasing in the level
                    if curve[lv] < thr[e]:
                        c += 1
                need[slot, i, e] = c


def pattern_kernel(x: np.ndarray, q_pos: np.ndarray, per_head: int, eps: tuple[float, ...], block: int,
                   nb: int, sinks: int, causal: bool, patterns: tuple[str, ...], mask_after: bool,
                   order: np.ndarray | None, col_rank: np.ndarray | None, diag_rank: np.ndarray | None,
                   threads: int = 1) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Kept-mass curves and needed levels of the patterns on the rows of ``x``.

    x: (rows, n) float32 or float64 C-contiguous scores, ``-inf`` = disallowed; row i is query
    ``q_pos[i % per_head]`` (q_pos: int64 (per_head,)) of group ``i // per_head``.
    order: int64 (G, nqb, nb) (block-topk), col_rank / diag_rank: int64 (G, n_seq)
    (vertical-slash); a pattern whose input is None is not computed.
    Returns (kept, need): per pattern float64 (rows, nb + 1) and int64 (rows, E).
    """
    rows = x.shape[0]
    want = np.array([name in patterns for name in PATTERN_SLOTS])
    want[2] &= order is not None
    want[4] &= col_rank is not None and diag_rank is not None
    kept = np.empty((5, rows, nb + 1))
    need = np.empty((5, rows, len(eps)), np.int64)
    dummy = np.zeros((1, 1, max(nb, 1)), np.int64)
    order_a = np.ascontiguousarray(order, dtype=np.int64) if order is not None else dummy
    # the level at which a column / offset enters (a key enters with the first of the two)
    cr = np.asarray(col_rank, dtype=np.int64) // block + 1 if want[4] else dummy[0]
    dr = np.asarray(diag_rank, dtype=np.int64) // block + 1 if want[4] else dummy[0]
    thr = np.array([1.0 - e for e in eps], dtype=np.float64)
    args = (x, np.ascontiguousarray(q_pos, dtype=np.int64), per_head)
    rest = (bool(mask_after), int(block), int(nb), int(sinks), bool(causal), want, order_a, cr, dr, thr,
            kept, need)
    split_rows(lambda a, b: _pattern_rows(*args, a, b, *rest), rows, threads)
    names = [name for s, name in enumerate(PATTERN_SLOTS) if want[s]]
    return ({nm: kept[PATTERN_SLOTS.index(nm)] for nm in names},
            {nm: need[PATTERN_SLOTS.index(nm)] for nm in names})
