"""scipy.stats distribution methods computed with scipy.special (no scipy.stats import).

Importing scipy.stats costs ~1 s per audit (measured, with the other reasons for not using it:
docs/methods.md §12). The few distribution methods the analysis needs
(the normal law of the Gaussian predictions, docs/methods.md §5, and the gamma, chi2, beta and
binomial laws behind the multivariate null calibrations of docs/methods.md §4.4) are reproduced here: each calls
the scipy.special function that scipy.stats itself calls, so the values are the same bit for bit
(tests/theory/test_theory.py and tests/stats/test_stats.py check them against scipy.stats, edge cases
included).

Pure numpy/scipy (no torch).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special as spc

try:  # the Boost ufunc behind scipy.stats.binom.isf (recent scipy keeps it in scipy.special)
    from scipy.special._ufuncs import _binom_isf as _boost_binom_isf
except ImportError:  # pragma: no cover - older scipy keeps it under scipy.stats
    _boost_binom_isf = None

FloatArray = NDArray[np.float64]


# scipy.stats' normal law without importing scipy.stats (~1 s per audit): the special
# functions its methods call, with the same results bit for bit (also at 0, 1, +-inf, NaN).


def norm_sf(x: ArrayLike) -> FloatArray:
    """Standard normal survival function; reproduces ``scipy.stats.norm.sf`` (``ndtr(-x)``)."""
    return np.asarray(spc.ndtr(-np.asarray(x, dtype=np.float64)))


def norm_ppf(q: ArrayLike) -> FloatArray:
    """Standard normal quantile; reproduces ``scipy.stats.norm.ppf`` (``ndtri(q)``)."""
    return np.asarray(spc.ndtri(np.asarray(q, dtype=np.float64)))


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
