"""The plan step: each head's kernel pattern (or top-k oracle), those left dense and why, the model-wide saving."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attn_audit.rank.flops import attention_flops
from attn_audit.rank.kernel import BUDGET_KEYS, pattern_flops
from attn_audit.rank.ranking import copy_site, rank_heads
from attn_audit.rank.scoring import _Eval, _evaluate_all, _kernel_reason, _oracle_planned, _planned, _reason
from attn_audit.rank.settings import PlanConfig, _Ctx
from attn_audit.result import AuditResult

ENCODER_DECODER_NOTE = (
    "encoder-decoder model: the plan ranks encoder self-, decoder self- and cross-attention sites alike (FLOPs at "
    "target_len for both the encoder and the decoder sequence; decoder self-attention causal, the others "
    "bidirectional); apply_plan, --verify and the exports cannot apply it inside the model")

FORMULA = (
    "score = w_saving*saving + w_sparsity*(1 - kfrac) + w_stability*stability "
    "- sum(penalty[flag]); "
    "saving = the head's cheapest kernel pattern: 1 - (its tiles + estimation) / dense tiles at target_len, "
    "or, without measured patterns, the oracle 1 - sum_i min(k, n_i) / sum_i n_i (QK^T + PV, 4*d FLOPs per pair); "
    "k = min(N, max(1, ceil(k_p90 scaled to N) + sinks)); stability = max(0, 1 - CI width / kfrac)"
)


def build_plan(result: AuditResult, config: PlanConfig | None = None) -> None:
    """Fill ``result.data["plan"]`` (planned heads, best first) and ``result.data["plan_summary"]``.

    With ``heads[].patterns`` (the default audit) each head runs its cheapest kernel pattern or
    stays dense, and the per-row top-k oracle saving is reported beside it as the bound; without
    them (``--patterns none``) the plan is the oracle top-k plan itself, labelled so."""
    config = config or PlanConfig()
    ctx, evals = _evaluate_all(result, config)
    model = result.model
    if model.get("layer_heads"):  # heads vary per layer: each layer's own count
        total = max(len(result.heads), sum(int(g[0]) for g in model["layer_heads"]))
    else:
        total = max(
            len(result.heads), int(model.get("num_layers") or 0) * int(model.get("num_heads") or 0)
        )
    kernel = any(ev.kernel is not None for ev in evals)
    weight = _kernel_weights(evals, ctx, total) if kernel else _head_weights(evals, ctx, total)
    plan, excluded = [], []
    for ev in evals:
        if not _planned(ev, ctx):
            excluded.append(_excluded_entry(ev, ctx))
            continue
        plan.append(_plan_entry(ev, ctx, weight(ev)))
    saving = sum(ev.saving * weight(ev) for ev in evals if _planned(ev, ctx))
    oracle_weight = _head_weights(evals, ctx, total)
    oracle = sum(ev.oracle_saving * oracle_weight(ev) for ev in evals if _oracle_planned(ev, ctx))
    summary = _summary(ctx, plan, excluded, total, saving,
                       _dense_tiles_flops(evals, ctx, total) if kernel else _dense_flops(evals, ctx, total))
    summary["oracle_flops_saving"] = oracle
    summary["oracle_heads_planned"] = sum(1 for ev in evals if _oracle_planned(ev, ctx))
    if kernel:
        summary.update(_kernel_summary(plan, ctx, total, saving, oracle))
    by_id = {(h["layer"], h["head"]): h for h in result.heads}
    for entry in plan:
        copy_site(by_id[(entry["layer"], entry["head"])], entry)
    if model.get("encoder_decoder"):  # causality per site (heads[].causal), not the model's
        summary["note"] = ENCODER_DECODER_NOTE
        summary["causal"] = "per site"
        summary["text"] = summary["text"].replace("(bidirectional QK^T", "(decoder self-attention causal, the "
                                                  "other sites bidirectional; QK^T")
    result.data["plan"] = plan
    result.data["plan_summary"] = summary


def _dense_flops(evals: list[_Eval], ctx: _Ctx, total: int) -> int:
    """Dense attention FLOPs of all heads at the target length (windowed layers see fewer keys)."""
    full = attention_flops(ctx.target, ctx.head_dim, ctx.causal)
    return sum(attention_flops(ctx.target, ev.head_dim or ctx.head_dim, ev.causal, ev.window) for ev in evals) + \
        full * (total - len(evals))


def _dense_tiles_flops(evals: list[_Eval], ctx: _Ctx, total: int) -> int:
    """Dense attention FLOPs of all heads at the target length in whole tiles, as a block kernel
    computes them (the denominator of the kernel savings)."""
    block = next(int(ev.kernel["block_size"]) for ev in evals if ev.kernel is not None)
    full = pattern_flops(ctx.target, block, ctx.head_dim, ctx.causal, "dense", 0)
    return sum(pattern_flops(ctx.target, block, ev.head_dim or ctx.head_dim, ev.causal, "dense", 0, window=ev.window)
               for ev in evals) + full * (total - len(evals))


def _costs_differ(evals: list[_Eval]) -> bool:
    """Whether heads differ in dense cost: a windowed layer, or head sizes that vary per layer."""
    return any(ev.window for ev in evals) or len({ev.head_dim for ev in evals}) > 1 or \
        len({ev.causal for ev in evals}) > 1


def _head_weights(evals: list[_Eval], ctx: _Ctx, total: int) -> Callable[[_Eval], float]:
    """A head's share of the model's dense attention FLOPs (1/total when no layer is windowed)."""
    if not _costs_differ(evals):
        return lambda ev: 1.0 / total if total else 0.0
    dense = _dense_flops(evals, ctx, total)
    return lambda ev: (attention_flops(ctx.target, ev.head_dim or ctx.head_dim, ev.causal, ev.window) / dense
                       if dense else 0.0)


def _kernel_weights(evals: list[_Eval], ctx: _Ctx, total: int) -> Callable[[_Eval], float]:
    """A head's share of the model's dense attention tiles (1/total when all heads cost the same)."""
    if not _costs_differ(evals):
        return lambda ev: 1.0 / total if total else 0.0
    block = next(int(ev.kernel["block_size"]) for ev in evals if ev.kernel is not None)
    dense = _dense_tiles_flops(evals, ctx, total)
    return lambda ev: (pattern_flops(ctx.target, block, ev.head_dim or ctx.head_dim, ev.causal, "dense", 0,
                                     window=ev.window) / dense if dense else 0.0)


def _excluded_entry(ev: _Eval, ctx: _Ctx) -> dict[str, Any]:
    """The ``plan_summary.excluded`` entry of a head the plan leaves dense, with why."""
    if not ev.measured:
        why = "not measured"
    elif ev.kernel is not None:
        why = _kernel_reason(ev.kernel, ctx)
    else:
        why = f"needs {ev.k} of {ctx.target} keys ({ev.k / ctx.target:.1%}) > max_kfrac {ctx.config.max_kfrac:g}"
    return {"layer": ev.layer, "head": ev.head, "k": ev.k if ev.measured else None, "why": why}


def _plan_entry(ev: _Eval, ctx: _Ctx, weight: float) -> dict[str, Any]:
    """The ``plan`` entry of a planned head (``weight``: its share of the model's dense attention
    FLOPs). ``pattern`` is the kernel pattern it runs, or ``top-k`` for the oracle plan; ``k`` and
    ``oracle_flops_saving`` are the per-row top-k bound for the same head."""
    entry: dict[str, Any] = {"layer": ev.layer, "head": ev.head, "kv_head": ev.kv_head}
    if ev.kernel is not None:
        entry["pattern"] = ev.kernel["pattern"]
        entry["block_size"] = ev.kernel["block_size"]
        entry["level"] = ev.kernel["candidates"][ev.kernel["pattern"]]["level"]
        entry.update({k: ev.kernel[k] for k in BUDGET_KEYS if k in ev.kernel})
        entry["estimate_flops"] = ev.kernel.get("estimate_flops", 0)
    else:
        entry["pattern"] = "top-k"
    entry.update({
        "k": ev.k,
        "kfrac": ev.k / ctx.target,
        "flops_saving": ev.saving,
        "flops_saving_model": ev.saving * weight,
        "oracle_flops_saving": ev.oracle_saving,
        "score": ev.score,
        "flags": list(ev.flags),
        "reason": _reason(ev, ctx),
    })
    return entry


def _kernel_summary(plan: list[dict[str, Any]], ctx: _Ctx, total: int, saving: float,
                    oracle: float) -> dict[str, Any]:
    """The kernel plan's part of ``plan_summary``: block size, heads per pattern, the text."""
    counts: dict[str, int] = {}
    for e in plan:
        counts[e["pattern"]] = counts.get(e["pattern"], 0) + 1
    block = plan[0]["block_size"] if plan else None
    return {
        "kind": "kernel",
        "block_size": block,
        "heads_by_pattern": counts,
        "text": (
            f"Running {len(plan)} of {total} heads on their cheapest kernel pattern at {ctx.target} tokens "
            f"(eps={ctx.eps_key}, whole tiles of {block}, estimation included) saves {saving:.1%} of the "
            f"model's attention FLOPs; the per-row top-k oracle bound is {oracle:.1%}."
        ),
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
        "kind": "oracle-top-k",
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

