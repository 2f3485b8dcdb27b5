"""Thresholds and rules of the Gaussianity verdict: what counts as a departure (docs/methods.md §4.6).

Pure numpy/scipy (no torch). :class:`GaussianityThresholds` holds the effect-size thresholds;
the per-coordinate rules and the head-level rules on the multivariate statistics
(docs/methods.md §4.6, on the statistics of §4.2 and §4.4) decide which of them a sample trips. :mod:`attn_audit.stats.verdict`
turns the outcomes into a verdict, :mod:`attn_audit.stats.assess` runs the assessment.

Why effect sizes, not p-values
------------------------------
With the thousands of tokens a model yields, every normality test rejects: p-values measure
the sample size as much as the departure. All tests are still run and reported (raw and
Benjamini-Hochberg adjusted per coordinate), but the verdict is taken from *effect sizes*,
each compared with a threshold of the form

    effect > max(practical size, null sampling spread at this n and d)

("practically large AND not explainable by sampling noise"). The practical sizes are fixed
(class :class:`GaussianityThresholds`); the null-spread term is the upper ``null_alpha``
quantile of the statistic under exact normality, Bonferroni-split over the ``d`` coordinates
(per-coordinate statistics) so that an exactly Gaussian head trips any single rule with
probability ~``null_alpha`` at *every* n (all rules together: <= 0.6% per head measured at
n = 50..400, d = 1..8; ~0 at n >= 1000). At the tool's sizes (n >= 1000) the practical
size dominates; the spread term takes over for small samples (e.g. n = 100 row logits), where
a fixed threshold alone would flag Gaussian data. A pure fixed threshold cannot be calibrated
at every n, a pure p-value rule flags everything at large n; this rule does neither.

Rules (defaults; ``z*_d = Phi^-1(1 - null_alpha / (2d))``):

* heavy coordinate: excess kurtosis g2 > ``kurt_abs`` (1.0) and the Anscombe-Glynn z of g2
  > z*_d (the g2 sampling law is strongly right-skewed at moderate n, the transform is not);
* light coordinate: g2 < -``kurt_abs`` and z < -z*_d (platykurtic, bimodal, e.g. post-RoPE
  arcsine-like channels);
* skewed coordinate: |g1| > ``skew_abs`` (0.5) and |D'Agostino z of g1| > z*_d;
* KS coordinate: Lilliefors KS distance > max(``ks_abs`` (0.05), its null quantile at
  ``null_alpha / d``; Dallal-Wilkinson approximation);
* head-level heavy/light: |Mardia relative excess kurtosis| > ``mardia_kurt_rel_abs`` (1/3,
  which for an elliptical law equals a marginal excess kurtosis of 1, i.e. ``kurt_abs``)
  and its z beyond the null ``null_alpha`` quantiles (exact finite-n null mean and variance,
  Pearson III skewness correction: see :func:`attn_audit.stats.mardia.mardia_kurtosis_z_bounds`);
* head-level tail excess: share of squared Mahalanobis distances beyond the chi2(d) 0.999
  quantile > ``exceed_rate_abs`` (0.005, five times nominal) and above the binomial upper
  ``null_alpha`` quantile of the exact (Beta) null exceedance count.

The thresholds 0.5 and 1 for |g1| and |g2| are the usual "approximately normal" sizes
(docs/methods.md §4.2, also used for ``share_coords_gaussian``). Mardia skewness, Henze-Zirkler,
Shapiro-Wilk, Anderson-Darling, Jarque-Bera, D'Agostino K2 and the Wasserstein distance are
reported but do not enter the verdict: Mardia skewness has a null bias of d(d+1)(d+2)/n and
little power at d = 64, HZ tends to its ceiling in high dimension (its log-normal p-value
is NaN beyond d ~ 20 at 1000 rows, where that approximation degenerates), and the rest
duplicate the moment and KS rules as p-values. Henze-Zirkler and Mardia skewness (both
O(m^2 d)) run on one seeded subsample of at most ``pairwise_max_n`` = 1000 rows,
Shapiro-Wilk on at most 5000 rows; everything else uses all rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import NDArray
from scipy import special as spc

from attn_audit.errors import ConfigError
from attn_audit.stats.henze_zirkler import PairwiseResult, pairwise_stats
from attn_audit.stats.mardia import MardiaResult, mardia, mardia_kurtosis_z_bounds
from attn_audit.stats.marginal import CoordinateStats
from attn_audit.stats.normality_tests import lilliefors_null_quantile
from attn_audit.stats.whitening import (
    Distances,
    MahalanobisQQ,
    Whitened,
    mahalanobis_qq,
)

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


@dataclass(frozen=True)
class GaussianityThresholds:
    """Effect-size thresholds of the verdict (see the module docstring for the rules).

    Attributes:
        skew_abs: practical |skewness g1| of a coordinate.
        kurt_abs: practical |excess kurtosis g2| of a coordinate.
        ks_abs: practical Lilliefors KS distance of a coordinate.
        mardia_kurt_rel_abs: practical |Mardia b2 / E0[b2] - 1| of the head.
        exceed_rate_abs: practical share of rows beyond the chi2(d) 0.999 quantile.
        quantile_skew_abs: median |quantile skewness| above which a departure is
            called "skewed" rather than heavy-/light-tailed.
        null_alpha: per-rule probability that exact normality trips the null-spread term
            (Bonferroni over coordinates); it is a spread bound, never the verdict itself.
        outlier_max_share: largest share of flagged coordinates still called
            "outlier-channels".
        outlier_min_d: smallest d for which "outlier-channels" is possible.
        isotropy_abs: largest debiased eigenvalue coefficient of variation for
            ``is_isotropic``.
        mean_offset_abs: largest ||mean|| / sqrt(tr S) for ``is_centered``.
        min_n: fewest rows assessed; fewer gives verdict "skipped".
        shapiro_max_n: Shapiro-Wilk row subsample bound.
        pairwise_max_n: row subsample bound of the O(n^2 d) statistics (Henze-Zirkler and
            Mardia skewness).
        qq_points: number of Mahalanobis QQ pairs kept.
    """

    skew_abs: float = 0.5
    kurt_abs: float = 1.0
    ks_abs: float = 0.05
    mardia_kurt_rel_abs: float = 1.0 / 3.0
    exceed_rate_abs: float = 0.005
    quantile_skew_abs: float = 0.1
    null_alpha: float = 1e-3
    outlier_max_share: float = 0.25
    outlier_min_d: int = 4
    isotropy_abs: float = 0.3
    mean_offset_abs: float = 0.1
    min_n: int = 20
    shapiro_max_n: int = 5000
    pairwise_max_n: int = 1000
    qq_points: int = 50

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ConfigError(f"GaussianityThresholds.{f.name} must be > 0")
        if not self.null_alpha < 1 or not self.outlier_max_share < 1:
            raise ConfigError("null_alpha and outlier_max_share must be < 1")
        if self.min_n < 8 or self.shapiro_max_n < 8 or self.pairwise_max_n < 8:
            raise ConfigError("min_n, shapiro_max_n and pairwise_max_n must be >= 8")

@dataclass(frozen=True)
class _CoordinateRules:
    """Per-coordinate rule outcomes (boolean arrays of shape ``(d,)``) and their thresholds."""

    heavy: BoolArray
    light: BoolArray
    skew: BoolArray
    ks: BoolArray
    z: float
    ks_threshold: float

    @property
    def flags(self) -> BoolArray:
        return self.heavy | self.light | self.skew | self.ks


@functools.lru_cache(maxsize=256)
def _z_star(alpha: float, d: int) -> float:
    """z*_d = Phi^-1(1 - alpha / (2d)) (``scipy.stats.norm.isf(alpha / (2d))``)."""
    return float(-spc.ndtri(alpha / (2 * d)))


def _coordinate_rules(cs: CoordinateStats, n: int, th: GaussianityThresholds) -> _CoordinateRules:
    """Practical size AND beyond the null spread z*_d, per coordinate (module docstring)."""
    d_ok = int(np.isfinite(cs.skewness).sum())
    z_d = _z_star(th.null_alpha, d_ok)
    ks_thr = max(th.ks_abs, lilliefors_null_quantile(n, th.null_alpha / d_ok))
    g1, g2 = cs.skewness, cs.excess_kurtosis
    with np.errstate(invalid="ignore"):
        return _CoordinateRules(
            heavy=(g2 > th.kurt_abs) & (cs.kurtosis_z > z_d),
            light=(g2 < -th.kurt_abs) & (cs.kurtosis_z < -z_d),
            skew=(np.abs(g1) > th.skew_abs) & (np.abs(cs.skewness_z) > z_d),
            ks=cs.ks_distance > ks_thr,
            z=z_d,
            ks_threshold=ks_thr,
        )


@dataclass(frozen=True)
class _HeadRules:
    """Multivariate statistics and head-level rule outcomes."""

    mardia: MardiaResult
    qq: MahalanobisQQ
    pairwise: PairwiseResult
    heavy: bool
    light: bool
    exceed: bool
    mardia_z_bounds: tuple[float, float]
    exceed_threshold: float


def _head_rules(
    xo: FloatArray, w: Whitened | Distances, pair_rows: NDArray[np.intp] | None,
    th: GaussianityThresholds,
) -> _HeadRules | None:  # fmt: skip
    """Mardia, Henze-Zirkler, Mahalanobis QQ and the head-level rules; None if n <= d + 1.

    ``w`` is ``whiten(xo)`` when ``pair_rows`` is None (the pairwise statistics reuse it).
    """
    n = xo.shape[0]
    if w.d_eff < 1 or n <= w.d_eff + 1:
        return None
    if pair_rows is None:
        assert isinstance(w, Whitened)
        pw = pairwise_stats(xo, w)
    else:
        pw = pairwise_stats(xo[pair_rows])
    md = mardia(w, pw)
    mq = mahalanobis_qq(w, th.qq_points, th.null_alpha)
    z_lo, z_hi = mardia_kurtosis_z_bounds(n, w.d_eff, th.null_alpha)
    exc_thr = max(th.exceed_rate_abs * n, float(mq.exceed_count_null_max))
    return _HeadRules(
        mardia=md,
        qq=mq,
        pairwise=pw,
        heavy=md.kurtosis_rel > th.mardia_kurt_rel_abs and md.kurtosis_z > z_hi,
        light=md.kurtosis_rel < -th.mardia_kurt_rel_abs and md.kurtosis_z < z_lo,
        exceed=mq.exceed_rate_999 * n > exc_thr,
        mardia_z_bounds=(z_lo, z_hi),
        exceed_threshold=exc_thr / n,
    )


def _reasons(
    cr: _CoordinateRules, hr: _HeadRules | None, d: int, n: int, d_eff: int,
    th: GaussianityThresholds,
) -> tuple[str, ...]:  # fmt: skip
    """One human-readable line per rule that fired (plus a note when mv stats are skipped)."""
    out: list[str] = []
    for mask, what, thr in ((cr.heavy, "excess kurtosis >", th.kurt_abs),
                            (cr.light, "excess kurtosis <", -th.kurt_abs),
                            (cr.skew, "|skewness| >", th.skew_abs),
                            (cr.ks, "KS distance >", cr.ks_threshold)):  # fmt: skip
        if mask.any():
            out.append(f"{int(mask.sum())}/{d} coordinates with {what} {thr:.3g}")
    if hr is None:
        out.append(f"multivariate statistics skipped: n = {n} <= d_eff + 1 = {d_eff + 1}")
        return tuple(out)
    if hr.heavy or hr.light:
        out.append(
            f"Mardia relative excess kurtosis {hr.mardia.kurtosis_rel:+.3g} "
            f"(|.| > {th.mardia_kurt_rel_abs:.3g}, z = {hr.mardia.kurtosis_z:.1f})"
        )
    if hr.exceed:
        out.append(
            f"Mahalanobis exceedance rate {hr.qq.exceed_rate_999:.4f} beyond the "
            f"chi2 0.999 quantile (> {hr.exceed_threshold:.4f})"
        )
    return tuple(out)
