"""Per-coordinate (marginal) normality statistics and their p-values: docs/methods.md §4.2.

Pure numpy/scipy (no torch). :func:`coordinate_stats` computes every per-coordinate statistic
of :func:`attn_audit.stats.assess.assess_gaussianity` for all columns of a sample matrix at once;
:func:`coordinate_stats_many` does the same for several samples with the same number of rows
(e.g. all heads of a layer), sharing the vectorized passes.

Speed notes (each statistic and p-value is the textbook one, equal to the scipy.stats
reference up to float rounding; only the evaluation is shared; docs/methods.md §12 times it
against scipy.stats with ``axis=``):

* the columns are processed as rows of a transposed block of about 1 MiB (cache-resident);
* one sort per column serves the KS, Anderson-Darling, Wasserstein, QQ, quantile and
  Shapiro-Wilk statistics (standardising is monotone, so sorting the centred values and
  dividing by the sd gives exactly the sorted standardized values);
* one ``Phi(z)`` evaluation per value; ``1 - Phi(z)`` is taken from it except in the upper
  tail (z > 1.5), where ``Phi(-z)`` keeps its relative precision;
* the Anderson-Darling sum is taken in its paired form
  ``sum_i (2i - 1) log(Phi(z_i) (1 - Phi(z_{n+1-i})))``: one logarithm per value;
* the Wasserstein distance needs ``phi(z)`` only for the few order statistics whose
  probability interval contains ``Phi(z)``;
* Shapiro-Wilk (Royston 1995, algorithm AS R94, as in ``scipy.stats.shapiro``) is vectorized
  over columns;
* everything that depends only on ``n`` (plotting positions, Blom scores, the Wasserstein
  grid, Shapiro-Wilk coefficients) is cached.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import special as spc

from attn_audit.stats.normality_tests import (
    TESTS,
    anderson_pvalue,
    kurtosis_z,
    lilliefors_pvalue,
    shapiro_wilk,
    shapiro_wilk_from_sums,
    skewness_z,
    swilk_constants,
)

FloatArray = NDArray[np.float64]

# Asymptotic sd of the Hinkley quantile skewness at p = 0.05 under normality, times sqrt(n)
# (delta method on the sample quantiles: 3.290 / (2 * 1.645) = 1.000).
QSKEW_P = 0.05
QSKEW_NULL_SD = 1.0


# --------------------------------------------------------------------------- per coordinate


@dataclass(frozen=True)
class CoordinateStats:
    """Per-coordinate statistics; every array has shape ``(d,)``, NaN for constant columns.

    Attributes:
        mean, var: sample mean and unbiased variance.
        skewness, excess_kurtosis: Fisher g1 and g2 (biased moment estimators).
        skewness_z, kurtosis_z: D'Agostino and Anscombe-Glynn normal scores of g1 and g2.
        quantile_skewness: Hinkley's (Q95 + Q05 - 2 Q50) / (Q95 - Q05).
        ks_distance: sup |F_n - Phi| after standardising (Lilliefors statistic).
        wasserstein_sigma: W1 to the fitted normal, in units of the sample sd.
        qq_corr: correlation of the ordered sample with Blom normal scores.
        anderson: Anderson-Darling A^2 (estimated parameters).
        pvalues: raw p-values per test name in :data:`TESTS`.
    """

    mean: FloatArray
    var: FloatArray
    skewness: FloatArray
    excess_kurtosis: FloatArray
    skewness_z: FloatArray
    kurtosis_z: FloatArray
    quantile_skewness: FloatArray
    ks_distance: FloatArray
    wasserstein_sigma: FloatArray
    qq_corr: FloatArray
    anderson: FloatArray
    pvalues: Mapping[str, FloatArray]


_SQRT_2PI = math.sqrt(2 * math.pi)
# Columns are processed in blocks of about this many elements, so that the ~10 temporaries
# of a block stay in the CPU cache (2040 x 64 float64 = 1 MiB each).
_BLOCK_ELEMENTS = 1 << 17
# Above this z, 1 - Phi(z) is taken from Phi(-z) rather than from 1 - Phi(z) (the latter's
# relative error grows like 1e-16 / (1 - Phi(z)); at 1.5 it is below 2e-15).
_UPPER_TAIL_Z = 1.5


def _phi(z: FloatArray) -> FloatArray:
    """Standard normal density (plain numpy; scipy's ``norm.pdf`` is slow on big arrays)."""
    return np.exp(-0.5 * z * z) / _SQRT_2PI


@dataclass(frozen=True)
class _SizeConstants:
    """Arrays that depend only on the sample size n, each shape ``(n,)``."""

    u0: FloatArray  # (i - 1) / n, i = 1..n
    u1: FloatArray  # i / n
    du: FloatArray  # u1 - u0
    g0: FloatArray  # G(u0), G(u1) with G(u) = -phi(Phi^-1(u)), the antiderivative of Phi^-1
    g1: FloatArray
    dg: FloatArray  # g0 - g1
    ad_weights: FloatArray  # 2i - 1
    blom: FloatArray  # centred Blom scores Phi^-1((i - 3/8) / (n + 1/4))
    blom_sum: float  # their sum (~1e-16) and sum of squares
    blom_ss: float


@functools.lru_cache(maxsize=64)
def _size_constants(n: int) -> _SizeConstants:
    i = np.arange(1, n + 1)
    u = np.arange(n + 1) / n
    g = -_phi(spc.ndtri(u))  # G(0) = G(1) = 0
    blom = spc.ndtri((i - 0.375) / (n + 0.25))
    blom = blom - blom.mean()
    return _SizeConstants(
        u0=u[:-1], u1=u[1:], du=u[1:] - u[:-1], g0=g[:-1], g1=g[1:], dg=g[:-1] - g[1:],
        ad_weights=(2 * i - 1).astype(np.float64), blom=blom, blom_sum=float(blom.sum()),
        blom_ss=float(blom @ blom),
    )  # fmt: skip


def _wasserstein_std(
    z: FloatArray, cdf: FloatArray, above: FloatArray, c: _SizeConstants
) -> FloatArray:
    """W1 between the empirical law of each sorted standardized row and N(0, 1).

    Exact: the sum over order statistics of the integral of |z_(i) - Phi^-1(u)| over
    u in [(i-1)/n, i/n], with the antiderivative G(u) = -phi(Phi^-1(u)) of Phi^-1. Where
    Phi(z_(i)) lies outside that interval the integrand keeps one sign and the piece is
    |h_i|, h_i = z_(i) / n - (G(i/n) - G((i-1)/n)); only the few intervals containing
    Phi(z_(i)) need phi(z_(i)): there the piece is
    z_(i) (2 Phi(z_(i)) - u0 - u1) + G(u0) + G(u1) + 2 phi(z_(i)).

    Args:
        z: sorted standardized samples, shape ``(k, n)``.
        cdf: ``Phi(z)``, shape ``(k, n)``.
        above: ``cdf - i/n``, shape ``(k, n)``.
        c: the size constants of n.

    Returns:
        Shape ``(k,)``.
    """
    n = z.shape[1]
    h = z * c.du
    h += c.dg
    out: FloatArray = np.abs(h, out=h).sum(axis=1)
    inside = above <= 0.0
    inside &= above >= -c.du  # Phi(z_(i)) in [(i-1)/n, i/n]
    flat = np.flatnonzero(inside)
    if flat.size:  # replace |h_i| by the piece of a crossing interval
        r, i = np.divmod(flat, n)
        zi, fi = z[r, i], cdf[r, i]
        piece = zi * (2 * fi - c.u0[i] - c.u1[i]) + c.g0[i] + c.g1[i] + 2 * _phi(zi)
        piece -= np.abs(zi * c.du[i] + c.dg[i])
        out += np.bincount(r, weights=piece, minlength=z.shape[0])
    return out


def _sorted_quantile(z: FloatArray, p: float) -> FloatArray:
    """Linear-interpolation quantile (numpy's default) of rows already sorted, shape ``(k,)``."""
    m = z.shape[-1]
    h = (m - 1) * p
    lo = math.floor(h)
    hi = min(lo + 1, m - 1)
    q: FloatArray = z[:, lo] + (h - lo) * (z[:, hi] - z[:, lo])
    return q


def _upper_tail_width(z: FloatArray, threshold: float) -> int:
    """Number of trailing columns holding every entry above ``threshold`` of rows sorted
    along axis 1 (binary search on the column maxima, which never decrease)."""
    lo, hi = 0, z.shape[1]  # the first column with an entry above lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if np.max(z[:, mid]) > threshold:  # NaN rows compare False
            hi = mid
        else:
            lo = mid + 1
    return z.shape[1] - lo


def _anderson_darling(z: FloatArray, cdf: FloatArray, c: _SizeConstants) -> FloatArray:
    """A^2 = -n - sum_i (2i - 1) [log Phi(z_i) + log(1 - Phi(z_{n+1-i}))] / n per sorted row.

    One logarithm per term (of the product); 1 - Phi is evaluated as Phi(-z) in the upper
    tail, where 1 - Phi(z) would lose relative precision.
    """
    n = z.shape[1]
    prod = 1.0 - cdf[:, ::-1]  # 1 - Phi(z_{n+1-i})
    tail = _upper_tail_width(z, _UPPER_TAIL_Z)
    if tail:
        prod[:, :tail] = spc.ndtr(-z[:, n - tail :][:, ::-1])
    prod *= cdf
    tiny = bool(np.fmin.reduce(prod, axis=None) < 1e-290)  # underflow (fmin skips NaN rows):
    # take the two logarithms separately there
    if tiny:
        where = prod < 1e-290
        sf_rev = spc.ndtr(-z[:, ::-1])
    logs = np.log(prod, out=prod)
    if tiny:
        logs[where] = np.log(cdf[where]) + np.log(sf_rev[where])
    a2: FloatArray = -n - (logs @ c.ad_weights) / n
    return a2


def _block_stats(xt: FloatArray, shapiro_rows: NDArray[np.intp] | None) -> dict[str, FloatArray]:
    """Statistics of the rows of ``xt`` (shape ``(k, n)``: one row per coordinate).

    Constant rows give NaN (they are masked by the caller). Returns arrays of shape ``(k,)``.
    """
    k, n = xt.shape
    c = _size_constants(n)
    mean = xt.mean(axis=1)
    xc = xt - mean[:, None]
    xc2 = xc * xc
    ss = xc2.sum(axis=1)
    var = ss / (n - 1)
    m2 = ss / n
    g1 = np.einsum("ij,ij->i", xc2, xc) / n / m2**1.5
    g2 = np.einsum("ij,ij->i", xc2, xc2) / n / (m2 * m2) - 3.0
    del xc2
    # Standardising is monotone, so sorting the centred values and dividing gives exactly the
    # sorted standardized sample.
    xc.sort(axis=1)
    z = xc / np.sqrt(var)[:, None]
    cdf = spc.ndtr(z)
    above = cdf - c.u1  # Phi(z_(i)) - i/n
    ks = np.maximum(-above.min(axis=1), above.max(axis=1) + 1.0 / n)
    # z has mean ~1e-17 and sum of squares n - 1; the centred sums follow without a centred copy.
    zbar = z.mean(axis=1)
    zss = np.einsum("ij,ij->i", z, z) - n * zbar * zbar
    qq = (z @ c.blom - zbar * c.blom_sum) / np.sqrt(c.blom_ss * zss)
    qlo, q50, qhi = (_sorted_quantile(z, p) for p in (QSKEW_P, 0.5, 1 - QSKEW_P))
    if shapiro_rows is None:
        sw = swilk_constants(n)
        zero_range = xc[:, -1] - xc[:, 0] < 1e-19
        sw_p = shapiro_wilk_from_sums(z @ sw.asa - zbar * sw.asa_sum, zss, zero_range, n)[1]
    else:
        sub = xt[:, shapiro_rows]
        sub.sort(axis=1)
        sw_p = shapiro_wilk(sub)[1]
    a2 = _anderson_darling(z, cdf, c)
    zs, zk = skewness_z(g1, n), kurtosis_z(g2, n)
    return {
        "mean": mean, "var": var, "skewness": g1, "excess_kurtosis": g2, "skewness_z": zs,
        "kurtosis_z": zk, "quantile_skewness": (qhi + qlo - 2 * q50) / (qhi - qlo),
        "ks_distance": ks, "wasserstein_sigma": _wasserstein_std(z, cdf, above, c),
        "qq_corr": qq, "anderson": a2, "dagostino_k2": spc.chdtrc(2, zs**2 + zk**2),
        "jarque_bera": spc.chdtrc(2, n / 6.0 * (g1**2 + g2**2 / 4.0)),
        "anderson_normal": anderson_pvalue(a2, n), "lilliefors_ks": lilliefors_pvalue(ks, n),
        "shapiro_wilk": sw_p,
    }  # fmt: skip


_STAT_KEYS = ("mean", "var", "skewness", "excess_kurtosis", "skewness_z", "kurtosis_z",
              "quantile_skewness", "ks_distance", "wasserstein_sigma", "qq_corr", "anderson",
              *TESTS)  # fmt: skip


def coordinate_stats(
    x: FloatArray, shapiro_rows: NDArray[np.intp] | None = None
) -> CoordinateStats:
    """All per-coordinate statistics of ``x`` (shape ``(n, d)``), vectorized over columns.

    Args:
        x: samples, shape ``(n, d)``, n >= 8.
        shapiro_rows: row indices for the Shapiro-Wilk subsample (default: all rows).

    Returns:
        The statistics; constant columns give NaN everywhere but in ``mean`` and ``var``.
    """
    return coordinate_stats_many([x], shapiro_rows)[0]


def coordinate_stats_many(
    xs: Sequence[FloatArray], shapiro_rows: NDArray[np.intp] | None = None
) -> list[CoordinateStats]:
    """:func:`coordinate_stats` of several samples with the same number of rows n.

    Columns are independent, so they are processed in blocks of about ``_BLOCK_ELEMENTS``
    values that may span samples (many narrow samples, e.g. d = 1 row logits, share a block).

    Args:
        xs: samples, each of shape ``(n, d_i)``, n >= 8.
        shapiro_rows: row indices for the Shapiro-Wilk subsample (default: all rows).

    Returns:
        One result per sample, in order.
    """
    n = xs[0].shape[0]
    step = max(1, _BLOCK_ELEMENTS // max(n, 1))
    outs = [{key: np.empty(x.shape[1]) for key in _STAT_KEYS} for x in xs]
    pieces: list[tuple[int, int, int]] = []  # (sample, first column, end column)
    width = 0

    def flush() -> None:
        cols = [xs[b][:, c0:c1].T for b, c0, c1 in pieces]
        xt = np.concatenate(cols, dtype=np.float64) if len(cols) > 1 else (
            np.ascontiguousarray(cols[0], dtype=np.float64))  # fmt: skip
        block = _block_stats(xt, shapiro_rows)
        start = 0
        for b, c0, c1 in pieces:
            for key in _STAT_KEYS:
                outs[b][key][c0:c1] = block[key][start : start + c1 - c0]
            start += c1 - c0
        pieces.clear()

    with np.errstate(divide="ignore", invalid="ignore"):
        for b, x in enumerate(xs):
            if x.shape[0] != n:
                raise ValueError("coordinate_stats_many needs samples with the same row count")
            for c0 in range(0, x.shape[1], step):
                c1 = min(c0 + step, x.shape[1])
                if width + c1 - c0 > step:
                    flush()
                    width = 0
                pieces.append((b, c0, c1))
                width += c1 - c0
        if pieces:
            flush()
    results = []
    for out in outs:
        const = ~(out["var"] > 0)
        for key in _STAT_KEYS[2:]:
            out[key][const] = np.nan
        pv = {t: out.pop(t) for t in TESTS}
        results.append(CoordinateStats(pvalues=pv, **out))
    return results
