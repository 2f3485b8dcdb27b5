"""Benjamini-Hochberg adjustment of p-values (as ``scipy.stats.false_discovery_control``,
method "bh"), per array, per row, or jointly over many arrays (all coordinates of all heads
of a site form one family). Pure numpy: the same values as scipy.stats, faster on these
arrays and without its import (docs/methods.md §12).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]

__all__ = ["bh_adjust", "bh_adjust_joint", "bh_adjust_rows"]


def _bh_sorted_rows(p: FloatArray) -> FloatArray:
    """Benjamini-Hochberg along the last axis of finite p-values in [0, 1], shape ``(..., m)``.

    The steps of ``scipy.stats.false_discovery_control(method="bh")``: sort, scale the k-th
    smallest by m / k, running minimum from the largest, restore the order, clip to [0, 1].
    """
    m = p.shape[-1]
    if m <= 1:
        return p.copy()
    order = np.argsort(p, axis=-1)
    ps = np.take_along_axis(p, order, axis=-1)
    ps *= m / np.arange(1, m + 1, dtype=np.float64)
    np.minimum.accumulate(ps[..., ::-1], out=ps[..., ::-1], axis=-1)
    out = np.empty_like(ps)
    np.put_along_axis(out, order, ps, axis=-1)
    return np.clip(out, 0.0, 1.0)


def bh_adjust(pvalues: ArrayLike) -> FloatArray:
    """Benjamini-Hochberg adjusted p-values; NaN entries stay NaN and are not counted.

    Args:
        pvalues: raw p-values, any shape.

    Returns:
        Adjusted p-values, same shape.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = _bh_sorted_rows(np.clip(p[ok], 0.0, 1.0))
    return out


def bh_adjust_rows(pvalues: ArrayLike) -> FloatArray:
    """:func:`bh_adjust` applied to each row of a 2-D array separately.

    Args:
        pvalues: raw p-values, shape ``(k, m)`` (e.g. one row per head).

    Returns:
        Adjusted p-values, shape ``(k, m)``; rows holding NaN are adjusted over their finite
        entries only.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if np.isfinite(p).all():
        return _bh_sorted_rows(np.clip(p, 0.0, 1.0))
    return np.stack([bh_adjust(row) for row in p]) if p.size else p.copy()


def bh_adjust_joint(pvalue_arrays: Sequence[ArrayLike]) -> list[FloatArray]:
    """Apply Benjamini-Hochberg jointly to several p-value arrays (e.g. across heads).

    Args:
        pvalue_arrays: arrays of raw p-values of any shapes (e.g. one ``(d,)`` array per
            head and site).

    Returns:
        The adjusted arrays, in order and with the input shapes; all finite entries of all
        arrays form one family.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in pvalue_arrays]
    if not arrays:
        return []
    flat = bh_adjust(np.concatenate([a.ravel() for a in arrays]))
    out: list[FloatArray] = []
    start = 0
    for a in arrays:
        out.append(flat[start : start + a.size].reshape(a.shape))
        start += a.size
    return out
