"""Gaussian-predicted k_eps in closed form: plain and sink-aware, large-sigma flag (docs/methods.md §5).

Pure numpy/scipy (no torch). Conventions as in :mod:`attn_audit.theory` (``n`` is the per-row
key count n_i, ``sigma`` the standard deviation of the row's bulk logits; array arguments
broadcast, results are float arrays of the broadcast shape):

* :func:`k_pred_plain`: Tzachristas et al.'s large-n rule k/n = Phi_c(sigma + Phi^-1(eps))
  (§5.1);
* :func:`k_pred_sink_aware`: the sink- and local-aware bound of §5.4;
* :func:`large_sigma_regime`: the rows where the plain rule is biased low (§5.1), for which
  :func:`attn_audit.theory.finite_n.k_pred_finite_n` is the fix.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from attn_audit.stats.distributions import norm_ppf, norm_sf

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


def k_pred_plain(n: ArrayLike, sigma: ArrayLike, eps: ArrayLike) -> FloatArray:
    """Large-n Gaussian prediction of k_eps: ``n * Phi_c(sigma + Phi^-1(eps))`` (§5.1).

    Args:
        n: keys per row, any shape.
        sigma: logit standard deviation per row (>= 0), broadcastable with ``n``.
        eps: tail-mass budget in (0, 1), broadcastable.

    Returns:
        Predicted k (real-valued), broadcast shape. It does not depend on the logit mean.
    """
    n_, s_, e_ = (np.asarray(a, dtype=np.float64) for a in (n, sigma, eps))
    return np.asarray(n_ * norm_sf(s_ + norm_ppf(e_)), dtype=np.float64)


def k_pred_sink_aware(
    n_bulk: ArrayLike,
    n_sink_local: ArrayLike,
    sigma_bulk: ArrayLike,
    bulk_mass: ArrayLike,
    eps: ArrayLike,
) -> FloatArray:
    """Sink- and local-aware prediction of k_eps (§5.4).

    Keeps the sink and local keys S u L whole; the bulk may then lose eps of the total, i.e.
    ``eps_B = eps / m_B`` of its own mass:
    ``k = |S| + |L| + n_B * Phi_c(sigma_B + Phi^-1(min(eps_B, 1)))`` (0 bulk keys once
    eps_B >= 1). Since the global top-k is the best set of its size, measured k_eps <= this
    value up to the Gaussian approximation.

    Args:
        n_bulk: bulk keys per row, any shape.
        n_sink_local: |S| + |L| per row, broadcastable.
        sigma_bulk: bulk logit standard deviation, broadcastable.
        bulk_mass: softmax mass m_B of the bulk keys in [0, 1], broadcastable.
        eps: tail-mass budget, broadcastable.

    Returns:
        Predicted k, broadcast shape.
    """
    nb, ns, sb, mb, e = (
        np.asarray(a, dtype=np.float64) for a in (n_bulk, n_sink_local, sigma_bulk, bulk_mass, eps)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        eps_b = np.where(mb > 0, e / mb, np.inf)
    k = ns + nb * norm_sf(sb + norm_ppf(np.minimum(eps_b, 1.0)))
    return np.asarray(k, dtype=np.float64)


def large_sigma_regime(sigma: ArrayLike, n: ArrayLike) -> BoolArray:
    """Flag rows where the plain prediction is biased low: ``sigma > 0.6 sqrt(2 ln n)`` (§5.1).

    Args:
        sigma: logit standard deviation, any shape.
        n: keys per row, broadcastable.

    Returns:
        Boolean array of the broadcast shape.
    """
    s = np.asarray(sigma, dtype=np.float64)
    nn = np.maximum(np.asarray(n, dtype=np.float64), 1.0)
    return np.asarray(s > 0.6 * np.sqrt(2.0 * np.log(nn)))
