"""Gaussianity of one head's Q or K vectors (or standardized row logits): theory.md §4.

Pure numpy/scipy (no torch). Entry point: :func:`assess_gaussianity` on a sample matrix of
shape ``(n, d)`` (``d = d_head``, or ``d = 1`` for row logits) returning a frozen
:class:`GaussianityResult`; :func:`assess_gaussianity_batch` assesses many samples (e.g. all
heads of a layer) with the same results and one vectorized pass of the per-coordinate
statistics. Those live in :mod:`attn_audit.marginal`, their scores and p-values in
:mod:`attn_audit.normality_tests` (both re-exported here), the multivariate parts in
:mod:`attn_audit.mvn`.

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
  Pearson III skewness correction: see :func:`attn_audit.mvn.mardia_kurtosis_z_bounds`);
* head-level tail excess: share of squared Mahalanobis distances beyond the chi2(d) 0.999
  quantile > ``exceed_rate_abs`` (0.005, five times nominal) and above the binomial upper
  ``null_alpha`` quantile of the exact (Beta) null exceedance count.

The thresholds 0.5 and 1 for |g1| and |g2| are the usual "approximately normal" sizes
(theory.md §4.2, also used for ``share_coords_gaussian``). Mardia skewness, Henze-Zirkler,
Shapiro-Wilk, Anderson-Darling, Jarque-Bera, D'Agostino K2 and the Wasserstein distance are
reported but do not enter the verdict: Mardia skewness has a null bias of d(d+1)(d+2)/n and
little power at d = 64, HZ tends to its ceiling in high dimension (its log-normal p-value
is NaN beyond d ~ 20 at 1000 rows, where that approximation degenerates), and the rest
duplicate the moment and KS rules as p-values. Henze-Zirkler and Mardia skewness (both
O(m^2 d)) run on one seeded subsample of at most ``pairwise_max_n`` = 1000 rows,
Shapiro-Wilk on at most 5000 rows; everything else uses all rows.

Verdict (``is_gaussian`` is ``verdict == "gaussian-like"``):

1. no rule fires: ``"gaussian-like"``;
2. d >= ``outlier_min_d`` and the flagged coordinates are a minority (1 <= count <=
   ``outlier_max_share * d``) while the unflagged bulk looks normal (median |g1| and median
   |g2| of the unflagged coordinates below half the practical sizes): ``"outlier-channels"``;
3. otherwise the type of the broad departure, taken over the flagged coordinates (or from
   the head-level rules when none is flagged): ``"skewed"`` when the median |quantile
   skewness| (Hinkley: (Q95 + Q05 - 2 Q50) / (Q95 - Q05)) exceeds max(``quantile_skew_abs``
   (0.1), 3 null sd = 3 / sqrt(n)); ``"light-tailed"`` when the median g2 is negative; else
   ``"heavy-tailed"``. The robust quantile skewness decides "skewed" because the moment
   skewness of a symmetric heavy-tailed sample (e.g. Student-t with 4 dof) is itself large
   and erratic (|g1| > 0.5 in a third of t4 samples of n = 1000).

``"light-tailed"`` is a fifth value beyond the four of the issue: platykurtic or bimodal
departures (uniform, arcsine-like post-RoPE channels) are neither heavy-tailed nor skewed.
A sample that cannot be assessed (n < ``min_n``, or no non-constant coordinate) gets
``"skipped"`` with ``skipped_reason`` and ``is_gaussian = False`` (never a pass).

Summaries: ``skewness`` and ``excess_kurtosis`` are the *worst-coordinate* values (the signed
g1 / g2 of the coordinate with the largest absolute value); ``skewness_median_abs`` and
``excess_kurtosis_median`` (signed) are the typical-coordinate values; ``ks_distance`` and
``wasserstein_sigma`` are maxima over coordinates (medians alongside).

Isotropy (the theory's N(0, sigma^2 I)) is judged separately: ``is_isotropic`` when the
debiased eigenvalue coefficient of variation is <= ``isotropy_abs`` (0.3), and
``is_centered`` when ||mean|| / sqrt(tr S) <= ``mean_offset_abs`` (0.1); a normal but
anisotropic head is still "gaussian-like".

Calibration (tests/test_stats.py, 100 seeded runs per case, n in {1000, 4000} x d in
{1, 32, 64}): exact N(mu, Sigma) with Sigma of eigenvalues 1..100 in a random basis was
called non-Gaussian 0 times in 100 in every case; multivariate Student-t(4) and a
log-normal mixture (skewness ~1 per coordinate) were detected 100 times in 100, with the
verdicts "heavy-tailed" and "skewed" respectively. At n = 50 and 200 (d = 1, 4) the null
false-alarm rate was 0-1.3%.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special as spc

from attn_audit import mvn
from attn_audit.marginal import (
    QSKEW_NULL_SD,
    QSKEW_P,
    CoordinateStats,
    coordinate_stats,
    coordinate_stats_many,
)
from attn_audit.normality_tests import (
    TESTS,
    anderson_pvalue,
    bh_adjust,
    bh_adjust_joint,
    bh_adjust_rows,
    kurtosis_z,
    lilliefors_null_quantile,
    lilliefors_pvalue,
    shapiro_wilk,
    skewness_z,
)

__all__ = [  # re-exported: the per-coordinate statistics and the test calibrations
    "QSKEW_NULL_SD", "QSKEW_P", "TESTS", "VERDICTS", "CoordinateStats", "GaussianityResult",
    "GaussianityThresholds", "Verdict", "anderson_pvalue", "assess_gaussianity",
    "assess_gaussianity_batch", "bh_adjust", "bh_adjust_joint", "bh_adjust_rows",
    "coordinate_stats", "coordinate_stats_many", "kurtosis_z", "lilliefors_null_quantile",
    "lilliefors_pvalue", "shapiro_wilk", "skewness_z",
]  # fmt: skip

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

Verdict = Literal[
    "gaussian-like", "heavy-tailed", "skewed", "outlier-channels", "light-tailed", "skipped"
]
VERDICTS: tuple[str, ...] = (
    "gaussian-like",
    "heavy-tailed",
    "skewed",
    "outlier-channels",
    "light-tailed",
    "skipped",
)


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
                raise ValueError(f"GaussianityThresholds.{f.name} must be > 0")
        if not self.null_alpha < 1 or not self.outlier_max_share < 1:
            raise ValueError("null_alpha and outlier_max_share must be < 1")
        if self.min_n < 8 or self.shapiro_max_n < 8 or self.pairwise_max_n < 8:
            raise ValueError("min_n, shapiro_max_n and pairwise_max_n must be >= 8")


# --------------------------------------------------------------------------- result


@dataclass(frozen=True, eq=False)
class GaussianityResult:
    """Gaussianity assessment of one (layer, head, site) sample of shape ``(n, d)``.

    Head-level fields are floats (NaN when not computable: ``to_dict`` writes None).
    Per-coordinate arrays have shape ``(d,)``. See the module docstring for the rules.

    Attributes:
        n: rows received. n_used: finite rows assessed. d: coordinates.
        n_nonfinite_rows: rows dropped for NaN/inf. n_degenerate: constant coordinates.
        d_eff: rank used by the multivariate statistics.
        is_gaussian: ``verdict == "gaussian-like"``.
        verdict: one of :data:`VERDICTS`.
        reasons: one human-readable line per rule that fired.
        skipped_reason: why nothing was assessed, else None.
        is_isotropic: debiased ``isotropy <= isotropy_abs`` (judged apart from normality).
        is_centered: ``mean_offset <= mean_offset_abs``.
        skewness: signed g1 of the coordinate with the largest |g1|.
        skewness_median_abs: median |g1| over coordinates.
        excess_kurtosis: signed g2 of the coordinate with the largest |g2|.
        excess_kurtosis_median: median g2 over coordinates (signed).
        quantile_skewness_median_abs: median |quantile skewness| over coordinates.
        ks_distance, ks_distance_median: max / median Lilliefors KS distance.
        wasserstein_sigma, wasserstein_sigma_median: max / median W1 / sd.
        qq_corr_min: smallest normal QQ correlation over coordinates.
        share_coords_gaussian: share of coordinates with |g1| < 0.5 and |g2| < 1.
        n_coords_flagged: coordinates tripping a per-coordinate rule.
        mardia_skewness, mardia_skewness_z, mardia_skewness_pvalue: Mardia b1 and its
            chi2 calibration (z is Wilson-Hilferty).
        mardia_kurtosis, mardia_kurtosis_rel, mardia_kurtosis_z, mardia_kurtosis_pvalue:
            Mardia b2, its relative excess over the exact null mean, z and p.
        hz, hz_pvalue, hz_n: Henze-Zirkler statistic, p-value and rows used.
        mahalanobis_qq_max_dev: max |D^2 quantile - chi2 quantile| / sqrt(2 d_eff) over the
            QQ points.
        exceed_rate_999: share of D^2 above the chi2(d_eff) 0.999 quantile.
        exceed_rate_999_null: its exact expected value under normality (< 0.001).
        qq_chi2, qq_empirical: Mahalanobis QQ pairs, shape ``(qq_points,)``.
        condition_number, effective_rank, isotropy, isotropy_debiased, mean_offset:
            covariance shape (theory.md §4.4). cov_eigenvalues: shape ``(d,)``, descending.
        coord_*: per-coordinate arrays (see :class:`CoordinateStats`), shape ``(d,)``.
        coord_flagged: per-coordinate rule outcome, shape ``(d,)``.
        pvalues: raw p-values per test in :data:`TESTS`, each shape ``(d,)``.
        pvalues_bh: the same, Benjamini-Hochberg adjusted across the d coordinates.
        effective_thresholds: the thresholds actually applied at this (n, d).
        thresholds: the configuration used.
    """

    n: int
    n_used: int
    d: int
    n_nonfinite_rows: int
    n_degenerate: int
    d_eff: int
    is_gaussian: bool
    verdict: str
    reasons: tuple[str, ...]
    skipped_reason: str | None
    is_isotropic: bool
    is_centered: bool
    skewness: float
    skewness_median_abs: float
    excess_kurtosis: float
    excess_kurtosis_median: float
    quantile_skewness_median_abs: float
    ks_distance: float
    ks_distance_median: float
    wasserstein_sigma: float
    wasserstein_sigma_median: float
    qq_corr_min: float
    share_coords_gaussian: float
    n_coords_flagged: int
    mardia_skewness: float
    mardia_skewness_z: float
    mardia_skewness_pvalue: float
    mardia_kurtosis: float
    mardia_kurtosis_rel: float
    mardia_kurtosis_z: float
    mardia_kurtosis_pvalue: float
    hz: float
    hz_pvalue: float
    hz_n: int
    mahalanobis_qq_max_dev: float
    exceed_rate_999: float
    exceed_rate_999_null: float
    qq_chi2: FloatArray
    qq_empirical: FloatArray
    condition_number: float
    effective_rank: float
    isotropy: float
    isotropy_debiased: float
    mean_offset: float
    cov_eigenvalues: FloatArray
    coord_mean: FloatArray
    coord_var: FloatArray
    coord_skewness: FloatArray
    coord_excess_kurtosis: FloatArray
    coord_quantile_skewness: FloatArray
    coord_ks_distance: FloatArray
    coord_wasserstein_sigma: FloatArray
    coord_qq_corr: FloatArray
    coord_flagged: BoolArray
    pvalues: Mapping[str, FloatArray]
    pvalues_bh: Mapping[str, FloatArray]
    effective_thresholds: Mapping[str, float]
    thresholds: GaussianityThresholds = field(default_factory=GaussianityThresholds)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict: arrays to lists, NaN/inf to None, tuples to lists."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(v: Any) -> Any:
    """Convert numpy/dataclass values to JSON-able Python (NaN and inf become None)."""
    kind = type(v)
    if kind is float:  # the common cases first (this runs for every field of every head)
        return v if math.isfinite(v) else None
    if kind is bool or kind is int or kind is str or v is None:
        return v
    if kind is np.ndarray and v.ndim == 1 and v.dtype.kind == "f":
        return [x if math.isfinite(x) else None for x in v.tolist()]
    if isinstance(v, GaussianityThresholds):
        return {f.name: _plain(getattr(v, f.name)) for f in fields(v)}
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v


# --------------------------------------------------------------------------- verdict


def _nanmedian(a: FloatArray) -> float:
    """Median of the finite entries (``np.median``'s arithmetic; NaN when there are none)."""
    a = np.sort(a[np.isfinite(a)])
    k = a.size // 2
    if not a.size:
        return float("nan")
    return float(a[k]) if a.size % 2 else float((a[k - 1] + a[k]) / 2)


def _nanmax(a: FloatArray) -> float:
    a = a[np.isfinite(a)]
    return float(np.max(a)) if a.size else float("nan")


def _worst(a: FloatArray) -> float:
    """Signed entry of largest absolute value (NaN-aware)."""
    fin = np.where(np.isfinite(a), np.abs(a), -1.0)
    return float(a[int(np.argmax(fin))]) if np.isfinite(a).any() else float("nan")


def _type_of(g2: FloatArray, qskew: FloatArray, qskew_thr: float) -> str:
    """Classify a broad departure from the coordinates ``g2``/``qskew`` (shape ``(k,)``)."""
    if _nanmedian(np.abs(qskew)) > qskew_thr:
        return "skewed"
    return "light-tailed" if _nanmedian(g2) < 0 else "heavy-tailed"


def _verdict(
    cs: CoordinateStats,
    mv_heavy: bool,
    mv_light: bool,
    mv_exceed: bool,
    flags: BoolArray,
    th: GaussianityThresholds,
    qskew_thr: float,
) -> str:
    """Apply the verdict rule of the module docstring."""
    n_flag = int(flags.sum())
    d = flags.size
    if n_flag == 0 and not (mv_heavy or mv_light or mv_exceed):
        return "gaussian-like"
    if d >= th.outlier_min_d and 1 <= n_flag <= th.outlier_max_share * d:
        bulk = ~flags & np.isfinite(cs.skewness)
        if (
            bulk.any()
            and _nanmedian(np.abs(cs.skewness[bulk])) < th.skew_abs / 2
            and _nanmedian(np.abs(cs.excess_kurtosis[bulk])) < th.kurt_abs / 2
        ):
            return "outlier-channels"
    if n_flag == 0:  # only head-level rules fired
        if _nanmedian(np.abs(cs.quantile_skewness)) > qskew_thr:
            return "skewed"
        return "light-tailed" if mv_light else "heavy-tailed"
    return _type_of(cs.excess_kurtosis[flags], cs.quantile_skewness[flags], qskew_thr)


# --------------------------------------------------------------------------- entry point


def _skipped(
    n: int, d: int, n_used: int, n_bad: int, reason: str, th: GaussianityThresholds
) -> GaussianityResult:
    """A result carrying no statistics, for samples that cannot be assessed."""
    nan = float("nan")
    arr = np.full(d, np.nan)
    qq = np.full(th.qq_points, np.nan)
    nanmap = {t: arr.copy() for t in TESTS}
    return GaussianityResult(
        n=n, n_used=n_used, d=d, n_nonfinite_rows=n_bad, n_degenerate=0, d_eff=0,
        is_gaussian=False, verdict="skipped", reasons=(), skipped_reason=reason,
        is_isotropic=False, is_centered=False, skewness=nan, skewness_median_abs=nan,
        excess_kurtosis=nan, excess_kurtosis_median=nan, quantile_skewness_median_abs=nan,
        ks_distance=nan, ks_distance_median=nan, wasserstein_sigma=nan,
        wasserstein_sigma_median=nan, qq_corr_min=nan, share_coords_gaussian=nan,
        n_coords_flagged=0, mardia_skewness=nan, mardia_skewness_z=nan,
        mardia_skewness_pvalue=nan, mardia_kurtosis=nan, mardia_kurtosis_rel=nan,
        mardia_kurtosis_z=nan, mardia_kurtosis_pvalue=nan, hz=nan, hz_pvalue=nan, hz_n=0,
        mahalanobis_qq_max_dev=nan, exceed_rate_999=nan, exceed_rate_999_null=nan,
        qq_chi2=qq, qq_empirical=qq.copy(), condition_number=nan, effective_rank=nan,
        isotropy=nan, isotropy_debiased=nan, mean_offset=nan, cov_eigenvalues=arr.copy(),
        coord_mean=arr.copy(), coord_var=arr.copy(), coord_skewness=arr.copy(),
        coord_excess_kurtosis=arr.copy(), coord_quantile_skewness=arr.copy(),
        coord_ks_distance=arr.copy(), coord_wasserstein_sigma=arr.copy(),
        coord_qq_corr=arr.copy(), coord_flagged=np.zeros(d, dtype=bool), pvalues=nanmap,
        pvalues_bh={t: arr.copy() for t in TESTS}, effective_thresholds={}, thresholds=th,
    )  # fmt: skip


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

    mardia: mvn.MardiaResult
    qq: mvn.MahalanobisQQ
    pairwise: mvn.PairwiseResult
    heavy: bool
    light: bool
    exceed: bool
    mardia_z_bounds: tuple[float, float]
    exceed_threshold: float


def _head_rules(
    xo: FloatArray, w: mvn.Whitened | mvn.Distances, pair_rows: NDArray[np.intp] | None,
    th: GaussianityThresholds,
) -> _HeadRules | None:  # fmt: skip
    """Mardia, Henze-Zirkler, Mahalanobis QQ and the head-level rules; None if n <= d + 1.

    ``w`` is ``whiten(xo)`` when ``pair_rows`` is None (the pairwise statistics reuse it).
    """
    n = xo.shape[0]
    if w.d_eff < 1 or n <= w.d_eff + 1:
        return None
    if pair_rows is None:
        assert isinstance(w, mvn.Whitened)
        pw = mvn.pairwise_stats(xo, w)
    else:
        pw = mvn.pairwise_stats(xo[pair_rows])
    md = mvn.mardia(w, pw)
    mq = mvn.mahalanobis_qq(w, th.qq_points, th.null_alpha)
    z_lo, z_hi = mvn.mardia_kurtosis_z_bounds(n, w.d_eff, th.null_alpha)
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


def _prepare(samples: ArrayLike) -> tuple[FloatArray, int]:
    """``(n, d)`` float64 view of a sample without its non-finite rows; rows received."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"samples must have shape (n, d) or (n,), got {x.shape}")
    n_in = x.shape[0]
    if np.isfinite(x).all():  # the common case, without the per-row reduction
        return x, n_in
    return x[np.isfinite(x).all(axis=1)], n_in


def assess_gaussianity(
    samples: ArrayLike,
    thresholds: GaussianityThresholds | None = None,
    seed: int = 0,
) -> GaussianityResult:
    """Assess how Gaussian one head's vectors (or one set of row logits) are.

    Args:
        samples: shape ``(n, d)`` (rows = tokens, columns = head coordinates) or ``(n,)``
            (treated as d = 1, e.g. standardized row logits). Rows with NaN/inf are dropped.
        thresholds: verdict thresholds; defaults to :class:`GaussianityThresholds`.
        seed: seed of the row subsamples (Shapiro-Wilk, Henze-Zirkler, Mardia skewness).

    Returns:
        The frozen result; ``is_gaussian`` and ``verdict`` come from effect sizes only.

    Raises:
        ValueError: if ``samples`` is not 1-D or 2-D.
    """
    return assess_gaussianity_batch([samples], thresholds, seed)[0]


def assess_gaussianity_batch(
    samples: Sequence[ArrayLike],
    thresholds: GaussianityThresholds | None = None,
    seed: int = 0,
) -> list[GaussianityResult]:
    """:func:`assess_gaussianity` of several samples (e.g. the heads of one layer) at once.

    Each result is the one :func:`assess_gaussianity` gives for that sample alone (same seed,
    so the same row subsamples); samples with the same number of finite rows share one
    vectorized pass of the per-coordinate statistics.

    Args:
        samples: a sequence of samples, each of shape ``(n_i, d_i)`` or ``(n_i,)``; an array
            of shape ``(B, n, d)`` is B samples.
        thresholds: verdict thresholds; defaults to :class:`GaussianityThresholds`.
        seed: seed of the row subsamples.

    Returns:
        One result per sample, in order.

    Raises:
        ValueError: if a sample is not 1-D or 2-D.
    """
    th = thresholds if thresholds is not None else GaussianityThresholds()
    prepared = [_prepare(s) for s in samples]
    out: list[GaussianityResult | None] = [None] * len(prepared)
    groups: dict[int, list[int]] = {}
    for b, (x, n_in) in enumerate(prepared):
        n, d = x.shape
        if n < th.min_n:
            reason = f"only {n} finite rows (< min_n = {th.min_n})"
            out[b] = _skipped(n_in, d, n, n_in - n, reason, th)
        else:
            groups.setdefault(n, []).append(b)
    for n, members in groups.items():
        # The subsamples depend on (seed, n) only: the same for every sample of the group.
        rng = np.random.default_rng(seed)

        def rows(cap: int) -> NDArray[np.intp] | None:
            return None if n <= cap else np.sort(rng.choice(n, size=cap, replace=False))

        shapiro_rows = rows(th.shapiro_max_n)
        pair_rows = rows(th.pairwise_max_n)
        xs = [prepared[b][0] for b in members]
        for b, x, cs in zip(members, xs, coordinate_stats_many(xs, shapiro_rows), strict=True):
            out[b] = _assess_one(x, prepared[b][1], cs, pair_rows, th)
    return [r for r in out if r is not None]


def _assess_one(
    x: FloatArray, n_in: int, cs: CoordinateStats, pair_rows: NDArray[np.intp] | None,
    th: GaussianityThresholds,
) -> GaussianityResult:  # fmt: skip
    """Rules, multivariate statistics and verdict of one sample given its coordinate stats."""
    n, d = x.shape
    n_bad = n_in - n
    ok = np.isfinite(cs.skewness)
    if not ok.any():
        return _skipped(n_in, d, n, n_bad, "every coordinate is constant", th)
    cr = _coordinate_rules(cs, n, th)
    flags = cr.flags
    xo = x if ok.all() else x[:, ok]
    # Without a row subsample the pairwise statistics need the whitened rows themselves;
    # otherwise the distances suffice (cheaper).
    w = mvn.whiten(xo) if pair_rows is None else mvn.mahalanobis(xo)
    hr = _head_rules(xo, w, pair_rows, th)
    qskew_thr = max(th.quantile_skew_abs, 3 * QSKEW_NULL_SD / math.sqrt(n))
    verdict = _verdict(cs, hr is not None and hr.heavy, hr is not None and hr.light,
                       hr is not None and hr.exceed, flags, th, qskew_thr)  # fmt: skip
    evals = np.zeros(d)  # constant coordinates contribute zero eigenvalues
    evals[: w.eigenvalues.size] = w.eigenvalues * n / (n - 1)
    shape = mvn.covariance_shape(evals, cs.mean, n)
    nan = float("nan")
    if hr is None:
        qq_nan = np.full(th.qq_points, np.nan)
        md = mvn.MardiaResult(nan, nan, nan, nan, nan, nan, nan, 0)
        mq = mvn.MahalanobisQQ(nan, nan, nan, 0, qq_nan, qq_nan.copy())
        pw = mvn.PairwiseResult(0, nan, nan, nan, 0)
        mz_lo, mz_hi, exc_thr = nan, nan, nan
    else:
        md, mq, pw = hr.mardia, hr.qq, hr.pairwise
        (mz_lo, mz_hi), exc_thr = hr.mardia_z_bounds, hr.exceed_threshold
    g1, g2 = cs.skewness, cs.excess_kurtosis
    with np.errstate(invalid="ignore"):
        good = (np.abs(g1) < 0.5) & (np.abs(g2) < 1.0)
    pvalues = dict(cs.pvalues)
    bh = bh_adjust_rows(np.stack([pvalues[t] for t in TESTS]))
    return GaussianityResult(
        n=n_in, n_used=n, d=d, n_nonfinite_rows=n_bad, n_degenerate=int((~ok).sum()),
        d_eff=w.d_eff, is_gaussian=verdict == "gaussian-like", verdict=verdict,
        reasons=_reasons(cr, hr, d, n, w.d_eff, th), skipped_reason=None,
        is_isotropic=bool(shape.isotropy_debiased <= th.isotropy_abs),
        is_centered=bool(shape.mean_offset <= th.mean_offset_abs),
        skewness=_worst(g1), skewness_median_abs=_nanmedian(np.abs(g1)),
        excess_kurtosis=_worst(g2), excess_kurtosis_median=_nanmedian(g2),
        quantile_skewness_median_abs=_nanmedian(np.abs(cs.quantile_skewness)),
        ks_distance=_nanmax(cs.ks_distance), ks_distance_median=_nanmedian(cs.ks_distance),
        wasserstein_sigma=_nanmax(cs.wasserstein_sigma),
        wasserstein_sigma_median=_nanmedian(cs.wasserstein_sigma),
        qq_corr_min=float(np.nanmin(cs.qq_corr)),
        share_coords_gaussian=float(good[ok].mean()), n_coords_flagged=int(flags.sum()),
        mardia_skewness=md.skewness, mardia_skewness_z=md.skewness_z,
        mardia_skewness_pvalue=md.skewness_pvalue, mardia_kurtosis=md.kurtosis,
        mardia_kurtosis_rel=md.kurtosis_rel, mardia_kurtosis_z=md.kurtosis_z,
        mardia_kurtosis_pvalue=md.kurtosis_pvalue, hz=pw.hz, hz_pvalue=pw.hz_pvalue,
        hz_n=pw.m, mahalanobis_qq_max_dev=mq.max_dev, exceed_rate_999=mq.exceed_rate_999,
        exceed_rate_999_null=mq.exceed_rate_999_null, qq_chi2=mq.qq_chi2,
        qq_empirical=mq.qq_empirical, condition_number=shape.condition_number,
        effective_rank=shape.effective_rank, isotropy=shape.isotropy,
        isotropy_debiased=shape.isotropy_debiased, mean_offset=shape.mean_offset,
        cov_eigenvalues=shape.eigenvalues, coord_mean=cs.mean, coord_var=cs.var,
        coord_skewness=g1, coord_excess_kurtosis=g2,
        coord_quantile_skewness=cs.quantile_skewness, coord_ks_distance=cs.ks_distance,
        coord_wasserstein_sigma=cs.wasserstein_sigma, coord_qq_corr=cs.qq_corr,
        coord_flagged=flags, pvalues=pvalues,
        pvalues_bh={t: bh[i] for i, t in enumerate(TESTS)},
        effective_thresholds={
            "z_coordinate": cr.z, "ks_distance": cr.ks_threshold,
            "quantile_skewness": qskew_thr, "mardia_z_low": mz_lo, "mardia_z_high": mz_hi,
            "exceed_rate_999": exc_thr, "skewness_abs": th.skew_abs,
            "excess_kurtosis_abs": th.kurt_abs, "mardia_kurtosis_rel": th.mardia_kurt_rel_abs,
        },
        thresholds=th,
    )  # fmt: skip
