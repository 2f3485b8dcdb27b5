"""Simulated Gaussian softmax rows and their exact k_eps: the kernel of the finite-n Monte Carlo.

docs/methods.md §5.3 (the finite-n Monte Carlo), §2.1 (k_eps). Pure numpy/scipy (no torch).
:func:`_stratified_rows_t` draws rows of n i.i.d. N(0, 1) scores (row maximum stratified,
cached per (n, draws, seed)); :func:`_k_eps_columns` counts k_eps of the softmax of
``sigma * z`` for many sigmas and eps at once, bit-identical to the cumulative-sum definition
:func:`_k_eps_sorted`. :mod:`attn_audit.theory.finite_n` takes medians over the draws.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from numpy.typing import NDArray
from scipy import special as spc

FloatArray = NDArray[np.float64]


def _k_eps_sorted(sorted_desc: FloatArray, sigmas: FloatArray, eps: float) -> FloatArray:
    """Exact k_eps of softmax rows ``sigma * z`` for pre-sorted standard scores (reference).

    This is the definition that :func:`_k_eps_columns` reproduces bit for bit (tests check
    it); it materialises every cumulative sum and is too slow for the audit.

    Args:
        sorted_desc: standard normal draws sorted descending with the row max shifted to
            0, shape ``(draws, n)``.
        sigmas: logit scales, shape ``(m,)``.
        eps: tail-mass budget.

    Returns:
        k_eps per (sigma, draw), shape ``(m, draws)``.
    """
    w = np.exp(sigmas[:, None, None] * sorted_desc[None, :, :])  # (m, draws, n), max = 1
    cum = np.cumsum(w, axis=-1)
    target = (1.0 - eps) * cum[..., -1:]
    return np.asarray((cum < target).sum(axis=-1) + 1.0, dtype=np.float64)


# _k_eps_columns works on (sigma, draw) columns, _PASS_COLS at a time (a 64 KB running-sum
# vector: a tile of _TILE_ROWS rows stays in L2), and keeps the running sums every
# _TILE_ROWS rows, or fewer so that at most _MAX_CHECKPOINTS are kept (bounded memory at
# long n).
_PASS_COLS = 8192
_TILE_ROWS = 8
_MAX_CHECKPOINTS = 256


def _k_eps_columns(zt: FloatArray, sigmas: FloatArray, eps: FloatArray) -> FloatArray:
    """Same values as :func:`_k_eps_sorted` for several eps at once, without its memory.

    Softmax weights ``exp(sigma * z)`` are summed row by row (in key order, so every partial
    sum is bit-identical to ``np.cumsum`` along the keys: k_eps is a count of partial sums
    below ``(1 - eps) * total`` and must not move with rounding). Only the partial sums at
    block ends are kept; once the total is known, a binary search over them finds the block
    where each eps target is crossed, and the partial sums of that one block are recomputed
    from its start with the same operations.

    Args:
        zt: sorted standard scores, key-major: ``zt[j, d]`` is the j-th largest of draw d
            minus the draw's max, shape ``(n, draws)``, C-contiguous.
        sigmas: logit scales, shape ``(m,)``.
        eps: tail-mass budgets, shape ``(E,)``.

    Returns:
        k_eps per (eps, sigma, draw), shape ``(E, m, draws)``.
    """
    n, draws = zt.shape
    m, n_eps = sigmas.size, eps.size
    out = np.empty((n_eps, m, draws))
    if m == 0:
        return out
    per_pass = max(1, _PASS_COLS // draws)
    tile_rows = _TILE_ROWS
    # rows per block (between kept partial sums), a multiple of tile_rows
    blk = tile_rows * -(-n // (tile_rows * _MAX_CHECKPOINTS))
    n_blk = -(-n // blk)
    zflat = zt.ravel()
    keep = (1.0 - eps)[:, None]
    # Buffers reused by every pass (fresh pages would cost a page fault each).
    cap = min(m, per_pass) * draws
    tile_buf, ckpt_buf, total_buf = np.empty(tile_rows * cap), np.empty(n_blk * cap), np.empty(cap)
    for a in range(0, m, per_pass):
        sig = sigmas[a : a + per_pass]
        cols = sig.size * draws
        s_col = np.repeat(sig, draws)  # sigma of each (sigma, draw) column
        d_col = np.tile(np.arange(draws), sig.size)  # draw of each column
        tile = tile_buf[: tile_rows * cols].reshape(tile_rows, cols)
        ckpt = ckpt_buf[: n_blk * cols].reshape(n_blk, cols)
        total = total_buf[:cols]
        total.fill(0.0)
        rows = list(tile)
        for j0 in range(0, n, tile_rows):
            r = min(tile_rows, n - j0)
            x = tile[:r]
            # z of rows j0.. for every column, times its sigma (contiguous: a broadcast
            # multiply over the 101-long draw axis is several times slower)
            x.reshape(r, sig.size, draws)[...] = zt[j0 : j0 + r, None, :]
            np.multiply(x, s_col, out=x)
            np.exp(x, out=x)
            for i in range(r):
                np.add(total, rows[i], out=total)
            if (j0 + r) % blk == 0 or j0 + r == n:
                ckpt[(j0 + r - 1) // blk] = total  # partial sum at the block's last row
        target = keep * total  # (E, cols)
        col = np.arange(cols)
        ck = ckpt.ravel()
        # pos = number of block ends below the target (< n_blk: the last one is the total)
        pos = np.zeros(target.shape, dtype=np.int64)
        step = 1 << max(0, (n_blk - 1).bit_length() - 1)
        while step and n_blk > 1:
            cand = np.minimum(pos + step, n_blk - 1)
            pos = np.where(ck[(cand - 1) * cols + col] < target, cand, pos)
            step >>= 1
        run = np.where(pos > 0, ck[np.maximum(pos - 1, 0) * cols + col], 0.0)
        count = pos * blk
        base = pos * (blk * draws) + d_col
        last = (n - 1) * draws + d_col
        for r in range(blk):
            # rows past the end repeat the last one: the sum is >= target there already
            x = zflat[np.minimum(base + r * draws, last)]
            np.multiply(x, s_col, out=x)
            np.exp(x, out=x)
            run += x
            count += run < target
        out[:, a : a + sig.size, :] = (count + 1.0).reshape(n_eps, sig.size, draws)
    return out


def _max_stratified_rows(gen: np.random.Generator, n: int, draws: int) -> FloatArray:
    """``draws`` rows of n i.i.d. N(0, 1), sorted descending and shifted so the max is 0.

    The row maximum (which dominates the k_eps spread at large sigma) is stratified: its
    CDF level is (j + U_j) / draws for draw j, and the other n - 1 values are drawn i.i.d.
    below it. The rows are still exact draws of n i.i.d. normals (jointly stratified), and
    the Monte Carlo sd of the median k halves at sigma >~ 3.

    Returns:
        Shape ``(draws, n)``.
    """
    u = (np.arange(draws) + gen.random(draws)) / draws
    q = -np.expm1(np.log(u) / n)  # P(max > m) = 1 - u^(1/n), kept accurate for large n
    top = -spc.ndtri(q)
    rest = spc.ndtri(gen.random((draws, n - 1)) * (1.0 - q)[:, None])
    z = np.sort(rest, axis=1)[:, ::-1]
    return np.concatenate([np.zeros((draws, 1)), z - top[:, None]], axis=1)


# Simulated rows per (n, draws, seed), key-major (see _k_eps_columns), least recently used
# first; bounded in bytes.
_ROWS_CACHE: OrderedDict[tuple[int, int, int], FloatArray] = OrderedDict()
_ROWS_CACHE_MAX_BYTES = 64 << 20


def _stratified_rows_t(n: int, draws: int, seed: int) -> FloatArray:
    """The transposed rows of :func:`_max_stratified_rows` drawn from rng ``[seed, n, draws]``.

    Returns:
        Shape ``(n, draws)``, C-contiguous, read-only (shared by the cache).
    """
    key = (n, draws, seed)
    zt = _ROWS_CACHE.get(key)
    if zt is not None:
        _ROWS_CACHE.move_to_end(key)
        return zt
    z = _max_stratified_rows(np.random.default_rng([seed, n, draws]), n, draws)
    zt = np.ascontiguousarray(z.T)
    zt.flags.writeable = False
    _ROWS_CACHE[key] = zt
    size = sum(v.nbytes for v in _ROWS_CACHE.values())
    while size > _ROWS_CACHE_MAX_BYTES and len(_ROWS_CACHE) > 1:
        size -= _ROWS_CACHE.popitem(last=False)[1].nbytes
    return zt
