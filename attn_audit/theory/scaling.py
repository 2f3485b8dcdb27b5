"""Fitting the n^C exponent: k_bar(n) = alpha * n^C with bootstrap CIs (docs/methods.md §7).

Pure numpy (no torch). :func:`fit_scaling` is the fit of docs/methods.md §7 (OLS on log-log over several
context lengths, bootstrap over sequences) with the local slopes between consecutive lengths.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]


def _ols_loglog(logn: FloatArray, logk: FloatArray) -> tuple[FloatArray, FloatArray]:
    """OLS of rows of ``logk`` (shape ``(b, L)``) on ``logn`` (``(L,)``): (slopes, intercepts)."""
    xc = logn - logn.mean()
    slope = (logk - logk.mean(axis=1, keepdims=True)) @ xc / float(xc @ xc)
    return slope, logk.mean(axis=1) - slope * logn.mean()


def _sorted_inputs(lengths: ArrayLike, k_means_per_seq: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Validated lengths ``(L,)`` in ascending order and the per-sequence k ``(S, L)`` in the same order.

    Raises:
        ValueError: on bad shapes or fewer than 2 distinct positive lengths.
    """
    n_arr = np.asarray(lengths, dtype=np.float64).ravel()
    k = np.asarray(k_means_per_seq, dtype=np.float64)
    if k.ndim == 1:
        k = k[None, :]
    if k.ndim != 2 or k.shape[1] != n_arr.size:
        raise ValueError(f"k_means_per_seq must be (S, {n_arr.size}), got {k.shape}")
    if n_arr.size < 2 or np.unique(n_arr).size != n_arr.size or np.any(n_arr <= 0):
        raise ValueError(f"need at least 2 distinct positive lengths, got {n_arr.tolist()}")
    order = np.argsort(n_arr)
    return n_arr[order], k[:, order]


def _k_bar(k: FloatArray) -> FloatArray:
    """``nanmean`` over the sequences of ``k`` (shape ``(S, L)``), without warnings: shape ``(L,)``.

    Raises:
        ValueError: unless k_bar is positive at every length.
    """
    fin_k = np.isfinite(k)
    with np.errstate(invalid="ignore", divide="ignore"):
        k_bar = np.where(fin_k, k, 0.0).sum(axis=0) / fin_k.sum(axis=0)
    if not np.all(k_bar > 0):
        raise ValueError(f"k_bar must be positive at every length, got {k_bar.tolist()}")
    return k_bar


def _summarize(logn: FloatArray, kk: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(C, ln alpha, local slopes) of resamples ``kk`` of shape ``(b, S, L)``: ``(b,)``, ``(b,)``, ``(b, L - 1)``.

    ``logn`` is ``(L,)``; k_bar of a resample is the ``nanmean`` over its sequences.
    """
    fin = np.isfinite(kk)
    with np.errstate(invalid="ignore", divide="ignore"):
        kbar = np.where(fin, kk, 0.0).sum(axis=1) / fin.sum(axis=1)  # nanmean, no warning
        logk = np.log(kbar)
    c, la = _ols_loglog(logn, logk)
    local = np.diff(logk, axis=1) / np.diff(logn)
    return c, la, local


def _r2(logn: FloatArray, logk: FloatArray, c: float, la: float) -> float:
    """R^2 of the line ``la + c * logn`` against ``logk`` (both ``(L,)``); NaN when ``logk`` is flat."""
    resid = logk - (la + c * logn)
    ss_tot = float(np.sum((logk - logk.mean()) ** 2))
    return 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else float("nan")


def _bootstrap_ci(logn: FloatArray, k: FloatArray, n_boot: int, seed: int, level: float) -> dict[str, Any]:
    """Percentile CIs of C, alpha and the local slopes, resampling the sequences (rows) of ``k`` ``(S, L)``.

    The CIs are NaN (lists of L - 1 NaN for the local slopes) with fewer than 2 sequences, no
    resamples, or no resample with a finite fit.
    """
    s = k.shape[0]
    tail = (1 - level) / 2
    nan_l = [float("nan")] * (logn.size - 1)
    ci: dict[str, Any] = {"C_lo": float("nan"), "C_hi": float("nan"),
                          "alpha_lo": float("nan"), "alpha_hi": float("nan"),
                          "local_slopes_lo": nan_l, "local_slopes_hi": list(nan_l)}  # fmt: skip
    if s >= 2 and n_boot > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, s, size=(n_boot, s))
        bc, bla, blocal = _summarize(logn, k[idx])
        fin = np.isfinite(bc) & np.isfinite(bla)
        if fin.any():
            ci["C_lo"], ci["C_hi"] = (float(v) for v in np.quantile(bc[fin], [tail, 1 - tail]))
            a_lo, a_hi = np.quantile(bla[fin], [tail, 1 - tail])
            ci["alpha_lo"], ci["alpha_hi"] = float(np.exp(a_lo)), float(np.exp(a_hi))
            q = np.nanquantile(blocal[fin], [tail, 1 - tail], axis=0)
            ci["local_slopes_lo"] = [float(v) for v in q[0]]
            ci["local_slopes_hi"] = [float(v) for v in q[1]]
    return ci


def fit_scaling(
    lengths: ArrayLike,
    k_means_per_seq: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Fit k_bar(n) = alpha * n^C by OLS on log-log (docs/methods.md §7).

    ``k_bar(n)`` is the mean over sequences of the per-sequence k values at length n
    (``nanmean``: a sequence may lack some lengths). The bootstrap resamples sequences
    (rows) with replacement and refits, giving percentile CIs for C, alpha and the local
    slopes ``Delta ln k_bar / Delta ln n`` between consecutive lengths.

    Args:
        lengths: context lengths n, shape ``(L,)``, L >= 2 distinct positive values.
        k_means_per_seq: per-sequence k (e.g. mean or median k_eps over the rows of that
            sequence), shape ``(S, L)``; ``(L,)`` is one sequence (no CI).
        n_boot: bootstrap resamples.
        seed: bootstrap seed.
        level: confidence level.

    Returns:
        Dict with ``C``, ``C_lo``, ``C_hi``, ``alpha``, ``alpha_lo``, ``alpha_hi``,
        ``log_alpha``, ``r2``, ``lengths`` (sorted), ``k_bar``, ``local_slopes``,
        ``local_slopes_lo``, ``local_slopes_hi`` (lists of L - 1), ``n_sequences``,
        ``n_boot``, ``level``. CIs are NaN with fewer than 2 sequences.

    Raises:
        ValueError: on bad shapes, fewer than 2 distinct lengths, or non-positive k_bar.
    """
    n_arr, k = _sorted_inputs(lengths, k_means_per_seq)
    logn = np.log(n_arr)
    k_bar = _k_bar(k)
    c, la, local = _summarize(logn, k[None])
    r2 = _r2(logn, np.log(k_bar), c[0], la[0])
    ci = _bootstrap_ci(logn, k, n_boot, seed, level)
    return {
        "C": float(c[0]),
        "alpha": float(np.exp(la[0])),
        "log_alpha": float(la[0]),
        "r2": r2,
        "lengths": [float(v) for v in n_arr],
        "k_bar": [float(v) for v in k_bar],
        "local_slopes": [float(v) for v in local[0]],
        "n_sequences": int(k.shape[0]),
        "n_boot": int(n_boot),
        "level": float(level),
        **ci,
    }
