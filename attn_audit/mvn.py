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

Where each part lives (the public names are re-exported here):

* :mod:`attn_audit.whitening`: :func:`whiten`, :func:`mahalanobis` (squared distances),
  :func:`mahalanobis_qq` (against chi2) and :func:`covariance_shape`;
* :mod:`attn_audit.mardia`: Mardia's skewness and kurtosis, the kurtosis null laws;
* :mod:`attn_audit.henze_zirkler`: :func:`pairwise_stats` (Henze-Zirkler and the Mardia
  skewness sums on a row subsample);
* :mod:`attn_audit.distributions`: the scipy.stats laws behind the null calibrations.
"""

from __future__ import annotations

from attn_audit.henze_zirkler import PairwiseResult, pairwise_stats
from attn_audit.mardia import MardiaResult, mardia, mardia_kurtosis_null, mardia_kurtosis_z_bounds
from attn_audit.whitening import (
    CovarianceShape,
    Distances,
    MahalanobisQQ,
    Whitened,
    covariance_shape,
    mahalanobis,
    mahalanobis_qq,
    whiten,
)

__all__ = [
    "CovarianceShape", "Distances", "MahalanobisQQ", "MardiaResult", "PairwiseResult", "Whitened",
    "covariance_shape", "mahalanobis", "mahalanobis_qq", "mardia", "mardia_kurtosis_null",
    "mardia_kurtosis_z_bounds", "pairwise_stats", "whiten",
]  # fmt: skip
