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

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import stats as sps

FloatArray = NDArray[np.float64]

_RANK_TOL = 1e-10


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
    hi = (sps.gamma.isf(alpha / 2, k) - k) / np.sqrt(k)
    # The lower tail is thinner than normal (simulated 1e-3 quantiles -1.6 to -2.9), so the
    # normal quantile is conservative there; the inflated gamma's would be far too loose.
    lo = sps.norm.ppf(alpha / 2)
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
    return float(sps.lognorm.sf(hz, psi, scale=np.exp(pmu)))


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


def pairwise_stats(x: FloatArray) -> PairwiseResult:
    """Henze-Zirkler and Mardia skewness from one Gram matrix of the whitened rows.

    Args:
        x: a row subsample, shape ``(m, d)``, m > d + 1 (callers bound m, e.g. 1000).

    Returns:
        The statistics; NaN when the subsample's covariance has rank 0 or m <= rank + 1.
    """
    w = whiten(x)
    y = w.y
    m, p = y.shape
    if p == 0 or m <= p + 1:
        return PairwiseResult(m, float("nan"), float("nan"), float("nan"), p)
    # The m x m work runs in float32 (2-3x faster; relative error ~1e-6, far below the null
    # spread of either statistic), sums accumulate in float64.
    y32 = y.astype(np.float32)
    gram = y32 @ y32.T
    b1 = float(np.sum(gram * gram * gram, dtype=np.float64)) / m**2
    b2 = _hz_beta(m, p) ** 2
    dj = np.diagonal(gram).astype(np.float64)
    # exp(-beta^2/2 * D_jk) with D_jk = D_j + D_k - 2 y_j.y_k, built in place (no overflow).
    half = (b2 / 2 * dj).astype(np.float32)
    arg = np.float32(b2) * gram
    arg -= half[:, None]
    arg -= half[None, :]
    np.exp(arg, out=arg)
    term1 = float(np.sum(arg, dtype=np.float64)) / m**2
    term2 = 2 * (1 + b2) ** (-p / 2) * float(np.exp(-b2 / (2 * (1 + b2)) * dj).mean())
    term3 = (1 + 2 * b2) ** (-p / 2)
    hz = m * (term1 - term2 + term3)
    return PairwiseResult(m=m, hz=float(hz), hz_pvalue=_hz_pvalue(hz, m, p), b1=b1, d_eff=p)


def mardia(w: Whitened, pairwise: PairwiseResult) -> MardiaResult:
    """Mardia's tests: kurtosis on all rows of ``w``, skewness from ``pairwise``.

    Args:
        w: output of :func:`whiten` on the full sample.
        pairwise: :func:`pairwise_stats` of a row subsample.

    Returns:
        The skewness and kurtosis statistics.
    """
    y = w.y
    n, d = y.shape
    d2 = np.einsum("ij,ij->i", y, y)
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
        skewness_pvalue=float(sps.chi2.sf(stat, df)),
        kurtosis=b2,
        kurtosis_rel=b2 / mean0 - 1.0,
        kurtosis_z=float(kz),
        kurtosis_pvalue=float(2 * sps.norm.sf(abs(kz))),
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


def mahalanobis_qq(w: Whitened, points: int = 50, alpha: float = 1e-3) -> MahalanobisQQ:
    """QQ summary of squared Mahalanobis distances against chi2(d_eff).

    Args:
        w: output of :func:`whiten`.
        points: number of QQ pairs to keep for plotting.
        alpha: level for ``exceed_count_null_max``.

    Returns:
        The QQ summary.
    """
    y = w.y
    n, d = y.shape
    d2 = np.einsum("ij,ij->i", y, y)
    probs = (np.arange(points) + 0.5) / points
    theo = sps.chi2.ppf(probs, d)
    emp = np.quantile(d2, probs)
    q999 = float(sps.chi2.ppf(0.999, d))
    rate = float(np.mean(d2 > q999))
    if n - d - 1 > 0:
        p0 = float(sps.beta.sf(q999 / (n - 1), d / 2, (n - d - 1) / 2))
    else:
        p0 = float("nan")
    cmax = int(sps.binom.isf(alpha, n, p0)) if np.isfinite(p0) else n
    return MahalanobisQQ(
        max_dev=float(np.max(np.abs(emp - theo)) / np.sqrt(2 * d)),
        exceed_rate_999=rate,
        exceed_rate_999_null=p0,
        exceed_count_null_max=cmax,
        qq_chi2=theo,
        qq_empirical=emp,
    )


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
