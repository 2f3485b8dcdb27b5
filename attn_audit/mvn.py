"""Multivariate normality statistics for one head's d_head vectors (theory.md §4.3, §4.4).

Pure numpy/scipy. Every function takes a sample matrix ``x`` of shape ``(n, d)`` (rows =
tokens, columns = coordinates of the head) and never modifies it. The statistics here are
the multivariate half of :func:`attn_audit.stats.assess_gaussianity`; they are also usable on
their own.

Conventions:

* The covariance used for whitening is the maximum-likelihood one (divisor ``n``), as in
  Mardia (1970) and Henze & Zirkler (1990).
* A rank-deficient covariance (constant or collinear coordinates, e.g. zero channels) is
  handled by whitening in the subspace of eigenvalues above ``1e-10 * max eigenvalue``; the
  multivariate dimension ``d_eff`` is then that rank and every null distribution uses it.
* Null means and variances are the exact finite-``n`` ones where they are known (Mardia
  kurtosis, Mahalanobis distances), because at the tool's sample sizes (n ~ 1000, d ~ 64)
  the asymptotic ones are off by more than one null standard deviation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import special as spc
from scipy.linalg import solve_triangular

try:  # the Boost ufunc behind scipy.stats.binom.isf (recent scipy keeps it in scipy.special)
    from scipy.special._ufuncs import _binom_isf as _boost_binom_isf
except ImportError:  # pragma: no cover - older scipy keeps it under scipy.stats
    _boost_binom_isf = None

FloatArray = NDArray[np.float64]

_RANK_TOL = 1e-10
# Row block of the m x m pairwise work: a 128 x m float32 block (0.5 MiB at m = 1000) and its
# temporaries stay in the CPU cache.
_PAIR_BLOCK = 128


# The scipy.stats distribution methods the null laws need, without importing scipy.stats
# (~1 s per audit): each calls the scipy.special function that scipy.stats itself calls
# (scipy 1.17), so the values are the same bit for bit, and returns what scipy.stats does
# outside the domain (NaN for a bad shape or probability, the support's ends at 0 and 1).


def _gamma_isf(q: float, a: float) -> float:
    """Upper ``q`` quantile of Gamma(a); reproduces ``scipy.stats.gamma.isf(q, a)``."""
    if not (a > 0 and 0 <= q <= 1):
        return float("nan")
    return float(spc.gammainccinv(a, q))


def _chi2_ppf(q: FloatArray | float, df: float) -> FloatArray:
    """Quantiles of chi2(df); reproduces ``scipy.stats.chi2.ppf(q, df)`` (``2 gammaincinv``)."""
    q_ = np.asarray(q, dtype=np.float64)
    if not df > 0:
        return np.full(q_.shape, np.nan)
    x: FloatArray = np.where((q_ >= 0) & (q_ <= 1), 2 * spc.gammaincinv(df / 2, q_), np.nan)
    return x


def _beta_sf(x: float, a: float, b: float) -> float:
    """Survival function of Beta(a, b); reproduces ``scipy.stats.beta.sf(x, a, b)``."""
    if not (a > 0 and b > 0) or np.isnan(x):
        return float("nan")
    if x <= 0:
        return 1.0
    if x >= 1:
        return 0.0
    return float(spc.betaincc(a, b, x))


def _binom_isf(q: float, n: int, p: float) -> float:
    """Smallest k with P(Binom(n, p) > k) <= q; reproduces ``scipy.stats.binom.isf(q, n, p)``.

    scipy.stats calls Boost's quantile (``scipy.special._ufuncs._binom_isf``); where that
    private ufunc is missing, the definition is evaluated with ``bdtrc`` (the two can differ
    only where the tail equals ``q`` up to rounding).
    """
    if not (n >= 0 and n == np.round(n) and 0 <= p <= 1) or np.isnan(q):
        return float("nan")
    if q == 1:
        return -1.0
    if q == 0:
        return float(n)
    if not 0 < q < 1:
        return float("nan")
    if _boost_binom_isf is not None:
        return float(_boost_binom_isf(q, n, p))
    return _binom_isf_bdtrc(q, n, p)


def _binom_isf_bdtrc(q: float, n: int, p: float) -> float:
    """:func:`_binom_isf` for ``0 < q < 1`` from its definition, with ``spc.bdtrc`` (fallback)."""
    tail = spc.bdtrc(np.arange(n + 1.0), n, p)  # P(X > k), k = 0..n, non-increasing
    return float(np.argmax(tail <= q))  # tail(n) = 0 <= q: a k always exists


@dataclass(frozen=True)
class Whitened:
    """A centred, whitened sample.

    Attributes:
        y: whitened rows, shape ``(n, d_eff)``; ``y.T @ y / n`` is the identity.
        mean: the sample mean, shape ``(d,)``.
        eigenvalues: eigenvalues of the ML covariance in descending order, shape ``(d,)``.
        d_eff: the rank used for whitening.
    """

    y: FloatArray
    mean: FloatArray
    eigenvalues: FloatArray
    d_eff: int

    @functools.cached_property
    def d2(self) -> FloatArray:
        """Squared Mahalanobis distances ``|y_i|^2``, shape ``(n,)`` (computed once)."""
        d2: FloatArray = np.einsum("ij,ij->i", self.y, self.y)
        return d2


def whiten(x: FloatArray) -> Whitened:
    """Centre and whiten ``x`` with its ML covariance, dropping null directions.

    Args:
        x: samples, shape ``(n, d)``.

    Returns:
        The whitened sample; ``y`` has shape ``(n, d_eff)``.
    """
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / x.shape[0]
    evals, evecs = np.linalg.eigh(cov)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    top = float(evals[0]) if evals.size else 0.0
    keep = evals > _RANK_TOL * top if top > 0 else np.zeros_like(evals, dtype=bool)
    d_eff = int(keep.sum())
    y = (xc @ evecs[:, keep]) / np.sqrt(evals[keep])
    return Whitened(y=y, mean=mean, eigenvalues=np.clip(evals, 0.0, None), d_eff=d_eff)


@dataclass(frozen=True)
class Distances:
    """Squared Mahalanobis distances of a sample from its mean, without the whitened rows.

    Attributes:
        d2: ``(x_i - mean)^T S^+ (x_i - mean)`` with the ML covariance S, shape ``(n,)``.
        mean: the sample mean, shape ``(d,)``.
        eigenvalues: eigenvalues of S in descending order, clipped at 0, shape ``(d,)``.
        d_eff: the rank used (as in :func:`whiten`).
    """

    d2: FloatArray
    mean: FloatArray
    eigenvalues: FloatArray
    d_eff: int


def mahalanobis(x: FloatArray) -> Whitened | Distances:
    """Squared Mahalanobis distances of the rows of ``x`` (shape ``(n, d)``).

    The same distances as ``whiten(x).d2`` up to float rounding, cheaper: for a full-rank
    covariance S = L L^T they are |L^-1 (x_i - mean)|^2 (eigenvalues only, a Cholesky factor
    and its d x d inverse; no eigenvectors); a rank-deficient S falls back to :func:`whiten`
    (whose result is returned, with its ``d2``).

    Args:
        x: samples, shape ``(n, d)``.

    Returns:
        An object with ``d2``, ``mean``, ``eigenvalues`` and ``d_eff``.
    """
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / x.shape[0]
    evals = np.linalg.eigvalsh(cov)[::-1]
    top = float(evals[0]) if evals.size else 0.0
    if not (top > 0 and evals[-1] > _RANK_TOL * top):
        return whiten(x)
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        return whiten(x)
    # u_i = L^-1 (x_i - mean) through the explicit inverse: one n x d x d product (a triangular
    # solve with n right-hand sides is slower here). S has condition number < 1e10 here.
    inv = solve_triangular(chol, np.eye(chol.shape[0]), lower=True, check_finite=False)
    u = xc @ inv.T
    d2 = np.einsum("ij,ij->i", u, u)
    return Distances(d2=d2, mean=mean, eigenvalues=np.clip(evals, 0.0, None), d_eff=evals.size)


@dataclass(frozen=True)
class MardiaResult:
    """Mardia's multivariate skewness and kurtosis with finite-n null calibration.

    Attributes:
        skewness: b_{1,d} = sum_ij (y_i . y_j)^3 / m^2 on the pairwise subsample of m rows
            (0 under normality up to an O(d^3 / m) bias).
        skewness_z: Wilson-Hilferty z of ``m b1 / 6`` against chi2(d(d+1)(d+2)/6).
        skewness_pvalue: upper-tail p-value of ``m b1 / 6``.
        kurtosis: b_{2,d} = mean of D_i^4 over all rows (d(d+2) under normality).
        kurtosis_rel: ``b2 / E0[b2] - 1``, the relative excess over the exact finite-n null
            mean; for an elliptical law it estimates (marginal excess kurtosis) / 3.
        kurtosis_z: ``(b2 - E0) / sd0`` with the exact finite-n null mean and variance.
        kurtosis_pvalue: two-sided normal p-value of ``kurtosis_z``.
        n_skewness: rows m used for the skewness.
    """

    skewness: float
    skewness_z: float
    skewness_pvalue: float
    kurtosis: float
    kurtosis_rel: float
    kurtosis_z: float
    kurtosis_pvalue: float
    n_skewness: int


def mardia_kurtosis_null(n: int, d: int) -> tuple[float, float]:
    """Exact null mean and standard deviation of Mardia's b_{2,d} (ML covariance).

    Args:
        n: sample size.
        d: dimension.

    Returns:
        ``(mean, sd)``: ``d(d+2)(n-1)/(n+1)`` and the square root of
        ``8d(d+2)(n-3)(n-d-1)(n-d+1) / ((n+1)^2 (n+3)(n+5))``.
    """
    mean = d * (d + 2) * (n - 1) / (n + 1)
    var = 8.0 * d * (d + 2) * (n - 3) * (n - d - 1) * (n - d + 1)
    var /= (n + 1) ** 2 * (n + 3) * (n + 5)
    return float(mean), float(np.sqrt(max(var, 0.0)))


def _skew_chi2_squared(d: int) -> float:
    """Skewness of Y = X^2 for X ~ chi2(d), from the raw moments E X^k = d(d+2)...(d+2k-2)."""
    m1, m2, m3 = (float(np.prod([d + 2.0 * j for j in range(2 * k)])) for k in (1, 2, 3))
    var = m2 - m1**2
    return float((m3 - 3 * m1 * m2 + 2 * m1**3) / var**1.5)


@functools.lru_cache(maxsize=256)
def mardia_kurtosis_z_bounds(n: int, d: int, alpha: float) -> tuple[float, float]:
    """Null quantiles of the standardized Mardia kurtosis z, ``alpha / 2`` in each tail.

    The null law of b_{2,d} is right-skewed at moderate n (a normal z would flag 3-10x too
    often at the 1e-3 level for d <= 8, n <= 200). The upper bound is a Pearson type III
    (gamma) quantile with skewness ``2 * skew(chi2_d^2) / sqrt(n)``: the skewness of a mean
    of n independent D^4, inflated by 2 for the estimated mean and covariance (the inflation
    measured by simulation was 1.1-2.7 over d = 1..16, n = 50..1000). The lower bound is the
    normal quantile.

    Args:
        n: sample size.
        d: dimension.
        alpha: two-sided level.

    Returns:
        ``(lower, upper)`` z bounds.
    """
    g = 2.0 * _skew_chi2_squared(d) / np.sqrt(n)
    k = 4.0 / g**2
    hi = (_gamma_isf(alpha / 2, k) - k) / np.sqrt(k)
    # The lower tail is thinner than normal (simulated 1e-3 quantiles -1.6 to -2.9), so the
    # normal quantile is conservative there; the inflated gamma's would be far too loose.
    lo = spc.ndtri(alpha / 2)  # scipy.stats.norm.ppf
    return float(lo), float(hi)


def _hz_pvalue(hz: float, n: int, p: int) -> float:
    """Log-normal p-value of the Henze-Zirkler statistic (Henze & Zirkler 1990)."""
    b2 = _hz_beta(n, p) ** 2
    a = 1 + 2 * b2
    wb = (1 + b2) * (1 + 3 * b2)
    mu = 1 - a ** (-p / 2) * (1 + p * b2 / a + p * (p + 2) * b2**2 / (2 * a**2))
    si2 = (
        2 * (1 + 4 * b2) ** (-p / 2)
        + 2 * a ** (-p) * (1 + 2 * p * b2**2 / a**2 + 3 * p * (p + 2) * b2**4 / (4 * a**4))
        - 4 * wb ** (-p / 2) * (1 + 3 * p * b2**2 / (2 * wb) + p * (p + 2) * b2**4 / (2 * wb**2))
    )
    psi = np.sqrt(np.log1p(si2 / mu**2)) if si2 > 0 else 0.0
    if psi < 1e-4:
        # In high dimension the null law collapses onto ~1 (psi ~ 1e-9 at d = 64) and the
        # p-value would only reflect float rounding of the statistic.
        return float("nan")
    pmu = np.log(np.sqrt(mu**4 / (si2 + mu**2)))
    # Log-normal survival function, as scipy.stats.lognorm.sf(hz, psi, scale=exp(pmu)).
    x = hz / np.exp(pmu)
    if not x > 0:
        return 1.0 if x <= 0 else float("nan")
    return float(spc.ndtr(-(np.log(x) / psi)))


def _hz_beta(n: int, p: int) -> float:
    """Henze-Zirkler's optimal bandwidth for sample size n and dimension p."""
    return float(((2 * p + 1) / 4) ** (1 / (p + 4)) * n ** (1 / (p + 4)) / np.sqrt(2))


