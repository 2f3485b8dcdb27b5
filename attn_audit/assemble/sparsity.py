"""(eps, k)-sparsity figures per head from the streamed aggregates (numpy only).

k_eps(i) is the smallest k whose top-k attention probabilities in row i sum to at least 1 - eps
(docs/methods.md §2.1, the mass reading). Medians and 90th percentiles are exact: they come from an
integer histogram of k_eps, not from a sketch. Intervals are percentile bootstraps over
sequences (rows of one sequence are not independent, sequences are).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def hist_quantile(hist: np.ndarray, q: float) -> np.ndarray:
    """Lower q-quantile of integer samples given as counts ``hist`` (..., values)."""
    cdf = np.cumsum(hist, axis=-1)
    total = cdf[..., -1:]
    target = np.ceil(q * total)
    idx = (cdf < np.maximum(target, 1)).sum(axis=-1)
    return np.where(total[..., 0] > 0, idx, 0)


def bootstrap_ratio(num: np.ndarray, den: np.ndarray, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of sum(num)/sum(den) resampling the first axis (sequences).

    Args:
        num: (sequences, ...) per-sequence sums of the quantity.
        den: (sequences, ...) per-sequence row counts, broadcastable to ``num``.
    Returns:
        (lo, hi), each of shape num.shape[1:].
    """
    s = num.shape[0]
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_boot, s))
    draws = rng.integers(0, s, size=(n_boot, s))
    np.add.at(weights, (np.arange(n_boot)[:, None], draws), 1.0)
    flat_num = num.reshape(s, -1)
    flat_den = np.broadcast_to(den, num.shape).reshape(s, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = (weights @ flat_num) / (weights @ flat_den)
    alpha = (1 - level) / 2
    lo, hi = np.full((2, flat_num.shape[1]), np.nan)
    if s > 1:
        lo, hi = _nanquantile_columns(stats, [alpha, 1 - alpha])
    return lo.reshape(num.shape[1:]), hi.reshape(num.shape[1:])


def _nanquantile_columns(x: np.ndarray, q: list[float]) -> np.ndarray:
    """``np.nanquantile(x, q, axis=0)`` with the same values, shape (len(q), columns).

    nanquantile runs a Python-level 1-d quantile per column; the columns without NaN (nearly
    all) take one vectorised ``np.quantile`` instead, which computes each column alike.
    """
    out = np.full((len(q), x.shape[1]), np.nan)
    nan = np.isnan(x)
    dirty = nan.any(axis=0)
    if (~dirty).any():
        out[:, ~dirty] = np.quantile(x[:, ~dirty], q, axis=0)
    some = dirty & ~nan.all(axis=0)  # all-NaN columns (no valid row in any resample) stay NaN
    if some.any():
        out[:, some] = np.nanquantile(x[:, some], q, axis=0)
    return out


def head_sparsity(summary: dict[str, Any], eps_keys: list[str], seed: int = 0) -> dict[tuple[int, int], dict[str, Any]]:
    """The ``sparsity`` block of every head, keyed by (layer, head)."""
    hist = summary["k_hist"]  # (L, H, E, n+1)
    L, H, E, _ = hist.shape
    rows = hist.sum(-1)  # (L, H, E)
    values = np.arange(hist.shape[-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        k_mean = (hist * values).sum(-1) / rows
    k_med = hist_quantile(hist, 0.5)
    k_p90 = hist_quantile(hist, 0.9)
    seq_rows = summary["seq_rows"][..., None].astype(float)  # (S, L, H, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        kfrac_mean = summary["seq_kfrac"].sum(0) / seq_rows.sum(0)
        ksink_mean = summary["seq_ksink"].sum(0) / seq_rows.sum(0)
    k_lo, k_hi = bootstrap_ratio(summary["seq_k"], seq_rows, seed=seed)
    f_lo, f_hi = bootstrap_ratio(summary["seq_kfrac"], seq_rows, seed=seed + 1)
    pos_rows = summary["pos_rows"]  # (L, H, bins)
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for l in range(L):
        for h in range(H):
            block = {}
            for e, key in enumerate(eps_keys):
                by_pos = []
                for b in range(pos_rows.shape[-1]):
                    r = int(pos_rows[l, h, b])
                    if r == 0:
                        continue
                    by_pos.append(
                        {
                            "lo": 1 << b,
                            "hi": (1 << (b + 1)) - 1,
                            "rows": r,
                            "k_mean": float(summary["pos_k"][l, h, e, b] / r),
                            "kfrac_mean": float(summary["pos_kfrac"][l, h, e, b] / r),
                        }
                    )
                block[key] = {
                    "k_mean": _f(k_mean[l, h, e]),
                    "k_median": int(k_med[l, h, e]),
                    "k_p90": int(k_p90[l, h, e]),
                    "kfrac_mean": _f(kfrac_mean[l, h, e]),
                    "k_sinks_mean": _f(ksink_mean[l, h, e]),
                    "rows": int(rows[l, h, e]),
                    "ci": {
                        "k_mean": [_f(k_lo[l, h, e]), _f(k_hi[l, h, e])],
                        "kfrac_mean": [_f(f_lo[l, h, e]), _f(f_hi[l, h, e])],
                        "level": 0.95,
                        "method": "percentile bootstrap over sequences (1000 draws)",
                    },
                    "by_position": by_pos,
                }
            out[(l, h)] = block
    return out


def _f(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None
