"""The Gaussianity verdict and its frozen result (docs/methods.md §4.6).

Pure numpy (no torch). :func:`_verdict` names the departure from the rule outcomes of
:mod:`attn_audit.stats.rules`; :class:`GaussianityResult` is what
:func:`attn_audit.stats.assess.assess_gaussianity` returns, with its JSON form (:func:`to_plain`).

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from attn_audit.stats.marginal import CoordinateStats
from attn_audit.stats.normality_tests import TESTS
from attn_audit.stats.rules import GaussianityThresholds

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


# --------------------------------------------------------------------------- result


@dataclass(frozen=True, eq=False)
class GaussianityResult:
    """Gaussianity assessment of one (layer, head, site) sample of shape ``(n, d)``.

    Head-level fields are floats (NaN when not computable: ``to_dict`` writes None).
    Per-coordinate arrays have shape ``(d,)``. See :mod:`attn_audit.stats.rules` for the
    rules.

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
            covariance shape (docs/methods.md §4.5). cov_eigenvalues: shape ``(d,)``, descending.
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
        return {f.name: to_plain(getattr(self, f.name)) for f in fields(self)}


def to_plain(v: Any) -> Any:
    """Convert numpy/dataclass values to JSON-able Python (NaN and inf become None)."""
    kind = type(v)
    if kind is float:  # the common cases first (this runs for every field of every head)
        return v if math.isfinite(v) else None
    if kind is bool or kind is int or kind is str or v is None:
        return v
    if kind is np.ndarray and v.ndim == 1 and v.dtype.kind == "f":
        return [x if math.isfinite(x) else None for x in v.tolist()]
    if isinstance(v, GaussianityThresholds):
        return {f.name: to_plain(getattr(v, f.name)) for f in fields(v)}
    if isinstance(v, Mapping):
        return {str(k): to_plain(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
        return [to_plain(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [to_plain(x) for x in v]
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
