"""Average ranks and the Spearman correlation with a bootstrap CI (docs/methods.md §5.5, §6).

Pure numpy (no torch, no scipy.stats): :func:`average_ranks` reproduces
``scipy.stats.rankdata`` and :func:`spearman_with_ci` the Spearman rho of
``scipy.stats.spearmanr``, with a percentile bootstrap CI over (x, y) pairs. They compare
predicted and measured k_eps across rows and heads, and k_eps with R across heads. Why not
scipy.stats (same values): docs/methods.md §12.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]

_CHUNK_ELEMS = 4_000_000  # elements per Monte Carlo block (~32 MB of float64)


def _resampled_ranks(values: FloatArray, idx: NDArray[np.int64]) -> FloatArray:
    """``scipy.stats.rankdata(values[idx], axis=1)`` (average ranks) from one sort of ``values``.

    A tie group of the row that holds ``below`` smaller elements and ``count`` equal ones
    gets the rank ``below + (count + 1) / 2``, exact in float64 like rankdata's.

    Args:
        values: shape ``(n,)``, no NaN.
        idx: resample indices into ``values``, shape ``(b, m)``.

    Returns:
        Shape ``(b, m)``.
    """
    order = np.argsort(values, kind="stable")
    sorted_v = values[order]
    new = np.ones(values.size, dtype=bool)
    new[1:] = sorted_v[1:] != sorted_v[:-1]
    dense = np.empty(values.size, dtype=np.int64)
    dense[order] = np.cumsum(new) - 1  # tie group of each value, in sorted order
    groups = int(dense[order[-1]]) + 1
    rows = idx.shape[0]
    cell = dense[idx] + np.arange(rows)[:, None] * groups  # (row, group) of each element
    count = np.bincount(cell.ravel(), minlength=rows * groups).reshape(rows, groups)
    rank = (np.cumsum(count, axis=1) - count) + (count + 1) / 2
    return rank.ravel()[cell]


def average_ranks(values: ArrayLike) -> FloatArray:
    """Average ranks of each row; reproduces ``scipy.stats.rankdata(values, axis=-1)``.

    The ranks are :func:`_resampled_ranks` of the row itself (no scipy.stats import).

    Args:
        values: shape ``(n,)`` or ``(rows, n)``, n >= 1, no NaN.

    Returns:
        Float ranks in 1..n, the shape of ``values``.
    """
    v = np.asarray(values, dtype=np.float64)
    whole = np.arange(v.shape[-1])[None]
    if v.ndim == 1:
        return _resampled_ranks(v, whole)[0]
    ranks = np.empty(v.shape)
    for i, row in enumerate(v):
        ranks[i] = _resampled_ranks(row, whole)[0]
    return ranks


def _rowwise_pearson(rx: FloatArray, ry: FloatArray) -> FloatArray:
    """Pearson correlation of each row pair (of ranks), shapes ``(b, n)`` -> ``(b,)``.

    Centres ``rx`` and ``ry`` in place.
    """
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho: FloatArray = (rx * ry).sum(axis=1) / np.sqrt(
            (rx * rx).sum(axis=1) * (ry * ry).sum(axis=1)
        )
    return rho


def spearman_with_ci(
    x: ArrayLike, y: ArrayLike, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Spearman rank correlation with a percentile bootstrap CI over (x, y) pairs.

    Args:
        x: values, shape ``(n,)``.
        y: values, shape ``(n,)``; pairs with a non-finite member are dropped.
        n_boot: bootstrap resamples.
        seed: bootstrap seed.
        level: confidence level.

    Returns:
        ``(rho, lo, hi)``; NaNs when fewer than 3 finite pairs remain or a margin is
        constant.
    """
    xa = np.asarray(x, dtype=np.float64).ravel()
    ya = np.asarray(y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise ValueError(f"x and y must have the same length: {xa.shape} vs {ya.shape}")
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    n = xa.size
    nan = float("nan")
    if n < 3:
        return nan, nan, nan
    whole = np.arange(n)[None]  # the sample itself as one resample: rankdata's ranks, less overhead
    rho = float(_rowwise_pearson(_resampled_ranks(xa, whole), _resampled_ranks(ya, whole))[0])
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    step = max(1, _CHUNK_ELEMS // (4 * n))
    for a in range(0, n_boot, step):
        idx = rng.integers(0, n, size=(min(step, n_boot - a), n))
        rx, ry = _resampled_ranks(xa, idx), _resampled_ranks(ya, idx)  # = rankdata(xa[idx])
        reps[a : a + idx.shape[0]] = _rowwise_pearson(rx, ry)
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return rho, nan, nan
    tail = (1 - level) / 2
    lo, hi = np.quantile(reps, [tail, 1 - tail])
    return rho, float(lo), float(hi)
