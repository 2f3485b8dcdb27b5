"""Whitening, squared Mahalanobis distances and their chi2 QQ summary, covariance shape.

docs/methods.md §4.4 (Mahalanobis QQ) and §4.5 (covariance shape); the base of the multivariate
statistics of :mod:`attn_audit.stats.mardia` and :mod:`attn_audit.stats.henze_zirkler`. Pure numpy/scipy (no torch). Every function
takes a sample matrix ``x`` of shape ``(n, d)`` (rows = tokens, columns = coordinates of the
head) and never modifies it, or the :class:`Whitened` / :class:`Distances` made from one.

* The covariance is the maximum-likelihood one (divisor ``n``), as in Mardia (1970) and
  Henze & Zirkler (1990).
* A rank-deficient covariance is handled by whitening in the subspace of eigenvalues above
  ``1e-10 * max eigenvalue``; ``d_eff`` is that rank and every null distribution uses it.
* The exceedance null of :func:`mahalanobis_qq` is the exact finite-``n`` one (D^2 from the
  estimated mean and covariance is Beta-distributed), not the asymptotic chi2 one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.linalg import solve_triangular

from attn_audit.stats.distributions import _beta_sf, _binom_isf, _chi2_ppf

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
class MahalanobisQQ:
    """Squared Mahalanobis distances against chi2(d_eff) (docs/methods.md §4.4).

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
    """Shape of the sample covariance (docs/methods.md §4.5).

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
