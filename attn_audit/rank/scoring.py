"""Per-head evaluation: budget, risk flags, score and order, and whether and why a head is planned.

:func:`_evaluate_all` turns every head record of a result into an :class:`_Eval` (see "Risk flags"
and "Score" in :mod:`attn_audit.rank`), sorted best first; :func:`_planned` and :func:`_reason` say
whether the plan keeps a head and why, in the words the ranking and the plan both show.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from attn_audit.rank.budget import _budget, _unstable_across_lengths
from attn_audit.rank.flops import flops_saving
from attn_audit.rank.kernel import budget_text, kernel_choice
from attn_audit.rank.head_facts import (
    _num,
    distant_mass,
    is_non_gaussian,
    is_sink_saturated,
)
from attn_audit.rank.settings import RISK_FLAGS, PlanConfig, RankWeights, _context, _Ctx
from attn_audit.result import AuditResult


@dataclass
class _Eval:
    """Everything the score, the reason and the plan need for one head (or group)."""

    layer: int
    head: int | None
    kv_head: int | None
    measured: bool
    k: int = 0  # budget at the target length
    k_audit: float = 0.0  # k_p90 at the audited length
    basis: str = ""
    kfrac_measured: float = 1.0
    saving: float = 0.0  # the planned pattern's saving: kernel when measured, else oracle top-k
    oracle_saving: float = 0.0  # per-row top-k at budget k: the bound no kernel beats
    kernel: dict[str, Any] | None = None  # kernel_choice(): the cheapest kernel pattern, or None
    window: int | None = None  # the layer's causal sliding window (heads[].sliding_window)
    causal: bool = True  # the head's rows see only earlier keys (heads[].causal, else the model's)
    head_dim: int | None = None  # the head's d_qk where it varies per layer (heads[].head_dim)
    stability: float = 0.0
    ci_half: float | None = None
    flags: list[str] = field(default_factory=list)
    score: float = 0.0


def _evaluate(head: Mapping[str, Any], ctx: _Ctx) -> _Eval:
    ev = _Eval(int(head["layer"]), int(head["head"]), int(head.get("kv_head", 0)), measured=False)
    d = head.get("head_dim")
    ev.head_dim = int(d) if isinstance(d, int) and d > 0 else None
    causal = head.get("causal")  # per site in an encoder-decoder model (decoder self-attention only)
    ev.causal = causal if isinstance(causal, bool) else ctx.causal
    block = (head.get("sparsity") or {}).get(ctx.eps_key)
    if not isinstance(block, Mapping) or not int(block.get("rows") or 0):
        ev.flags = ["unmeasured"]
        return ev
    ev.measured = True
    ev.k, ev.k_audit, ev.basis = _budget(head, ctx)
    window = head.get("sliding_window")
    ev.window = int(window) if isinstance(window, int) and window > 0 else None
    ev.oracle_saving = flops_saving(ctx.target, ev.k, ev.causal, ev.window)
    ev.kernel = kernel_choice(head, ctx.eps_key, ctx.target, ev.head_dim or ctx.head_dim, ev.causal, ctx.sinks)
    ev.saving = ev.oracle_saving if ev.kernel is None else float(ev.kernel["flops_saving"])
    kfrac = _num(block.get("kfrac_mean"))
    ev.kfrac_measured = min(1.0, max(0.0, kfrac if kfrac is not None else ev.k_audit / ctx.n))
    ci = (block.get("ci") or {}).get("kfrac_mean")
    cfg = ctx.config
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
        width = max(0.0, float(ci[1]) - float(ci[0]))
        rel = (
            width / ev.kfrac_measured
            if ev.kfrac_measured > 0
            else (0.0 if width == 0 else math.inf)
        )
        ev.stability, ev.ci_half = max(0.0, 1.0 - rel), width / 2
        if rel > cfg.unstable_ci:
            ev.flags.append("unstable")
    if is_non_gaussian(head):
        ev.flags.append("non-gaussian")
    if is_sink_saturated(head, ctx.eps):
        ev.flags.append("sink-saturated")
    bulk = distant_mass(head)
    if bulk is not None and bulk > cfg.retrieval_mass:
        ev.flags.append("retrieval-like")
    if _unstable_across_lengths(head, ctx):
        ev.flags.append("unstable-across-lengths")
    ev.flags.sort(key=RISK_FLAGS.index)
    ev.score = _score(ev, cfg.weights)
    return ev


def _score(ev: _Eval, w: RankWeights) -> float:
    raw = w.saving * ev.saving + w.sparsity * (1.0 - ev.kfrac_measured) + w.stability * ev.stability
    return round(raw - sum(w.penalty(f) for f in ev.flags), 6)


def _order_key(ev: _Eval) -> tuple[Any, ...]:
    return (
        not ev.measured,
        -ev.score,
        ev.layer,
        ev.head if ev.head is not None else -1,
        ev.kv_head if ev.kv_head is not None else -1,
    )


def _evaluate_all(result: AuditResult, config: PlanConfig) -> tuple[_Ctx, list[_Eval]]:
    ctx = _context(result, config)
    evals = sorted((_evaluate(h, ctx) for h in result.heads), key=_order_key)
    return ctx, evals


def _planned(ev: _Eval, ctx: _Ctx) -> bool:
    """Kernel plan: the head's cheapest pattern beats dense tiles. Oracle plan (no patterns
    measured): its top-k budget is within ``max_kfrac`` of the keys."""
    if not ev.measured:
        return False
    if ev.kernel is not None:
        return ev.kernel["pattern"] != "dense"
    return _oracle_planned(ev, ctx)


def _oracle_planned(ev: _Eval, ctx: _Ctx) -> bool:
    """The per-row top-k oracle plan keeps the head (the bound reported beside a kernel plan)."""
    return ev.measured and ev.k <= ctx.config.max_kfrac * ctx.target


def _reason(ev: _Eval, ctx: _Ctx) -> str:
    if not ev.measured:
        return f"no row measured at eps={ctx.eps_key}; not planned"
    oracle = (
        f"keeps {ev.k} of {ctx.target} keys ({ev.k / ctx.target:.0%}) for eps={ctx.eps_key} in 90% "
        f"of rows ({ev.basis}, {ctx.sinks} sink(s) added)"
    )
    if ev.kernel is None:
        parts = [oracle, f"saves {ev.saving:.0%} of its attention FLOPs at {ctx.target}"]
    else:
        parts = [_kernel_reason(ev.kernel, ctx), f"oracle top-k {oracle} (saves {ev.oracle_saving:.0%})"]
    if ev.ci_half is None:
        parts.append("stability unknown (no CI)")
    else:
        word = "unstable" if "unstable" in ev.flags else "stable"
        parts.append(f"{word} (CI ±{ev.ci_half:.1%})")
    parts.append(f"flags: {', '.join(ev.flags) or 'none'}")
    if not _planned(ev, ctx):
        parts.append(
            "not planned: no kernel pattern computes fewer tiles than dense"
            if ev.kernel is not None
            else f"not planned: needs {ev.k / ctx.target:.1%} of keys > max_kfrac {ctx.config.max_kfrac:.0%}"
        )
    return "; ".join(parts)


def _kernel_reason(choice: Mapping[str, Any], ctx: _Ctx) -> str:
    """Why a head runs its kernel pattern (or stays dense), in one clause."""
    if choice["pattern"] == "dense":
        return (f"stays dense: no pattern measured at eps={ctx.eps_key}" if not choice["candidates"]
                else f"stays dense: every pattern needs dense tiles for 1-{ctx.eps_key} in 90% of rows")
    return (f"runs {choice['pattern']} ({budget_text(choice)}, block {choice['block_size']}): "
            f"1-{ctx.eps_key} of the mass in 90% of rows, saves {choice['flops_saving']:.0%} of its "
            f"attention FLOPs at {ctx.target} in whole tiles, estimation included")