@dataclass(frozen=True)
class PairwiseResult:
    """O(m^2 d) statistics on a bounded row subsample (whitened with its own moments).

    Attributes:
        m: rows used.
        hz: Henze-Zirkler statistic: a weighted L2 distance between the empirical
            characteristic function of the whitened sample and the normal one (~1 for
            strongly non-normal samples; also ~1 for normal ones once d is large).
        hz_pvalue: its log-normal p-value; NaN where that approximation degenerates (null
            log-sd < 1e-4, i.e. d >~ 20 at m = 1000).
        b1: Mardia skewness of the subsample.
        d_eff: rank of the subsample's covariance.
    """

    m: int
    hz: float
    hz_pvalue: float
    b1: float
    d_eff: int


def _pairwise_sums(y32: NDArray[np.float32], b2: float) -> tuple[float, float, FloatArray]:
    """Sums over all ordered row pairs (j, k) of the Gram matrix G = y y^T (float32).

    Returns ``(sum_jk G_jk^3, sum_jk exp(-b2/2 D_jk), diag G)`` with D_jk = G_jj + G_kk - 2 G_jk,
    the exponent formed as ``(b2 G_jk - b2/2 G_jj) - b2/2 G_kk`` in float32.

    G is symmetric: each row block is multiplied only with itself and the rows after it (about
    half the products). The cube sum counts the off-diagonal blocks twice; the exponent is not
    symmetric in float32 rounding, so both orders (j, k) and (k, j) are evaluated there. Every
    float32 entry is the one of the full-matrix computation; sums accumulate in float64.
    """
    m = y32.shape[0]
    starts = range(0, m, _PAIR_BLOCK)
    # The diagonal first (from the diagonal blocks, the same products as in the full G).
    dj = np.concatenate([np.diagonal(y32[r0 : r0 + _PAIR_BLOCK] @ y32[r0 : r0 + _PAIR_BLOCK].T)
                         for r0 in starts])  # fmt: skip
    half = (b2 / 2 * dj.astype(np.float64)).astype(np.float32)
    b2_32 = np.float32(b2)

    def total(a: NDArray[np.float32]) -> float:
        return float(np.einsum("ij->", a, dtype=np.float64))  # float64 accumulation

    cube = expo = 0.0
    for r0 in starts:
        r1 = min(r0 + _PAIR_BLOCK, m)
        sq = r1 - r0
        g = y32[r0:r1] @ y32[r0:].T  # rows r0:r1, columns r0:m
        bg = b2_32 * g
        g *= g * g
        cube += 2.0 * total(g) - total(g[:, :sq])
        # exp(-b2/2 D_jk) = exp(b2 G_jk - half_j - half_k), built in place (no overflow).
        rows, cols = half[r0:r1, None], half[None, r0:]
        arg = bg - rows
        arg -= cols
        np.exp(arg, out=arg)
        expo += total(arg)
        if r1 < m:  # the mirrored pairs (k, j) of the off-diagonal blocks
            arg = bg[:, sq:]
            arg -= cols[:, sq:]
            arg -= rows
            np.exp(arg, out=arg)
            expo += total(arg)
    return cube, expo, dj.astype(np.float64)


