"""Per-head sparsity aggregates (attn_audit.assemble.sparsity): bootstrap intervals over sequences."""

from __future__ import annotations

import warnings

import numpy as np

from attn_audit.assemble.sparsity import bootstrap_ratio


def _reference(num: np.ndarray, den: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The same resampling written plainly: one ratio per resample, then np.nanquantile."""
    rng = np.random.default_rng(seed)
    s = num.shape[0]
    weights = np.zeros((n_boot, s))
    draws = rng.integers(0, s, size=(n_boot, s))
    np.add.at(weights, (np.arange(n_boot)[:, None], draws), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = (weights @ num) / (weights @ den)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        lo, hi = np.nanquantile(stats, [0.025, 0.975], axis=0)
    return lo, hi


def test_bootstrap_ratio_with_empty_heads_is_nan_without_warnings() -> None:
    rng = np.random.default_rng(3)
    num = rng.uniform(0, 50, size=(12, 5))
    den = rng.integers(1, 20, size=(12, 5)).astype(float)
    num[:, 1] = 0.0
    den[:, 1] = 0.0  # a head without a valid row in any sequence: every resample is 0/0
    den[:3, 2] = 0.0  # a head without rows in some sequences: some resamples are 0/0
    num[:3, 2] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lo, hi = bootstrap_ratio(num, den, n_boot=400, seed=7)
    ref_lo, ref_hi = _reference(num, den, 400, 7)
    np.testing.assert_allclose(lo, ref_lo, rtol=1e-12)
    np.testing.assert_allclose(hi, ref_hi, rtol=1e-12)
    assert np.isnan(lo[1]) and np.isnan(hi[1])
    ok = [0, 2, 3, 4]
    point = num[:, ok].sum(0) / den[:, ok].sum(0)
    assert np.all(lo[ok] <= point) and np.all(point <= hi[ok])
