"""Rank heads for sparse attention and plan a kernel pattern per head (stdlib only).

Everything here reads the plain :class:`~attn_audit.result.AuditResult`, so ``attn-audit --load``
can rank, plan and export without torch or the model.

**FLOP count.** One head, one sequence of length ``n``, head dimension ``d``. ``QKᵀ`` and ``PV``
each cost ``2·d`` FLOPs (one multiply-add) per (query, key) pair kept, so a head costs
``4·d·P`` FLOPs where ``P`` is the number of pairs computed. Dense: ``P = n²``; causal:
``P = n(n+1)/2`` (row ``i`` sees ``n_i = i`` keys, 1-based). Top-k: row ``i`` costs ``min(k, n_i)``
keys, so causal ``P = Σ_i min(k, i)`` and non-causal ``P = n·min(k, n)``. Softmax, masking and the
cost of *finding* the top-k keys are not counted: the saving is that of an ideal kernel. A head's
saving is ``1 − sparse/dense``; the model-wide saving is saved FLOPs over the dense attention
FLOPs of all heads (each head costs the same, so it is the mean saving over all heads,
unplanned ones counting 0).

**Budget k** at the target length ``N`` (``--target-len``, default the audited ``seq_len`` ``n``):
start from the 90th percentile ``k_p90`` of the per-row ``k_eps`` at the primary eps (so the budget
covers 90% of rows, not the average row). If ``N == n``, or ``N`` was audited too (``by_length``),
use that measurement; else, if the head has a fitted ``scaling {C, alpha}``, scale by the fitted law
``alpha·N^C / (alpha·n^C) = (N/n)^C`` (C clamped to [0, 1]); else scale at constant ``k/n``
(``k_p90·N/n``, conservative when k grows sub-linearly). Then ``k = min(N, max(1, ⌈k⌉ + sinks))``,
with ``sinks = run.sinks``, because runtimes keep the sink tokens anyway.

**Risk flags** (added to ``heads[].flags``; thresholds in :class:`PlanConfig`):

- ``non-gaussian``: some gaussianity site has ``is_gaussian`` False or a verdict other than
  ``gaussian-like`` (skipped sites do not count);
- ``sink-saturated``: ``sink_mass_mean > 1 − eps`` (k_eps ≈ sinks, says nothing about scaling);
- ``retrieval-like``: ``bulk_mass_mean`` (mass outside sinks and the local window) above
  ``retrieval_mass`` (default 0.5): a static sink + window pattern cannot serve it;
- ``unstable``: relative width of the CI of ``kfrac_mean``, ``(hi − lo)/kfrac_mean``, above
  ``unstable_ci`` (default 0.5);
- ``unstable-across-lengths``: with several audited lengths, some length's median k deviates
  from the power law ``alpha·n^C`` by more than a factor ``1 + length_tolerance`` (default
  0.5); C is the head's fitted exponent, else a least-squares fit over the lengths, clamped to
  [0, 1]; alpha is refitted, so only variation *not explained by scaling* counts.

**Kernel plan.** With ``heads[].patterns`` (the default audit) each head's ``saving`` is that of
its cheapest kernel pattern at ``N`` in whole tiles, estimation included
(:mod:`attn_audit.rank.kernel`), and the plan keeps the heads whose pattern beats dense tiles;
the per-row top-k saving above stays as ``oracle_flops_saving``, the bound no kernel beats.
Without patterns (``--patterns none``) the saving is the oracle's and the plan keeps the heads
whose ``k ≤ max_kfrac·N`` (``pattern: "top-k"``, an oracle no kernel runs).

**Score** (higher = make sparse first)::

    score = w_saving·saving + w_sparsity·(1 − kfrac) + w_stability·stability − Σ_flags penalty(flag)

``saving`` is the head's FLOP saving at ``N`` (kernel pattern, else top-k at budget k), ``kfrac``
its measured ``kfrac_mean`` at the audited length, ``stability = max(0, 1 − relative CI width)``
(0 when no CI). Defaults (:class:`RankWeights`): 0.6, 0.2, 0.2; penalties non-gaussian 0.05,
sink-saturated 0.05, retrieval-like 0.15, unstable 0.10, unstable-across-lengths 0.15. Ties
break by (layer, head); heads with no measured row rank last with score 0.

**KV-head groups and layers** are scored as one head whose k is the **max over its query heads**,
kfrac the max, stability the worst and flags the union (the ``rule`` field says so): KV-cache
methods act per KV head, so the group must keep what its most demanding query head needs.
"""

from __future__ import annotations

from attn_audit.rank.flops import (
    attention_flops,
    flops_saving,
    kept_pairs,
    sparse_flops,
)
from attn_audit.rank.groups import GROUP_RULE
from attn_audit.rank.head_facts import (
    SKIPPED_VERDICTS,
    distant_mass,
    is_non_gaussian,
    is_sink_saturated,
)
from attn_audit.rank.plan import FORMULA, build_plan, rank_and_plan
from attn_audit.rank.ranking import rank_heads
from attn_audit.rank.settings import RISK_FLAGS, PlanConfig, RankWeights

__all__ = [
    "FORMULA",
    "GROUP_RULE",
    "RISK_FLAGS",
    "SKIPPED_VERDICTS",
    "PlanConfig",
    "RankWeights",
    "attention_flops",
    "build_plan",
    "distant_mass",
    "flops_saving",
    "is_non_gaussian",
    "is_sink_saturated",
    "kept_pairs",
    "rank_and_plan",
    "rank_heads",
    "sparse_flops",
]