def pairwise_stats(x: FloatArray, whitened: Whitened | None = None) -> PairwiseResult:
    """Henze-Zirkler and Mardia skewness from one Gram matrix of the whitened rows.

    Args:
        x: a row subsample, shape ``(m, d)``, m > d + 1 (callers bound m, e.g. 1000).
        whitened: ``whiten(x)`` when the caller already has it.

    Returns:
        The statistics; NaN when the subsample's covariance has rank 0 or m <= rank + 1.
    """
    w = whitened if whitened is not None else whiten(x)
    y = w.y
    m, p = y.shape
    if p == 0 or m <= p + 1:
        return PairwiseResult(m, float("nan"), float("nan"), float("nan"), p)
    # The m x m work runs in float32 (2-3x faster; relative error ~1e-6, far below the null
    # spread of either statistic), sums accumulate in float64.
    b2 = _hz_beta(m, p) ** 2
    cube, expo, dj = _pairwise_sums(y.astype(np.float32), b2)
    b1 = cube / m**2
    term1 = expo / m**2
    term2 = 2 * (1 + b2) ** (-p / 2) * float(np.exp(-b2 / (2 * (1 + b2)) * dj).mean())
    term3 = (1 + 2 * b2) ** (-p / 2)
    hz = m * (term1 - term2 + term3)
    return PairwiseResult(m=m, hz=float(hz), hz_pvalue=_hz_pvalue(hz, m, p), b1=b1, d_eff=p)


