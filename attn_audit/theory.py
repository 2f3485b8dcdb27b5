"""Gaussian-score predictions of k_eps, the norm bound R, and n^C fits (theory.md §3, §5, §6).

Pure numpy/scipy (no torch). Conventions:

* ``k_eps`` is the mass-based count of theory.md §2.1: the smallest k whose top-k softmax
  mass is >= 1 - eps. ``n`` is always the per-row key count n_i (§8), never the context.
* ``sigma`` is the standard deviation of the row's (bulk) logits, in logit units.
* Every function broadcasts its array arguments with numpy rules and returns float arrays
  of the broadcast shape (0-d arrays for scalar input).

Which variant each function computes (theory.md §0 rule):

* :func:`k_pred_plain`: Tzachristas et al.'s large-n rule k/n = Phi_c(sigma + Phi^-1(eps))
  [C formula]; underestimates k for sigma >~ 0.5 sqrt(2 ln n) [D].
* :func:`k_pred_finite_n`: the finite-n Monte Carlo fix of §5.3 [D].
* :func:`k_pred_sink_aware`: the sink- and local-aware bound of §5.3 [D].
* :func:`r_variants`: R_F = c_s B^2 ||W||_F (v2's formula [S] with the model's own scale
  c_s) and the RoPE-robust R_op = c_s B^2 ||W_Q||_2 ||W_K||_2, for B = max and p99.9 input
  norms.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special as spc

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

_CHUNK_ELEMS = 4_000_000  # elements per Monte Carlo block (~32 MB of float64)

# scipy.stats' normal law without importing scipy.stats (~1 s per audit): the special
# functions its methods call, with the same results bit for bit (also at 0, 1, +-inf, NaN).


def _norm_sf(x: ArrayLike) -> FloatArray:
    """Standard normal survival function; reproduces ``scipy.stats.norm.sf`` (``ndtr(-x)``)."""
    return np.asarray(spc.ndtr(-np.asarray(x, dtype=np.float64)))


def _norm_ppf(q: ArrayLike) -> FloatArray:
    """Standard normal quantile; reproduces ``scipy.stats.norm.ppf`` (``ndtri(q)``)."""
    return np.asarray(spc.ndtri(np.asarray(q, dtype=np.float64)))


def k_pred_plain(n: ArrayLike, sigma: ArrayLike, eps: ArrayLike) -> FloatArray:
    """Large-n Gaussian prediction of k_eps: ``n * Phi_c(sigma + Phi^-1(eps))`` (§5.1).

    Args:
        n: keys per row, any shape.
        sigma: logit standard deviation per row (>= 0), broadcastable with ``n``.
        eps: tail-mass budget in (0, 1), broadcastable.

    Returns:
        Predicted k (real-valued), broadcast shape. It does not depend on the logit mean.
    """
    n_, s_, e_ = (np.asarray(a, dtype=np.float64) for a in (n, sigma, eps))
    return np.asarray(n_ * _norm_sf(s_ + _norm_ppf(e_)), dtype=np.float64)


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


# Median k_eps / n per Monte Carlo cell, keyed by (n, eps, draws, seed, sigma_step): sorted
# sigma grid indices and their values. Every cell regenerates the same draws from
# (seed, n, draws), so the cached values do not depend on which grid points were computed
# together.
_KAPPA_CACHE: dict[tuple[int, float, int, int, float], tuple[NDArray[np.int64], FloatArray]] = {}
_KAPPA_CACHE_MAX_CELLS = 20_000


def _cell_kappa(
    n: int, eps: FloatArray, codes: NDArray[np.int64], draws: int, seed: int, step: float
) -> FloatArray:
    """Median over ``draws`` stratified rows of k_eps / n at sigma = code * step.

    Args:
        n: keys in the row.
        eps: tail-mass budgets in (0, 1), shape ``(E,)``.
        codes: sigma grid indices, shape ``(m,)``.
        draws: simulated rows.
        seed: seed of the draws (combined with n and draws).
        step: sigma grid spacing.

    Returns:
        Shape ``(E, m)``.
    """
    zt = _stratified_rows_t(n, draws, seed)
    k = _k_eps_columns(zt, codes.astype(np.float64) * step, eps)
    return np.asarray(np.median(k, axis=-1) / n, dtype=np.float64)


def _unique_inverse(keys: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``np.unique(keys, return_inverse=True)`` for non-negative keys, via a mask when the
    key range is small (no sort)."""
    top = int(keys.max()) + 1 if keys.size else 0
    if top > 8 * keys.size + 4096:
        uniq, inv = np.unique(keys, return_inverse=True)
        return uniq, inv.reshape(keys.shape)
    seen = np.zeros(top, dtype=bool)
    seen[keys] = True
    uniq = np.flatnonzero(seen)
    slot = np.cumsum(seen) - 1
    return uniq.astype(np.int64), slot[keys].astype(np.int64)


