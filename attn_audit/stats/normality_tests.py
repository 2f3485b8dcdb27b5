"""Univariate normality tests: null calibrations and p-values, vectorized over coordinates.

Pure numpy/scipy (no torch). The statistics are computed in :mod:`attn_audit.stats.marginal`; this
module holds what turns them into scores and p-values: D'Agostino's skewness and
Anscombe-Glynn's kurtosis z, the Lilliefors and Anderson-Darling p-value approximations,
Shapiro-Wilk (Royston 1995, algorithm AS R94, the coefficients and p-value approximation of
``scipy.stats.shapiro``). Each agrees with its scipy.stats reference up to float rounding, without
scipy.stats' per-call overhead.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [  # the calibrations and tests
    "TESTS", "anderson_pvalue", "kurtosis_z",
    "lilliefors_null_quantile", "lilliefors_pvalue", "shapiro_wilk", "shapiro_wilk_from_sums",
    "skewness_z", "swilk_constants",
]  # fmt: skip

FloatArray = NDArray[np.float64]

TESTS: tuple[str, ...] = (
    "dagostino_k2",
    "anderson_normal",
    "lilliefors_ks",
    "jarque_bera",
    "shapiro_wilk",
)

# --------------------------------------------------------------------------- p-value approximations


# Simulated upper-tail table of Stephens' modified Lilliefors statistic
# D* = D (sqrt(n) - 0.01 + 0.85 / sqrt(n)) (3e5 exactly normal samples of n = 1000, seed
# 20240601); used for p >= 0.1, where the Dallal-Wilkinson formula is not valid.
_LF_P = np.array([0.999, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1])
_LF_DSTAR = np.array(
    [0.3226, 0.3713, 0.4253, 0.4591, 0.5055, 0.5428, 0.5779, 0.6131, 0.651, 0.6942, 0.749,
     0.784, 0.8308]
)  # fmt: skip


def _dallal_wilkinson(ks: FloatArray, n: int) -> FloatArray:
    """Dallal-Wilkinson (1986) Lilliefors tail p-value, with the n > 100 rescaling."""
    nn = float(n)
    if n > 100:
        ks = ks * (nn / 100.0) ** 0.49
        nn = 100.0
    log_p = (
        -7.01256 * ks**2 * (nn + 2.78019)
        + 2.99587 * ks * math.sqrt(nn + 2.78019)
        - 0.122119
        + 0.974598 / math.sqrt(nn)
        + 1.67997 / nn
    )
    p: FloatArray = np.exp(log_p)
    return p


def lilliefors_pvalue(ks: ArrayLike, n: int) -> FloatArray:
    """Approximate p-value of the Lilliefors (KS, estimated mean and sd) normality test.

    Dallal-Wilkinson below 0.1, a simulated table of Stephens' modified statistic above.
    Checked against simulation at n = 200, 1000, 4000 to within ~20% relative at p = 0.001.

    Args:
        ks: KS distances, any shape.
        n: sample size.

    Returns:
        p-values, same shape.
    """
    d = np.asarray(ks, dtype=np.float64)
    p_tail = _dallal_wilkinson(d, n)
    dstar = d * (math.sqrt(n) - 0.01 + 0.85 / math.sqrt(n))
    p_body = np.interp(dstar, np.r_[0.0, _LF_DSTAR], np.r_[1.0, _LF_P])
    return np.where(p_tail <= 0.1, p_tail, np.maximum(p_body, 0.1))


@functools.lru_cache(maxsize=256)
def lilliefors_null_quantile(n: int, alpha: float) -> float:
    """KS distance exceeded with probability ``alpha`` (< 0.1) under normality, size ``n``.

    Inverts the Dallal-Wilkinson formula (a quadratic in D).
    """
    nn, scale = float(n), 1.0
    if n > 100:
        scale, nn = (nn / 100.0) ** 0.49, 100.0
    a = 7.01256 * (nn + 2.78019)
    b = 2.99587 * math.sqrt(nn + 2.78019)
    c = -0.122119 + 0.974598 / math.sqrt(nn) + 1.67997 / nn - math.log(alpha)
    return (b + math.sqrt(b * b + 4 * a * c)) / (2 * a) / scale


def anderson_pvalue(a2: ArrayLike, n: int) -> FloatArray:
    """D'Agostino & Stephens (1986) p-value of the Anderson-Darling normality statistic.

    Args:
        a2: A^2 statistics (mean and variance estimated), any shape.
        n: sample size.

    Returns:
        p-values, same shape.
    """
    a = np.asarray(a2, dtype=np.float64) * (1 + 0.75 / n + 2.25 / n**2)
    a = np.minimum(a, 150.0)  # the top branch turns upwards past its vertex at ~153
    with np.errstate(over="ignore"):
        p = np.where(
            a >= 0.6,
            np.exp(1.2937 - 5.709 * a + 0.0186 * a**2),
            np.where(
                a >= 0.34,
                np.exp(0.9177 - 4.279 * a - 1.38 * a**2),
                np.where(
                    a >= 0.2,
                    1 - np.exp(-8.318 + 42.796 * a - 59.938 * a**2),
                    1 - np.exp(-13.436 + 101.14 * a - 223.73 * a**2),
                ),
            ),
        )
    return np.clip(p, 0.0, 1.0)


def skewness_z(g1: FloatArray, n: int) -> FloatArray:
    """D'Agostino (1970) normal score of the sample skewness g1 (as ``scipy.stats.skewtest``).

    Args:
        g1: sample skewness values, any shape.
        n: sample size (>= 8).

    Returns:
        Approximately N(0, 1) scores under normality, same shape.
    """
    y = g1 * math.sqrt((n + 1) * (n + 3) / (6.0 * (n - 2)))
    beta2 = 3.0 * (n * n + 27 * n - 70) * (n + 1) * (n + 3)
    beta2 /= (n - 2.0) * (n + 5) * (n + 7) * (n + 9)
    w2 = -1 + math.sqrt(2 * (beta2 - 1))
    delta = 1 / math.sqrt(0.5 * math.log(w2))
    alpha = math.sqrt(2.0 / (w2 - 1))
    ya = y / alpha
    return delta * np.log(ya + np.sqrt(ya * ya + 1))


def kurtosis_z(g2: FloatArray, n: int) -> FloatArray:
    """Anscombe-Glynn (1983) normal score of the excess kurtosis g2 (``kurtosistest``).

    Args:
        g2: sample excess kurtosis values (Fisher, biased), any shape.
        n: sample size (>= 5).

    Returns:
        Approximately N(0, 1) scores under normality, same shape.
    """
    e = 3.0 * (n - 1) / (n + 1)
    varb2 = 24.0 * n * (n - 2) * (n - 3) / ((n + 1) ** 2 * (n + 3) * (n + 5))
    x = (g2 + 3.0 - e) / math.sqrt(varb2)
    sb1 = 6.0 * (n * n - 5 * n + 2) / ((n + 7) * (n + 9))
    sb1 *= math.sqrt(6.0 * (n + 3) * (n + 5) / (n * (n - 2) * (n - 3)))
    a = 6.0 + 8.0 / sb1 * (2.0 / sb1 + math.sqrt(1 + 4.0 / sb1**2))
    term1 = 1 - 2 / (9.0 * a)
    denom = 1 + x * math.sqrt(2 / (a - 4.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        term2 = np.sign(denom) * np.cbrt((1 - 2.0 / a) / np.abs(denom))
        term2 = np.where(denom == 0.0, np.nan, term2)
    return (term1 - term2) / math.sqrt(2 / (9.0 * a))


# --------------------------------------------------------------------------- Shapiro-Wilk


def _swilk_poly(c: Sequence[float], x: float) -> float:
    """AS R94's polynomial ``c[0] + c[1] x + ...`` evaluated in the routine's own order."""
    res = c[0]
    if len(c) == 1:
        return res
    p = x * c[-1]
    if len(c) == 2:
        return res + p
    for coef in c[-2:0:-1]:
        p = (p + coef) * x
    return res + p


@dataclass(frozen=True)
class SwilkConstants:
    """Everything of Shapiro-Wilk that depends on the sample size n only (AS R94 notation).

    ``W = (sum_i asa_i y_(i))^2 / (ssa * sum_i (y_i - mean)^2)`` for a sorted sample y.
    """

    asa: FloatArray  # centred signed coefficients, shape (n,)
    asa_sum: float  # their sum (~1e-17)
    ssa: float  # sum of asa^2
    m: float  # mean and sd of log(1 - W) (or of its n <= 11 transform) under normality
    s: float
    gamma: float  # n <= 11 only: log(1 - W) above this gives p = 1e-19


def _ppnd(p: float) -> float:
    """AS 111 normal quantile (accuracy ~1e-7), which AS R94 uses for its coefficients."""
    q = p - 0.5
    if abs(q) <= 0.42:
        r = q * q
        num = q * (((-25.44106049637 * r + 41.39119773534) * r - 18.61500062529) * r
                   + 2.50662823884)  # fmt: skip
        return num / ((((3.13082909833 * r - 21.06224101826) * r + 23.08336743743) * r
                       - 8.47351093090) * r + 1.0)  # fmt: skip
    r = 1 - p if q > 0 else p
    if not r > 0:
        return 0.0
    r = math.sqrt(-math.log(r))
    num = ((2.32121276858 * r + 4.85014127135) * r - 2.29796479134) * r - 2.78718931138
    num /= (1.63706781897 * r + 3.54388924762) * r + 1.0
    return -num if q < 0 else num


def _swilk_coefficients(n: int) -> FloatArray:
    """The n // 2 Shapiro-Wilk coefficients of AS R94 (n >= 4), operation for operation as in
    scipy's ``swilk`` (Royston's polynomial corrections of the two extreme ones)."""
    an25 = n + 0.25
    a = [_ppnd((i + 1 - 0.375) / an25) for i in range(n // 2)]
    summ2 = 0.0
    for v in a:
        summ2 += v**2
    summ2 *= 2.0
    ssumm2 = math.sqrt(summ2)
    rsn = 1 / math.sqrt(n)
    a1 = _swilk_poly((0.0, 0.221157, -0.147981, -2.07119, 4.434685, -2.706056), rsn)
    a1 -= a[0] / ssumm2
    if n > 5:
        first = 2
        a2 = -a[1] / ssumm2 + _swilk_poly(
            (0.0, 0.042981, -0.293762, -1.752461, 5.682633, -3.582633), rsn)
        fac = math.sqrt((summ2 - (2 * a[0] ** 2) - 2 * a[1] ** 2) / (1 - (2 * a1**2) - 2 * a2**2))
        a[1] = a2
    else:
        first = 1
        fac = math.sqrt((summ2 - 2 * a[0] ** 2) / (1 - 2 * a1**2))
    a[0] = a1
    for i in range(first, n // 2):
        a[i] *= -1.0 / fac
    return np.array(a)


@functools.lru_cache(maxsize=64)
def swilk_constants(n: int) -> SwilkConstants:
    """Signed, centred coefficients and the null moments of log(1 - W) for sample size n >= 4
    (cached)."""
    a = _swilk_coefficients(n)
    coef = np.zeros(n)
    coef[: n // 2] = -a
    coef[n - 1 : n - 1 - n // 2 : -1] = a
    sa = float(np.cumsum(coef)[-1]) / n  # the routine's sequential sum
    asa = coef - sa
    ssa = float(np.cumsum(asa * asa)[-1])
    if n <= 11:
        gamma = _swilk_poly((-2.273, 0.459), n)
        m = _swilk_poly((0.5440, -0.39978, 0.025054, -6.714e-4), n)
        s = math.exp(_swilk_poly((1.3822, -0.77857, 0.062767, -0.0020322), n))
    else:
        xx = math.log(n)
        gamma = math.inf
        m = _swilk_poly((-1.5861, -0.31082, -0.083751, 0.0038915), xx)
        s = math.exp(_swilk_poly((-0.4803, -0.082676, 0.0030302), xx))
    return SwilkConstants(asa=asa, asa_sum=float(asa.sum()), ssa=ssa, m=m, s=s, gamma=gamma)


def _alnorm_upper(x: FloatArray) -> FloatArray:
    """Hill's AS 66 upper normal tail, as in scipy's AS R94 (so the p-values match it)."""
    z = np.abs(x)
    y = 0.5 * z * z
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        near = 0.5 - z * (
            0.398942280444
            - 0.399903438504 * y / (y + 5.75885480458 - 29.8213557808
                                    / (y + 2.62433121679 + 48.6959930692 / (y + 5.92885724438)))
        )  # fmt: skip
        far = 0.398942280385 * np.exp(-y) / (
            z - 3.8052e-8 + 1.00000615302 / (z + 3.98064794e-4 + 1.98615381364 / (
                z - 0.151679116635 + 5.29330324926 / (z + 4.8385912808 - 15.1508972451 / (
                    z + 0.742380924027 + 30.789933034 / (z + 3.99019417011)))))
        )  # fmt: skip
    upper = x > 0  # x <= 0 or NaN: the routine returns the lower tail of -x
    temp = np.where(z <= 1.28, near, far)
    temp = np.where(np.where(upper, z <= 38.0, z <= 7.0), temp, 0.0)  # NaN gives p = 1
    return np.where(upper, temp, 1.0 - temp)


def _shapiro_pvalue(w1: FloatArray, c: SwilkConstants, n: int) -> FloatArray:
    """AS R94 p-value from ``1 - W`` (shape ``(k,)``): normal approximation of log(1 - W)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ly = np.log(w1)
        if n <= 11:
            too_big = ly >= c.gamma
            ly = -np.log(c.gamma - ly)
        p = _alnorm_upper((ly - c.m) / c.s)
    return np.where(too_big, 1e-19, p) if n <= 11 else p