def mardia(w: Whitened | Distances, pairwise: PairwiseResult) -> MardiaResult:
    """Mardia's tests: kurtosis on all rows of ``w``, skewness from ``pairwise``.

    Args:
        w: output of :func:`whiten` (or :func:`mahalanobis`) on the full sample.
        pairwise: :func:`pairwise_stats` of a row subsample.

    Returns:
        The skewness and kurtosis statistics.
    """
    d2 = w.d2
    n, d = d2.shape[0], w.d_eff
    b2 = float(np.mean(d2 * d2))
    mean0, sd0 = mardia_kurtosis_null(n, d)
    kz = (b2 - mean0) / sd0 if sd0 > 0 else float("nan")
    m, b1, p = pairwise.m, pairwise.b1, pairwise.d_eff
    df = p * (p + 1) * (p + 2) / 6.0
    stat = m * b1 / 6.0
    # Wilson-Hilferty cube-root normalisation of a chi-square with df degrees of freedom.
    sz = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / np.sqrt(2 / (9 * df))
    return MardiaResult(
        skewness=b1,
        skewness_z=float(sz),
        skewness_pvalue=float(spc.chdtrc(df, stat)),  # scipy.stats.chi2.sf
        kurtosis=b2,
        kurtosis_rel=b2 / mean0 - 1.0,
        kurtosis_z=float(kz),
        kurtosis_pvalue=float(2 * spc.ndtr(-abs(kz))),  # scipy.stats.norm.sf
        n_skewness=m,
    )


