"""Attention FLOP counts of dense and top-k heads (see "FLOP count" in :mod:`attn_audit.rank`).

``window``: a causal sliding window (the row sees its last ``window`` keys), as local layers of
Gemma 3, Mistral and others run; None for full attention. A windowed row i sees
``n_i = min(i, window)`` keys, so a top-k row keeps ``min(k, i, window)``: the window caps k.
"""

from __future__ import annotations


def _cap(k: int, window: int | None, causal: bool) -> int:
    return min(k, window) if causal and window else k


def kept_pairs(n: int, k: int, causal: bool, window: int | None = None) -> int:
    """(query, key) pairs a top-k head computes over one sequence: Σ_i min(k, n_i)."""
    k = _cap(k, window, causal)
    if n <= 0 or k <= 0:
        return 0
    if not causal:
        return n * min(k, n)
    if k >= n:
        return n * (n + 1) // 2
    return k * (k + 1) // 2 + (n - k) * k


def attention_flops(n: int, head_dim: int, causal: bool, window: int | None = None) -> int:
    """Dense QKᵀ + PV FLOPs of one head for one sequence: 4·d·Σ_i n_i (4·d·n(n+1)/2 causal)."""
    return 4 * head_dim * kept_pairs(n, n, causal, window)


def sparse_flops(n: int, k: int, head_dim: int, causal: bool, window: int | None = None) -> int:
    """QKᵀ + PV FLOPs of a top-k head: 4·d·Σ_i min(k, n_i) (top-k selection not counted)."""
    return 4 * head_dim * kept_pairs(n, k, causal, window)


def flops_saving(n: int, k: int, causal: bool, window: int | None = None) -> float:
    """Fraction of a head's attention FLOPs saved by keeping ``k`` keys per row (0 when k ≥ n_i)."""
    dense = kept_pairs(n, n, causal, window)
    return 0.0 if dense == 0 else 1.0 - kept_pairs(n, k, causal, window) / dense