def shapiro_wilk_from_sums(
    sax: FloatArray, ssx: FloatArray, zero_range: NDArray[np.bool_], n: int
) -> tuple[FloatArray, FloatArray]:
    """Shapiro-Wilk W and p-value from the sums of sorted samples y (each shape ``(k,)``).

    Args:
        sax: ``sum_i asa_i y_(i)`` with ``asa`` of :func:`swilk_constants`.
        ssx: ``sum_i (y_i - mean)^2``.
        zero_range: rows whose range is below 1e-19 (W = p = 1, as scipy).
        n: sample size (>= 4).

    Returns:
        ``(w, p)``; ``1 - W = (sqrt(SSA SSX) - SAX)(sqrt(SSA SSX) + SAX) / (SSA SSX)``, the
        routine's form.
    """
    c = swilk_constants(n)
    ssassx = np.sqrt(c.ssa * ssx)
    with np.errstate(divide="ignore", invalid="ignore"):
        w1 = (ssassx - sax) * (ssassx + sax) / (c.ssa * ssx)
    p = _shapiro_pvalue(w1, c, n)
    return np.where(zero_range, 1.0, 1.0 - w1), np.where(zero_range, 1.0, p)


def shapiro_wilk(sorted_rows: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Shapiro-Wilk W and p-value of each row, as ``scipy.stats.shapiro`` computes them.

    Same coefficients, statistic and p-value approximation (Royston 1995, AS R94); the
    sums are vectorized over rows, so results agree with scipy up to float rounding.

    Args:
        sorted_rows: samples sorted along the last axis, shape ``(k, n)``, n >= 4.

    Returns:
        ``(w, p)``, each shape ``(k,)``; rows of range < 1e-19 give W = p = 1 (as scipy).
    """
    n = sorted_rows.shape[-1]
    yc = sorted_rows - sorted_rows.mean(axis=1)[:, None]
    zero_range = sorted_rows[:, -1] - sorted_rows[:, 0] < 1e-19
    sax = yc @ swilk_constants(n).asa
    return shapiro_wilk_from_sums(sax, np.einsum("ij,ij->i", yc, yc), zero_range, n)
