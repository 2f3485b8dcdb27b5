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

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special as spc
from scipy import stats as sps

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

_CHUNK_ELEMS = 4_000_000  # elements per Monte Carlo block (~32 MB of float64)


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
    return np.asarray(n_ * sps.norm.sf(s_ + sps.norm.ppf(e_)), dtype=np.float64)


def _k_eps_sorted(sorted_desc: FloatArray, sigmas: FloatArray, eps: float) -> FloatArray:
    """Exact k_eps of softmax rows ``sigma * z`` for pre-sorted standard scores.

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


# Median k_eps / n per Monte Carlo cell, keyed by (n, eps, draws, seed, sigma_step), then by
# the sigma grid index. Every cell regenerates the same draws from (seed, n, draws), so the
# cached values do not depend on which grid points were computed together.
_KAPPA_CACHE: dict[tuple[int, float, int, int, float], dict[int, float]] = {}
_KAPPA_CACHE_MAX_CELLS = 20_000


def _cell_kappa(
    n: int, eps: float, codes: NDArray[np.int64], draws: int, seed: int, step: float
) -> FloatArray:
    """Median over ``draws`` stratified rows of k_eps / n at sigma = code * step.

    Args:
        n: keys in the row.
        eps: tail-mass budget in (0, 1).
        codes: sigma grid indices, shape ``(m,)``.
        draws: simulated rows.
        seed: seed of the draws (combined with n and draws).
        step: sigma grid spacing.

    Returns:
        Shape ``(m,)``.
    """
    if len(_KAPPA_CACHE) > _KAPPA_CACHE_MAX_CELLS:
        _KAPPA_CACHE.clear()
    table = _KAPPA_CACHE.setdefault((n, eps, draws, seed, step), {})
    missing = np.array(sorted({int(c) for c in codes} - table.keys()), dtype=np.int64)
    if missing.size:
        z = _max_stratified_rows(np.random.default_rng([seed, n, draws]), n, draws)
        sig = missing.astype(np.float64) * step
        chunk = max(1, _CHUNK_ELEMS // (draws * n))
        for a in range(0, sig.size, chunk):
            med = np.median(_k_eps_sorted(z, sig[a : a + chunk], eps), axis=1) / n
            table.update(zip(missing[a : a + chunk].tolist(), med.tolist(), strict=True))
    return np.array([table[int(c)] for c in codes], dtype=np.float64)


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
    log_kappa = np.zeros(nn.size)
    for cells, weight in ((n_lo, 1.0 - w_n), (n_hi, w_n)):
        kappa = np.empty(nn.size)
        for cell, e_val in {(int(c), float(e)) for c, e in zip(cells, ee, strict=True)}:
            sel = (cells == cell) & (ee == e_val)
            k_lo = _cell_kappa(cell, e_val, c_lo[sel], draws, seed, sigma_step)
            k_hi = _cell_kappa(cell, e_val, c_lo[sel] + 1, draws, seed, sigma_step)
            kappa[sel] = (1.0 - w_s[sel]) * k_lo + w_s[sel] * k_hi
        log_kappa += weight * np.log(kappa)
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
    k = ns + nb * sps.norm.sf(sb + sps.norm.ppf(np.minimum(eps_b, 1.0)))
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


def _rowwise_spearman(xb: FloatArray, yb: FloatArray) -> FloatArray:
    """Spearman correlation of each row pair, shapes ``(b, n)`` -> ``(b,)`` (average ranks)."""
    rx = sps.rankdata(xb, axis=1)
    ry = sps.rankdata(yb, axis=1)
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
    rho = float(_rowwise_spearman(xa[None], ya[None])[0])
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    step = max(1, _CHUNK_ELEMS // (4 * n))
    for a in range(0, n_boot, step):
        idx = rng.integers(0, n, size=(min(step, n_boot - a), n))
        reps[a : a + idx.shape[0]] = _rowwise_spearman(xa[idx], ya[idx])
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
