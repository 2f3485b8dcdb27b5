"""Attention FLOP counts of dense and top-k heads (see "FLOP count" in :mod:`attn_audit.rank`)."""

from __future__ import annotations


def kept_pairs(n: int, k: int, causal: bool) -> int:
    """(query, key) pairs a top-k head computes over one sequence: Σ_i min(k, n_i)."""
    if n <= 0 or k <= 0:
        return 0
    if not causal:
        return n * min(k, n)
    if k >= n:
        return n * (n + 1) // 2
    return k * (k + 1) // 2 + (n - k) * k


def attention_flops(n: int, head_dim: int, causal: bool) -> int:
    """Dense QKᵀ + PV FLOPs of one head for one sequence: 4·d·n² (causal 4·d·n(n+1)/2)."""
    return 4 * head_dim * kept_pairs(n, n, causal)


def sparse_flops(n: int, k: int, head_dim: int, causal: bool) -> int:
    """QKᵀ + PV FLOPs of a top-k head: 4·d·Σ_i min(k, n_i) (top-k selection not counted)."""
    return 4 * head_dim * kept_pairs(n, k, causal)


def flops_saving(n: int, k: int, causal: bool) -> float:
    """Fraction of a head's attention FLOPs saved by keeping ``k`` keys per row (0 when k ≥ n)."""
    dense = kept_pairs(n, n, causal)
    return 0.0 if dense == 0 else 1.0 - kept_pairs(n, k, causal) / dense
