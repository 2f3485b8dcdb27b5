"""The plan step: heads made top-k sparse, those left dense and why, and the model-wide saving."""

from __future__ import annotations

from typing import Any

from attn_audit.rank.flops import attention_flops
from attn_audit.rank.kernel import add_kernel_plan
from attn_audit.rank.ranking import rank_heads
from attn_audit.rank.scoring import _Eval, _evaluate_all, _planned, _reason
from attn_audit.rank.settings import PlanConfig, _Ctx
from attn_audit.result import AuditResult

FORMULA = (
    "score = w_saving*saving + w_sparsity*(1 - kfrac) + w_stability*stability "
    "- sum(penalty[flag]); "
    "saving = 1 - sum_i min(k, n_i) / sum_i n_i at target_len (QK^T + PV, 4*d FLOPs per pair); "
    "k = min(N, max(1, ceil(k_p90 scaled to N) + sinks)); stability = max(0, 1 - CI width / kfrac)"
)


def build_plan(result: AuditResult, config: PlanConfig | None = None) -> None:
    """Fill ``result.data["plan"]`` (best first) and ``result.data["plan_summary"]``."""
    config = config or PlanConfig()
    ctx, evals = _evaluate_all(result, config)
    model = result.model
    if model.get("layer_heads"):  # heads vary per layer: each layer's own count
        total = max(len(result.heads), sum(int(g[0]) for g in model["layer_heads"]))
    else:
        total = max(
            len(result.heads), int(model.get("num_layers") or 0) * int(model.get("num_heads") or 0)
        )
    weight = _head_weights(evals, ctx, total)
    windowed = _costs_differ(evals)
    plan, excluded = [], []
    for ev in evals:
        if not _planned(ev, ctx):
            excluded.append(_excluded_entry(ev, ctx))
            continue
        plan.append(_plan_entry(ev, ctx, total, weight(ev) if windowed else None))
    if windowed:
        saving = sum(ev.saving * weight(ev) for ev in evals if _planned(ev, ctx))
    else:  # every head costs the same
        saving = sum(ev.saving for ev in evals if _planned(ev, ctx)) / total if total else 0.0
    result.data["plan"] = plan
    result.data["plan_summary"] = _summary(ctx, plan, excluded, total, saving, _dense_flops(evals, ctx, total))


def _dense_flops(evals: list[_Eval], ctx: _Ctx, total: int) -> int:
    """Dense attention FLOPs of all heads at the target length (windowed layers see fewer keys)."""
    full = attention_flops(ctx.target, ctx.head_dim, ctx.causal)
    return sum(attention_flops(ctx.target, ev.head_dim or ctx.head_dim, ctx.causal, ev.window) for ev in evals) + \
        full * (total - len(evals))


def _costs_differ(evals: list[_Eval]) -> bool:
    """Whether heads differ in dense cost: a windowed layer, or head sizes that vary per layer."""
    return any(ev.window for ev in evals) or len({ev.head_dim for ev in evals}) > 1


def _head_weights(evals: list[_Eval], ctx: _Ctx, total: int):  # type: ignore[no-untyped-def]
    """A head's share of the model's dense attention FLOPs (1/total when no layer is windowed)."""
    if not _costs_differ(evals):
        return lambda ev: 1.0 / total if total else 0.0
    dense = _dense_flops(evals, ctx, total)
    return lambda ev: (attention_flops(ctx.target, ev.head_dim or ctx.head_dim, ctx.causal, ev.window) / dense
                       if dense else 0.0)


def _excluded_entry(ev: _Eval, ctx: _Ctx) -> dict[str, Any]:
    """The ``plan_summary.excluded`` entry of a head the plan leaves dense, with why."""
    why = (
        "not measured"
        if not ev.measured
        else (
            f"needs {ev.k} of {ctx.target} keys ({ev.k / ctx.target:.1%}) "
            f"> max_kfrac {ctx.config.max_kfrac:g}"
        )
    )
    return {"layer": ev.layer, "head": ev.head, "k": ev.k if ev.measured else None, "why": why}


def _plan_entry(ev: _Eval, ctx: _Ctx, total: int, weight: float | None) -> dict[str, Any]:
    """The ``plan`` entry of a head made top-k sparse (``weight``: its share of the model's dense
    attention FLOPs where windowed layers make heads cost differently; None: 1 / ``total``)."""
    return {
        "layer": ev.layer,
        "head": ev.head,
        "kv_head": ev.kv_head,
        "k": ev.k,
        "pattern": "top-k",
        "kfrac": ev.k / ctx.target,
        "flops_saving": ev.saving,
        "flops_saving_model": (ev.saving * weight if weight is not None
                               else ev.saving / total if total else 0.0),
        "score": ev.score,
        "flags": list(ev.flags),
        "reason": _reason(ev, ctx),
    }


def _summary(
    ctx: _Ctx,
    plan: list[dict[str, Any]],
    excluded: list[dict[str, Any]],
    total: int,
    saving: float,
    dense: int,
) -> dict[str, Any]:
    """``plan_summary``: counts, the model-wide saving and FLOPs (``dense``: all heads' dense
    attention FLOPs at the target length), the text, formula and settings."""
    return {
        "target_len": ctx.target,
        "audited_len": ctx.n,
        "eps_key": ctx.eps_key,
        "heads_planned": len(plan),
        "heads_total": total,
        "heads_excluded": len(excluded),
        "excluded": excluded,
        "planned_flops_saving": saving,
        "dense_attention_flops": dense,
        "planned_attention_flops": round(dense * (1.0 - saving)),
        "attention_speedup_bound": (1.0 / (1.0 - saving)) if saving < 1 else None,
        "causal": ctx.causal,
        "text": (
            f"Making {len(plan)} of {total} heads top-k sparse at {ctx.target} tokens "
            f"(eps={ctx.eps_key}) saves {saving:.1%} of the model's attention FLOPs "
            f"({'causal' if ctx.causal else 'bidirectional'} QK^T + PV, ideal kernel)."
        ),
        "formula": FORMULA,
        "weights": ctx.config.weights.to_dict(),
        "thresholds": ctx.config.thresholds(),
    }


def rank_and_plan(result: AuditResult, config: PlanConfig | None = None) -> None:
    """Run :func:`rank_heads` then :func:`build_plan` with the same configuration."""
    rank_heads(result, config)
    build_plan(result, config)
    add_kernel_plan(result, config)

