"""Stage ``theory``: Gaussian-score predictions of k_eps, the norm bound R, and n^C fits (docs/methods.md §3, §5, §7).

Pure numpy/scipy (no torch). Conventions:

* ``k_eps`` is the mass-based count of docs/methods.md §2.1: the smallest k whose top-k softmax
  mass is >= 1 - eps. ``n`` is always the per-row key count n_i (§1.2), never the context.
* ``sigma`` is the standard deviation of the row's (bulk) logits, in logit units.
* Every function broadcasts its array arguments with numpy rules and returns float arrays
  of the broadcast shape (0-d arrays for scalar input).

Which variant each function computes (docs/methods.md §0: paper or project):

* :func:`k_pred_plain`: Tzachristas et al.'s large-n rule k/n = Phi_c(sigma + Phi^-1(eps))
  (paper, §5.1); underestimates k for sigma >~ 0.5 sqrt(2 ln n) (project, by simulation).
* :func:`k_pred_finite_n`: the finite-n Monte Carlo of §5.3 (project).
* :func:`k_pred_sink_aware`: the sink- and local-aware bound of §5.4 (project).
* :func:`r_variants`: R_F = c_s B^2 ||W||_F (Deng et al.'s R as summarised, with the model's
  own scale c_s; §3.2) and the RoPE-robust R_op = c_s B^2 ||W_Q||_2 ||W_K||_2, for B = max and p99.9 input
  norms.

Modules: ``predict`` (closed forms), ``finite_n`` (the cached finite-n grid) on
``simulation`` (simulated rows and their exact k_eps), ``norm_bound`` (R), ``correlation``
(rank correlation with a bootstrap interval), ``scaling`` (the n^C fit).
"""

from __future__ import annotations

from attn_audit.theory.correlation import average_ranks, spearman_with_ci
from attn_audit.theory.finite_n import k_pred_finite_n
from attn_audit.theory.norm_bound import RVariants, r_variants, r_variants_heads
from attn_audit.theory.predict import (
    k_pred_plain,
    k_pred_sink_aware,
    large_sigma_regime,
)
from attn_audit.theory.scaling import fit_scaling

__all__ = [
    "RVariants", "average_ranks", "fit_scaling", "k_pred_finite_n", "k_pred_plain",
    "k_pred_sink_aware", "large_sigma_regime", "r_variants", "r_variants_heads",
    "spearman_with_ci",
]  # fmt: skip