@dataclass(frozen=True)
class MahalanobisQQ:
    """Squared Mahalanobis distances against chi2(d_eff) (theory.md §4.3).

    Attributes:
        max_dev: max over the QQ points of |empirical - chi2 quantile| / sqrt(2 d_eff), i.e.
            in units of the chi2 standard deviation.
        exceed_rate_999: share of rows with D^2 above the chi2(d_eff) 0.999 quantile.
        exceed_rate_999_null: the exact null probability of that event for this (n, d_eff)
            (below 0.001, because D^2 from estimated mean and covariance is Beta-distributed:
            D^2 / (n-1) ~ Beta(d/2, (n-d-1)/2)).
        exceed_count_null_max: the largest exceedance count the null produces with
            probability at least ``1 - alpha`` (binomial upper quantile).
        qq_chi2: chi2 quantiles at probabilities (i - 0.5)/k, shape ``(k,)``.
        qq_empirical: empirical D^2 quantiles at the same probabilities, shape ``(k,)``.
    """

    max_dev: float
    exceed_rate_999: float
    exceed_rate_999_null: float
    exceed_count_null_max: int
    qq_chi2: FloatArray
    qq_empirical: FloatArray


def mahalanobis_qq(
    w: Whitened | Distances, points: int = 50, alpha: float = 1e-3
) -> MahalanobisQQ:
    """QQ summary of squared Mahalanobis distances against chi2(d_eff).

    Args:
        w: output of :func:`whiten` (or :func:`mahalanobis`).
        points: number of QQ pairs to keep for plotting.
        alpha: level for ``exceed_count_null_max``.

    Returns:
        The QQ summary.
    """
    d2 = w.d2
    n, d = d2.shape[0], w.d_eff
    probs, theo, q999, p0, cmax = _qq_null(n, d, points, alpha)
    emp = _quantiles(np.sort(d2), probs)
    rate = float(np.mean(d2 > q999))
    return MahalanobisQQ(
        max_dev=float(np.max(np.abs(emp - theo)) / np.sqrt(2 * d)),
        exceed_rate_999=rate,
        exceed_rate_999_null=p0,
        exceed_count_null_max=cmax,
        qq_chi2=theo.copy(),
        qq_empirical=emp,
    )


