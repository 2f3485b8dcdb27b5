"""The contract of the per-row sparsity kernels (docs/methods.md §2): what to measure
(:class:`attn_audit.config.MeasureSpec`), what comes back (:class:`RowMetrics`), the histogram geometry both kernels
share (:func:`num_bins`, :func:`bin_span_cap`) and the input checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

_CAP_NATS = 16.0
"""Bins cover at most ``ln(n) + _CAP_NATS`` nats below the row maximum; keys further away
carry at most ``n * e^-(ln n + 16) = 1.1e-7`` of the mass together."""


def num_bins(n: int) -> int:
    """Regular histogram bins per row for rows of length n (both kernels): about n/4,
    between 64 and 4096."""
    return int(min(4096, max(64, n // 4)))


def bin_span_cap(n: int) -> float:
    """Largest distance (nats below the row max) resolved by the bins for rows of length n."""
    return min(math.log(max(n, 2)) + _CAP_NATS, 40.0)


@dataclass
class RowMetrics:
    """Per-row metrics; every field has leading shape (G, R) (G heads, R query rows).

    n_keys: int64 (G, R), number of allowed keys n_i.
    k_eps: int64 (G, R, E), smallest k whose top-k probabilities sum to >= 1 - eps.
    k_eps_sinks: int64 (G, R, E), |S_i| + min k with sink mass + top-k non-sink mass >= 1 - eps.
    tail_mass: float64 (G, R, B), 1 - (sum of the top-min(b, n_i) probabilities), >= 0.
    participation: float64 (G, R), 1 / sum p^2.
    entropy: float64 (G, R), -sum p ln p in nats.
    sink_mass: float64 (G, R), mass on allowed keys with index < spec.sinks.
    local_mass: float64 (G, R), mass on allowed keys of the local window (sinks excluded).
    bulk_mass: float64 (G, R), mass on allowed keys that are neither sink nor local.
    bulk_mean: float64 (G, R), mean raw score over bulk keys (NaN if fewer than 2).
    bulk_std: float64 (G, R), std (ddof=0) of raw scores over bulk keys (NaN if fewer than 2).
    max_score: float64 (G, R), max allowed score.
    max_abs_score: float64 (G, R), max |s_ij| over allowed keys.
    n_bulk: int64 (G, R), number of bulk keys (extra field, optional).
    mass: float64 (G, R), sum over allowed keys of exp(s - max score) (only with
        ``row_metrics(..., weights_out=...)``; 0 for rows without allowed keys).

    Rows without any allowed key have n_keys = k_eps = k_eps_sinks = 0; their float fields
    may be NaN.
    """

    n_keys: torch.Tensor
    k_eps: torch.Tensor
    k_eps_sinks: torch.Tensor
    tail_mass: torch.Tensor
    participation: torch.Tensor
    entropy: torch.Tensor
    sink_mass: torch.Tensor
    local_mass: torch.Tensor
    bulk_mass: torch.Tensor
    bulk_mean: torch.Tensor
    bulk_std: torch.Tensor
    max_score: torch.Tensor
    max_abs_score: torch.Tensor
    n_bulk: torch.Tensor | None = None
    mass: torch.Tensor | None = None

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Field name -> tensor."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_inputs(scores: torch.Tensor, q_pos: torch.Tensor) -> tuple[int, int, int]:
    if scores.dim() != 3:
        raise ValueError(f"scores must have shape (G, R, n), got {tuple(scores.shape)}")
    g, r, n = scores.shape
    if q_pos.shape != (r,):
        raise ValueError(f"q_pos must have shape ({r},), got {tuple(q_pos.shape)}")
    if not scores.is_floating_point():
        raise TypeError("scores must be a floating tensor")
    return g, r, n


def _flat_qpos(q_pos: torch.Tensor, g: int, device: torch.device) -> torch.Tensor:
    """(R,) -> (G*R,) int64, row g*R + r gets q_pos[r]."""
    return q_pos.to(device=device, dtype=torch.int64).repeat(g)
