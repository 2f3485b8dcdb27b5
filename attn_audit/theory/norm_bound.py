"""The norm bound R from a head's projection weights: R_F and R_op (docs/methods.md §3.2).

Pure numpy (no torch). :func:`r_variants` (one head) and :func:`r_variants_heads` (the query
heads of one layer, the same values) compute R_F = c_s B^2 ||W||_F (Deng et al.'s R as summarised, with
the model's own scale c_s) and the RoPE-robust R_op = c_s B^2 ||W_Q||_2 ||W_K||_2, for B = max and
p99.9 input norms, from d_head x d_head Gram matrices only (W = W_Q^(h) W_K^(g)T is never
formed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class RVariants:
    """Weight norms and R bounds of one (query head, KV head) pair (docs/methods.md §3.2).

    Attributes:
        w_fro: ||W||_F with W = W_Q^(h) W_K^(g)T (D x D, never formed).
        w_op: ||W||_2 (largest singular value).
        wq_op: ||W_Q^(h)||_2. wk_op: ||W_K^(g)||_2.
        r_f_max, r_f_p999: R_F = scale * B^2 * ||W||_F with B = max / p99.9 input norm.
        r_op_max, r_op_p999: R_op = scale * B^2 * ||W_Q||_2 ||W_K||_2 (RoPE-robust).
    """

    w_fro: float
    w_op: float
    wq_op: float
    wk_op: float
    r_f_max: float
    r_f_p999: float
    r_op_max: float
    r_op_p999: float

    def to_dict(self) -> dict[str, float]:
        """Plain dict of floats."""
        return {k: float(v) for k, v in asdict(self).items()}


def _psd_sqrt(g: FloatArray) -> FloatArray:
    """Symmetric square root of a PSD matrix (negative rounding noise clipped)."""
    vals, vecs = np.linalg.eigh(g)
    root: FloatArray = (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T
    return root


def r_variants(
    wq_h: ArrayLike, wk_g: ArrayLike, scale: float, b_max: float, b_p999: float
) -> RVariants:
    """R variants of docs/methods.md §3.2 from a head's projection weights.

    ``wq_h`` and ``wk_g`` are row slices of ``nn.Linear`` weights ((out, in) convention), so
    the model computes q = x wq_h^T and the merged matrix is W = wq_h^T wk_g (D x D). Only
    d_head x d_head Gram matrices are formed: with G_Q = wq_h wq_h^T and G_K = wk_g wk_g^T,
    ||W||_F^2 = tr(G_Q G_K) and the nonzero squared singular values of W are the eigenvalues
    of G_Q^{1/2} G_K G_Q^{1/2}. Computed in float64.

    Args:
        wq_h: query weight rows of head h, shape ``(d_head, D)``.
        wk_g: key weight rows of KV head g(h), shape ``(d_head, D)``.
        scale: the model's softmax scale c_s (normally 1 / sqrt(d_head)).
        b_max: max input norm ||x_i||_2 over profiled tokens.
        b_p999: 99.9th percentile of the input norms.

    Returns:
        The norms and bounds.

    Raises:
        ValueError: on shape mismatch.
    """
    a = np.asarray(wq_h, dtype=np.float64)
    b = np.asarray(wk_g, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"wq_h and wk_g must be (d_head, D) with equal D: {a.shape}, {b.shape}")
    gq, gk = a @ a.T, b @ b.T
    root = _psd_sqrt(gq)
    m = root @ gk @ root
    sv2 = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)
    w_fro = float(np.sqrt(max(float(np.sum(gq * gk.T)), 0.0)))
    w_op = float(np.sqrt(sv2.max()))
    wq_op = float(np.sqrt(max(np.linalg.eigvalsh(gq).max(), 0.0)))
    wk_op = float(np.sqrt(max(np.linalg.eigvalsh(gk).max(), 0.0)))
    return _r_from_norms(w_fro, w_op, wq_op, wk_op, scale, b_max, b_p999)


def _r_from_norms(w_fro: float, w_op: float, wq_op: float, wk_op: float, scale: float,
                  b_max: float, b_p999: float) -> RVariants:
    """The R bounds (§3.2) from the weight norms and the input-norm bounds."""
    return RVariants(
        w_fro=w_fro,
        w_op=w_op,
        wq_op=wq_op,
        wk_op=wk_op,
        r_f_max=scale * b_max**2 * w_fro,
        r_f_p999=scale * b_p999**2 * w_fro,
        r_op_max=scale * b_max**2 * wq_op * wk_op,
        r_op_p999=scale * b_p999**2 * wq_op * wk_op,
    )


def r_variants_heads(
    wq_h: ArrayLike,
    wk_g: ArrayLike,
    kv: ArrayLike,
    scale: float,
    b_max: float,
    b_p999: float,
) -> list[RVariants]:
    """:func:`r_variants` of several query heads of one layer; the same values, bit for bit.

    The LAPACK calls run on stacks (one call per stack, matrix by matrix as before) and each
    KV head's Gram matrix and norm are computed once for its whole query group.

    Args:
        wq_h: query weight rows of each head, shape ``(h, d_head, D)``.
        wk_g: key weight rows of each KV head, shape ``(g, d_head, D)``.
        kv: KV head index of each query head, shape ``(h,)``.
        scale, b_max, b_p999: as in :func:`r_variants`, shared by the heads.

    Returns:
        One :class:`RVariants` per query head, in order.

    Raises:
        ValueError: on shape mismatch.
    """
    a = np.asarray(wq_h, dtype=np.float64)
    b = np.asarray(wk_g, dtype=np.float64)
    kv_i = np.asarray(kv, dtype=np.int64).ravel()
    if a.ndim != 3 or b.ndim != 3 or a.shape[2] != b.shape[2] or kv_i.size != a.shape[0]:
        raise ValueError(
            "need wq_h (h, d_head, D), wk_g (g, d_head, D) with equal D and kv (h,): "
            f"{a.shape}, {b.shape}, {kv_i.shape}"
        )
    if a.shape[0] == 0:
        return []
    gq = np.stack([x @ x.T for x in a])  # the 2-d products of r_variants
    gk = np.stack([x @ x.T for x in b])
    vals, vecs = np.linalg.eigh(gq)
    root = (vecs * np.sqrt(np.clip(vals, 0.0, None))[:, None, :]) @ vecs.transpose(0, 2, 1)
    m = root @ gk[kv_i] @ root
    sv2_max = np.clip(np.linalg.eigvalsh((m + m.transpose(0, 2, 1)) / 2), 0.0, None).max(axis=1)
    gq_max = np.linalg.eigvalsh(gq).max(axis=1)
    gk_max = np.linalg.eigvalsh(gk).max(axis=1)
    out = []
    for i, g in enumerate(kv_i):
        w_fro = float(np.sqrt(max(float(np.sum(gq[i] * gk[g].T)), 0.0)))
        w_op = float(np.sqrt(sv2_max[i]))
        wq_op = float(np.sqrt(max(gq_max[i], 0.0)))
        wk_op = float(np.sqrt(max(gk_max[g], 0.0)))
        out.append(_r_from_norms(w_fro, w_op, wq_op, wk_op, scale, b_max, b_p999))
    return out