def _quantiles(srt: FloatArray, probs: FloatArray) -> FloatArray:
    """``np.quantile(x, probs)`` (method "linear") of ``srt = np.sort(x)``, the same arithmetic.

    numpy interpolates between the order statistics around ``(n - 1) p`` as
    ``a + (b - a) g`` for g < 0.5 and ``b - (b - a)(1 - g)`` otherwise.
    """
    n = srt.shape[0]
    virtual = (n - 1) * probs
    prev = np.floor(virtual)
    gamma = virtual - prev
    lo = prev.astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    lo[virtual >= n - 1] = n - 1
    a, b = srt[lo], srt[hi]
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)


@functools.lru_cache(maxsize=256)
def _qq_null(
    n: int, d: int, points: int, alpha: float
) -> tuple[FloatArray, FloatArray, float, float, int]:
    """The parts of :func:`mahalanobis_qq` that depend on (n, d) only (cached).

    Returns:
        ``(probs, chi2 quantiles at probs, chi2 0.999 quantile, null exceedance
        probability, binomial upper alpha quantile of the exceedance count)``.
    """
    probs = (np.arange(points) + 0.5) / points
    theo = _chi2_ppf(probs, d)
    q999 = float(_chi2_ppf(0.999, d))
    if n - d - 1 > 0:
        p0 = _beta_sf(q999 / (n - 1), d / 2, (n - d - 1) / 2)
    else:
        p0 = float("nan")
    cmax = int(_binom_isf(alpha, n, p0)) if np.isfinite(p0) else n
    return probs, theo, q999, p0, cmax


@dataclass(frozen=True)
class CovarianceShape:
    """Shape of the sample covariance (theory.md §4.4).

    Attributes:
        eigenvalues: eigenvalues of the unbiased covariance, descending, shape ``(d,)``.
        condition_number: lambda_max / lambda_min (inf when singular).
        effective_rank: (sum lambda)^2 / sum lambda^2, in [1, d].
        isotropy: ||S / (tr S / d) - I||_F / sqrt(d) (the coefficient of variation of the
            eigenvalues; 0 for S proportional to I).
        isotropy_debiased: sqrt(max(isotropy^2 - (d+1)/n, 0)): removes the Gaussian sampling
            inflation E[isotropy^2] ~ true^2 + (d+1)/n, so that isotropic data read ~0 at
            every (n, d).
        mean_offset: ||mean|| / sqrt(tr S).
    """

    eigenvalues: FloatArray
    condition_number: float
    effective_rank: float
    isotropy: float
    isotropy_debiased: float
    mean_offset: float


def covariance_shape(eigenvalues: FloatArray, mean: FloatArray, n: int) -> CovarianceShape:
    """Eigen-summary of a sample covariance.

    Takes the eigenvalues rather than the data so the whitening's eigendecomposition is
    reused (the Frobenius-norm isotropy is rotation invariant: sqrt(mean((l / mean l - 1)^2))).

    Args:
        eigenvalues: eigenvalues of the unbiased covariance, shape ``(d,)`` (any order).
        mean: sample mean, shape ``(d,)``.
        n: sample size (for the isotropy debiasing).

    Returns:
        The covariance shape; NaNs when the trace is 0.
    """
    evals = np.sort(np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None))[::-1]
    tr = float(evals.sum())
    if tr <= 0:
        nan = float("nan")
        return CovarianceShape(evals, nan, nan, nan, nan, nan)
    lmin = float(evals[-1])
    cond = float(evals[0] / lmin) if lmin > 0 else float("inf")
    eff = tr**2 / float(np.sum(evals**2))
    iso = float(np.sqrt(np.mean((evals / evals.mean() - 1.0) ** 2)))
    iso_db = float(np.sqrt(max(iso**2 - (evals.size + 1) / n, 0.0)))
    offset = float(np.linalg.norm(mean) / np.sqrt(tr))
    return CovarianceShape(evals, cond, eff, iso, iso_db, offset)