def _kappa_lookup(
    cells: NDArray[np.int64],
    eps: FloatArray,
    codes: NDArray[np.int64],
    draws: int,
    seed: int,
    step: float,
) -> tuple[FloatArray, FloatArray]:
    """Cell medians k / n at sigma codes ``codes`` and ``codes + 1``, computing missing ones.

    Args:
        cells: n grid cell of each query, shape ``(q,)``.
        eps: tail-mass budget of each query in (0, 1), shape ``(q,)``.
        codes: lower sigma grid index of each query (>= 0), shape ``(q,)``.

    Returns:
        ``(kappa at codes, kappa at codes + 1)``, each shape ``(q,)``.
    """
    if len(_KAPPA_CACHE) > _KAPPA_CACHE_MAX_CELLS:
        _KAPPA_CACHE.clear()
    cell_u, cell_i = _unique_inverse(cells)
    eps_u, eps_i = np.unique(eps, return_inverse=True)
    c_min = int(codes.min())
    span = int(codes.max()) - c_min + 2
    group = cell_i * eps_u.size + eps_i.reshape(cell_i.shape)
    key = group * span + (codes - c_min)
    uniq, inv = _unique_inverse(np.concatenate([key, key + 1]))
    u_group, u_code = np.divmod(uniq, span)
    u_code += c_min
    bounds = np.flatnonzero(np.diff(u_group)) + 1  # uniq is sorted: groups are runs
    starts, ends = np.r_[0, bounds], np.r_[bounds, uniq.size]

    def table(g: int) -> tuple[tuple[int, float, int, int, float], NDArray[np.int64], FloatArray]:
        tkey = (int(cell_u[g // eps_u.size]), float(eps_u[g % eps_u.size]), draws, seed, step)
        have = _KAPPA_CACHE.get(tkey, (np.empty(0, dtype=np.int64), np.empty(0)))
        return tkey, have[0], have[1]

    # Codes missing per cell (union over its eps), then one pass per cell for all of them.
    missing: dict[int, tuple[set[int], list[NDArray[np.int64]]]] = {}
    for s, e in zip(starts, ends, strict=True):
        g = int(u_group[s])
        _, have_c, _ = table(g)
        want = u_code[s:e]
        absent = want[~np.isin(want, have_c, assume_unique=True)]
        if absent.size:
            eps_set, parts = missing.setdefault(g // eps_u.size, (set(), []))
            eps_set.add(g % eps_u.size)
            parts.append(absent)
    for ci, (eps_set, parts) in missing.items():
        n_cell = int(cell_u[ci])
        todo = np.unique(np.concatenate(parts))
        e_list = sorted(eps_set)
        med = _cell_kappa(n_cell, eps_u[e_list], todo, draws, seed, step)  # (E', m)
        for row, ei in enumerate(e_list):
            tkey, have_c, have_v = table(ci * eps_u.size + ei)
            all_c, first = np.unique(np.concatenate([have_c, todo]), return_index=True)
            _KAPPA_CACHE[tkey] = (all_c, np.concatenate([have_v, med[row]])[first])
    vals = np.empty(uniq.size)
    for s, e in zip(starts, ends, strict=True):
        _, have_c, have_v = table(int(u_group[s]))
        vals[s:e] = have_v[np.searchsorted(have_c, u_code[s:e])]
    out = vals[inv]
    return out[: key.size], out[key.size :]


def _n_cells(
    n: FloatArray, per_octave: int | None
) -> tuple[NDArray[np.int64], NDArray[np.int64], FloatArray]:
    """Grid cells bracketing each n and the log-n interpolation weight of the upper one.

    Exact cells for n <= 64 (or always when ``per_octave`` is None); above, the geometric
    grid round(2^(j / per_octave)).
    """
    ni = np.rint(n).astype(np.int64)
    if per_octave is None:
        return ni, ni, np.zeros(n.shape)
    j = np.floor(np.log2(np.maximum(n, 1.0)) * per_octave + 1e-9)
    lo = np.rint(2.0 ** (j / per_octave)).astype(np.int64)
    hi = np.rint(2.0 ** ((j + 1) / per_octave)).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(hi > lo, np.log(n / lo) / np.log(hi / lo), 0.0)
    exact = (ni <= 64) | (ni == lo)
    lo, hi = np.where(exact, ni, lo), np.where(exact, ni, hi)
    return lo, hi, np.where(exact, 0.0, np.clip(t, 0.0, 1.0))


def k_pred_finite_n(
    n: ArrayLike,
    sigma: ArrayLike,
    eps: ArrayLike,
    draws: int = 101,
    rng: np.random.Generator | int | None = None,
    sigma_step: float = 0.02,
    n_per_octave: int | None = 16,
) -> FloatArray:
    """Finite-n Monte Carlo prediction of k_eps (§5.3): median over ``draws`` simulated rows.

    For a row with n keys and spread sigma, ``draws`` rows of n i.i.d. N(0, sigma^2) logits
    are drawn, k_eps of their softmax is computed exactly, and the median is returned. This
    removes the large-sigma underestimation of :func:`k_pred_plain`. The draws stratify the
    row maximum (see :func:`_max_stratified_rows`); with the default 101 draws the Monte
    Carlo relative sd of the prediction is ~0.5% at sigma = 1, ~1% at 2, ~3% at 3 and ~5% at
    4 (measured at n = 1024).

    Speed (so that every sampled row of every head can be predicted): the median k / n is
    computed on cells of a (n, sigma) grid and cached for the process, then interpolated:
    linearly in sigma between multiples of ``sigma_step``, and linearly in log n between the
    geometric n grid round(2^(j / n_per_octave)) (exact n up to 64, or always with
    ``n_per_octave=None``). Within a cell the same draws serve every sigma (common random
    numbers: monotone in sigma). The interpolation error is far below the Monte Carlo error
    (k / n varies by < 1% between neighbouring n cells). Predictions are a deterministic
    function of (n, sigma, eps, draws, seed).

    Args:
        n: keys per row (>= 1), any shape.
        sigma: logit standard deviation per row, broadcastable.
        eps: tail-mass budget, broadcastable; eps >= 1 gives 0 and eps <= 0 gives n.
        draws: simulated rows per cell (odd keeps the cell medians integers).
        rng: seed, or a generator from which one seed is drawn (default: seed 0).
        sigma_step: sigma grid spacing.
        n_per_octave: n grid density; None computes at every distinct n exactly.

    Returns:
        Predicted k (real-valued), broadcast shape; NaN where n < 1 or sigma/eps are not
        finite.
    """
    if isinstance(rng, np.random.Generator):
        seed = int(rng.integers(2**31))
    else:
        seed = int(rng) if rng is not None else 0
    n_b, s_b, e_b = np.broadcast_arrays(
        np.asarray(n, dtype=np.float64),
        np.abs(np.asarray(sigma, dtype=np.float64)),
        np.asarray(eps, dtype=np.float64),
    )
    out = np.full(n_b.shape, np.nan)
    valid = (n_b >= 1) & np.isfinite(n_b) & np.isfinite(s_b) & np.isfinite(e_b)
    out[valid & (e_b >= 1)] = 0.0
    out[valid & (e_b <= 0)] = n_b[valid & (e_b <= 0)]
    todo = valid & (e_b > 0) & (e_b < 1)
    if not todo.any():
        return out
    nn, ss, ee = n_b[todo], s_b[todo], e_b[todo]
    x = ss / sigma_step
    c_lo = np.floor(x).astype(np.int64)
    w_s = x - c_lo
    n_lo, n_hi, w_n = _n_cells(nn, n_per_octave)
    at_lo, at_hi = _kappa_lookup(
        np.concatenate([n_lo, n_hi]),
        np.concatenate([ee, ee]),
        np.concatenate([c_lo, c_lo]),
        draws,
        seed,
        sigma_step,
    )
    log_kappa = np.zeros(nn.size)
    for half, weight in ((slice(0, nn.size), 1.0 - w_n), (slice(nn.size, None), w_n)):
        kappa = (1.0 - w_s) * at_lo[half] + w_s * at_hi[half]  # linear in sigma
        log_kappa += weight * np.log(kappa)  # then linear in log n
    out[todo] = nn * np.exp(log_kappa)
    return out


def k_pred_sink_aware(
    n_bulk: ArrayLike,
    n_sink_local: ArrayLike,
    sigma_bulk: ArrayLike,
    bulk_mass: ArrayLike,
    eps: ArrayLike,
) -> FloatArray:
    """Sink- and local-aware prediction of k_eps (§5.3).

    Keeps the sink and local keys S u L whole; the bulk may then lose eps of the total, i.e.
    ``eps_B = eps / m_B`` of its own mass:
    ``k = |S| + |L| + n_B * Phi_c(sigma_B + Phi^-1(min(eps_B, 1)))`` (0 bulk keys once
    eps_B >= 1). Since the global top-k is the best set of its size, measured k_eps <= this
    value up to the Gaussian approximation.

    Args:
        n_bulk: bulk keys per row, any shape.
        n_sink_local: |S| + |L| per row, broadcastable.
        sigma_bulk: bulk logit standard deviation, broadcastable.
        bulk_mass: softmax mass m_B of the bulk keys in [0, 1], broadcastable.
        eps: tail-mass budget, broadcastable.

    Returns:
        Predicted k, broadcast shape.
    """
    nb, ns, sb, mb, e = (
        np.asarray(a, dtype=np.float64) for a in (n_bulk, n_sink_local, sigma_bulk, bulk_mass, eps)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        eps_b = np.where(mb > 0, e / mb, np.inf)
    k = ns + nb * _norm_sf(sb + _norm_ppf(np.minimum(eps_b, 1.0)))
    return np.asarray(k, dtype=np.float64)


def large_sigma_regime(sigma: ArrayLike, n: ArrayLike) -> BoolArray:
    """Flag rows where the plain prediction is biased low: ``sigma > 0.6 sqrt(2 ln n)`` (§5.1).

    Args:
        sigma: logit standard deviation, any shape.
        n: keys per row, broadcastable.

    Returns:
        Boolean array of the broadcast shape.
    """
    s = np.asarray(sigma, dtype=np.float64)
    nn = np.maximum(np.asarray(n, dtype=np.float64), 1.0)
    return np.asarray(s > 0.6 * np.sqrt(2.0 * np.log(nn)))


@dataclass(frozen=True)
class RVariants:
    """Weight norms and R bounds of one (query head, KV head) pair (theory.md §3).

    Attributes:
        w_fro: ||W||_F with W = W_Q^(h) W_K^(g)T (D x D, never formed).
        w_op: ||W||_2 (largest singular value).
        wq_op: ||W_Q^(h)||_2. wk_op: ||W_K^(g)||_2.
        r_f_max, r_f_p999: R_F = scale * B^2 * ||W||_F with B = max / p99.9 input norm.
        r_op_max, r_op_p999: R_op = scale * B^2 * ||W_Q||_2 ||W_K||_2 (RoPE-robust).
    """

    w_fro: float
    w_op: float
    wq_op: float
    wk_op: float
    r_f_max: float
    r_f_p999: float
    r_op_max: float
    r_op_p999: float

    def to_dict(self) -> dict[str, float]:
        """Plain dict of floats."""
        return {k: float(v) for k, v in asdict(self).items()}


def _psd_sqrt(g: FloatArray) -> FloatArray:
    """Symmetric square root of a PSD matrix (negative rounding noise clipped)."""
    vals, vecs = np.linalg.eigh(g)
    root: FloatArray = (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T
    return root


def r_variants(
    wq_h: ArrayLike, wk_g: ArrayLike, scale: float, b_max: float, b_p999: float
) -> RVariants:
    """R variants of theory.md §3 from a head's projection weights.

    ``wq_h`` and ``wk_g`` are row slices of ``nn.Linear`` weights ((out, in) convention), so
    the model computes q = x wq_h^T and the merged matrix is W = wq_h^T wk_g (D x D). Only
    d_head x d_head Gram matrices are formed: with G_Q = wq_h wq_h^T and G_K = wk_g wk_g^T,
    ||W||_F^2 = tr(G_Q G_K) and the nonzero squared singular values of W are the eigenvalues
    of G_Q^{1/2} G_K G_Q^{1/2}. Computed in float64.

    Args:
        wq_h: query weight rows of head h, shape ``(d_head, D)``.
        wk_g: key weight rows of KV head g(h), shape ``(d_head, D)``.
        scale: the model's softmax scale c_s (normally 1 / sqrt(d_head)).
        b_max: max input norm ||x_i||_2 over profiled tokens.
        b_p999: 99.9th percentile of the input norms.

    Returns:
        The norms and bounds.

    Raises:
        ValueError: on shape mismatch.
    """
    a = np.asarray(wq_h, dtype=np.float64)
    b = np.asarray(wk_g, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"wq_h and wk_g must be (d_head, D) with equal D: {a.shape}, {b.shape}")
    gq, gk = a @ a.T, b @ b.T
    root = _psd_sqrt(gq)
    m = root @ gk @ root
    sv2 = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)
    w_fro = float(np.sqrt(max(float(np.sum(gq * gk.T)), 0.0)))
    w_op = float(np.sqrt(sv2.max()))
    wq_op = float(np.sqrt(max(np.linalg.eigvalsh(gq).max(), 0.0)))
    wk_op = float(np.sqrt(max(np.linalg.eigvalsh(gk).max(), 0.0)))
    return _r_from_norms(w_fro, w_op, wq_op, wk_op, scale, b_max, b_p999)


def _r_from_norms(w_fro: float, w_op: float, wq_op: float, wk_op: float, scale: float,
                  b_max: float, b_p999: float) -> RVariants:
    """The R bounds (§3) from the weight norms and the input-norm bounds."""
    return RVariants(
        w_fro=w_fro,
        w_op=w_op,
        wq_op=wq_op,
        wk_op=wk_op,
        r_f_max=scale * b_max**2 * w_fro,
        r_f_p999=scale * b_p999**2 * w_fro,
        r_op_max=scale * b_max**2 * wq_op * wk_op,
        r_op_p999=scale * b_p999**2 * wq_op * wk_op,
    )


def r_variants_heads(
    wq_h: ArrayLike,
    wk_g: ArrayLike,
    kv: ArrayLike,
    scale: float,
    b_max: float,
    b_p999: float,
) -> list[RVariants]:
    """:func:`r_variants` of several query heads of one layer; the same values, bit for bit.

    The LAPACK calls run on stacks (one call per stack, matrix by matrix as before) and each
    KV head's Gram matrix and norm are computed once for its whole query group.

    Args:
        wq_h: query weight rows of each head, shape ``(h, d_head, D)``.
        wk_g: key weight rows of each KV head, shape ``(g, d_head, D)``.
        kv: KV head index of each query head, shape ``(h,)``.
        scale, b_max, b_p999: as in :func:`r_variants`, shared by the heads.

    Returns:
        One :class:`RVariants` per query head, in order.

    Raises:
        ValueError: on shape mismatch.
    """
    a = np.asarray(wq_h, dtype=np.float64)
    b = np.asarray(wk_g, dtype=np.float64)
    kv_i = np.asarray(kv, dtype=np.int64).ravel()
    if a.ndim != 3 or b.ndim != 3 or a.shape[2] != b.shape[2] or kv_i.size != a.shape[0]:
        raise ValueError(
            "need wq_h (h, d_head, D), wk_g (g, d_head, D) with equal D and kv (h,): "
            f"{a.shape}, {b.shape}, {kv_i.shape}"
        )
    if a.shape[0] == 0:
        return []
    gq = np.stack([x @ x.T for x in a])  # the 2-d products of r_variants
    gk = np.stack([x @ x.T for x in b])
    vals, vecs = np.linalg.eigh(gq)
    root = (vecs * np.sqrt(np.clip(vals, 0.0, None))[:, None, :]) @ vecs.transpose(0, 2, 1)
    m = root @ gk[kv_i] @ root
    sv2_max = np.clip(np.linalg.eigvalsh((m + m.transpose(0, 2, 1)) / 2), 0.0, None).max(axis=1)
    gq_max = np.linalg.eigvalsh(gq).max(axis=1)
    gk_max = np.linalg.eigvalsh(gk).max(axis=1)
    out = []
    for i, g in enumerate(kv_i):
        w_fro = float(np.sqrt(max(float(np.sum(gq[i] * gk[g].T)), 0.0)))
        w_op = float(np.sqrt(sv2_max[i]))
        wq_op = float(np.sqrt(max(gq_max[i], 0.0)))
        wk_op = float(np.sqrt(max(gk_max[g], 0.0)))
        out.append(_r_from_norms(w_fro, w_op, wq_op, wk_op, scale, b_max, b_p999))
    return out


def _resampled_ranks(values: FloatArray, idx: NDArray[np.int64]) -> FloatArray:
    """``scipy.stats.rankdata(values[idx], axis=1)`` (average ranks) from one sort of ``values``.

    A tie group of the row that holds ``below`` smaller elements and ``count`` equal ones
    gets the rank ``below + (count + 1) / 2``, exact in float64 like rankdata's.

    Args:
        values: shape ``(n,)``, no NaN.
        idx: resample indices into ``values``, shape ``(b, m)``.

    Returns:
        Shape ``(b, m)``.
    """
    order = np.argsort(values, kind="stable")
    sorted_v = values[order]
    new = np.ones(values.size, dtype=bool)
    new[1:] = sorted_v[1:] != sorted_v[:-1]
    dense = np.empty(values.size, dtype=np.int64)
    dense[order] = np.cumsum(new) - 1  # tie group of each value, in sorted order
    groups = int(dense[order[-1]]) + 1
    rows = idx.shape[0]
    cell = dense[idx] + np.arange(rows)[:, None] * groups  # (row, group) of each element
    count = np.bincount(cell.ravel(), minlength=rows * groups).reshape(rows, groups)
    rank = (np.cumsum(count, axis=1) - count) + (count + 1) / 2
    return rank.ravel()[cell]


def average_ranks(values: ArrayLike) -> FloatArray:
    """Average ranks of each row; reproduces ``scipy.stats.rankdata(values, axis=-1)``.

    The ranks are :func:`_resampled_ranks` of the row itself (no scipy.stats import).

    Args:
        values: shape ``(n,)`` or ``(rows, n)``, n >= 1, no NaN.

    Returns:
        Float ranks in 1..n, the shape of ``values``.
    """
    v = np.asarray(values, dtype=np.float64)
    whole = np.arange(v.shape[-1])[None]
    if v.ndim == 1:
        return _resampled_ranks(v, whole)[0]
    ranks = np.empty(v.shape)
    for i, row in enumerate(v):
        ranks[i] = _resampled_ranks(row, whole)[0]
    return ranks


def _rowwise_pearson(rx: FloatArray, ry: FloatArray) -> FloatArray:
    """Pearson correlation of each row pair (of ranks), shapes ``(b, n)`` -> ``(b,)``.

    Centres ``rx`` and ``ry`` in place.
    """
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho: FloatArray = (rx * ry).sum(axis=1) / np.sqrt(
            (rx * rx).sum(axis=1) * (ry * ry).sum(axis=1)
        )
    return rho


def spearman_with_ci(
    x: ArrayLike, y: ArrayLike, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Spearman rank correlation with a percentile bootstrap CI over (x, y) pairs.

    Args:
        x: values, shape ``(n,)``.
        y: values, shape ``(n,)``; pairs with a non-finite member are dropped.
        n_boot: bootstrap resamples.
        seed: bootstrap seed.
        level: confidence level.

    Returns:
        ``(rho, lo, hi)``; NaNs when fewer than 3 finite pairs remain or a margin is
        constant.
    """
    xa = np.asarray(x, dtype=np.float64).ravel()
    ya = np.asarray(y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise ValueError(f"x and y must have the same length: {xa.shape} vs {ya.shape}")
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    n = xa.size
    nan = float("nan")
    if n < 3:
        return nan, nan, nan
    whole = np.arange(n)[None]  # the sample itself as one resample: rankdata's ranks, less overhead
    rho = float(_rowwise_pearson(_resampled_ranks(xa, whole), _resampled_ranks(ya, whole))[0])
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    step = max(1, _CHUNK_ELEMS // (4 * n))
    for a in range(0, n_boot, step):
        idx = rng.integers(0, n, size=(min(step, n_boot - a), n))
        rx, ry = _resampled_ranks(xa, idx), _resampled_ranks(ya, idx)  # = rankdata(xa[idx])
        reps[a : a + idx.shape[0]] = _rowwise_pearson(rx, ry)
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return rho, nan, nan
    tail = (1 - level) / 2
    lo, hi = np.quantile(reps, [tail, 1 - tail])
    return rho, float(lo), float(hi)


def _ols_loglog(logn: FloatArray, logk: FloatArray) -> tuple[FloatArray, FloatArray]:
    """OLS of rows of ``logk`` (shape ``(b, L)``) on ``logn`` (``(L,)``): (slopes, intercepts)."""
    xc = logn - logn.mean()
    slope = (logk - logk.mean(axis=1, keepdims=True)) @ xc / float(xc @ xc)
    return slope, logk.mean(axis=1) - slope * logn.mean()


def fit_scaling(
    lengths: ArrayLike,
    k_means_per_seq: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Fit k_bar(n) = alpha * n^C by OLS on log-log (theory.md §6, method A).

    ``k_bar(n)`` is the mean over sequences of the per-sequence k values at length n
    (``nanmean``: a sequence may lack some lengths). The bootstrap resamples sequences
    (rows) with replacement and refits, giving percentile CIs for C, alpha and the local
    slopes ``Delta ln k_bar / Delta ln n`` between consecutive lengths.

    Args:
        lengths: context lengths n, shape ``(L,)``, L >= 2 distinct positive values.
        k_means_per_seq: per-sequence k (e.g. mean or median k_eps over the rows of that
            sequence), shape ``(S, L)``; ``(L,)`` is one sequence (no CI).
        n_boot: bootstrap resamples.
        seed: bootstrap seed.
        level: confidence level.

    Returns:
        Dict with ``C``, ``C_lo``, ``C_hi``, ``alpha``, ``alpha_lo``, ``alpha_hi``,
        ``log_alpha``, ``r2``, ``lengths`` (sorted), ``k_bar``, ``local_slopes``,
        ``local_slopes_lo``, ``local_slopes_hi`` (lists of L - 1), ``n_sequences``,
        ``n_boot``, ``level``. CIs are NaN with fewer than 2 sequences.

    Raises:
        ValueError: on bad shapes, fewer than 2 distinct lengths, or non-positive k_bar.
    """
    n_arr = np.asarray(lengths, dtype=np.float64).ravel()
    k = np.asarray(k_means_per_seq, dtype=np.float64)
    if k.ndim == 1:
        k = k[None, :]
    if k.ndim != 2 or k.shape[1] != n_arr.size:
        raise ValueError(f"k_means_per_seq must be (S, {n_arr.size}), got {k.shape}")
    if n_arr.size < 2 or np.unique(n_arr).size != n_arr.size or np.any(n_arr <= 0):
        raise ValueError(f"need at least 2 distinct positive lengths, got {n_arr.tolist()}")
    order = np.argsort(n_arr)
    n_arr, k = n_arr[order], k[:, order]
    logn = np.log(n_arr)

    def summarize(kk: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
        """(C, ln alpha, local slopes) of resamples ``kk`` of shape ``(b, S, L)``."""
        fin = np.isfinite(kk)
        with np.errstate(invalid="ignore", divide="ignore"):
            kbar = np.where(fin, kk, 0.0).sum(axis=1) / fin.sum(axis=1)  # nanmean, no warning
            logk = np.log(kbar)
        c, la = _ols_loglog(logn, logk)
        local = np.diff(logk, axis=1) / np.diff(logn)
        return c, la, local

    fin_k = np.isfinite(k)
    with np.errstate(invalid="ignore", divide="ignore"):
        k_bar = np.where(fin_k, k, 0.0).sum(axis=0) / fin_k.sum(axis=0)
    if not np.all(k_bar > 0):
        raise ValueError(f"k_bar must be positive at every length, got {k_bar.tolist()}")
    c, la, local = summarize(k[None])
    logk = np.log(k_bar)
    resid = logk - (la[0] + c[0] * logn)
    ss_tot = float(np.sum((logk - logk.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else float("nan")
    s = k.shape[0]
    tail = (1 - level) / 2
    nan_l = [float("nan")] * (n_arr.size - 1)
    ci: dict[str, Any] = {"C_lo": float("nan"), "C_hi": float("nan"),
                          "alpha_lo": float("nan"), "alpha_hi": float("nan"),
                          "local_slopes_lo": nan_l, "local_slopes_hi": list(nan_l)}  # fmt: skip
    if s >= 2 and n_boot > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, s, size=(n_boot, s))
        bc, bla, blocal = summarize(k[idx])
        fin = np.isfinite(bc) & np.isfinite(bla)
        if fin.any():
            ci["C_lo"], ci["C_hi"] = (float(v) for v in np.quantile(bc[fin], [tail, 1 - tail]))
            a_lo, a_hi = np.quantile(bla[fin], [tail, 1 - tail])
            ci["alpha_lo"], ci["alpha_hi"] = float(np.exp(a_lo)), float(np.exp(a_hi))
            q = np.nanquantile(blocal[fin], [tail, 1 - tail], axis=0)
            ci["local_slopes_lo"] = [float(v) for v in q[0]]
            ci["local_slopes_hi"] = [float(v) for v in q[1]]
    return {
        "C": float(c[0]),
        "alpha": float(np.exp(la[0])),
        "log_alpha": float(la[0]),
        "r2": r2,
        "lengths": [float(v) for v in n_arr],
        "k_bar": [float(v) for v in k_bar],
        "local_slopes": [float(v) for v in local[0]],
        "n_sequences": int(s),
        "n_boot": int(n_boot),
        "level": float(level),
        **ci,
    }
