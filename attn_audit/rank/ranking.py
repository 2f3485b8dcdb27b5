"""The ranking step: score, rank and flag every head; fill the head, layer and KV-group rankings."""

from __future__ import annotations

from typing import Any

from attn_audit.rank.groups import _group_rows
from attn_audit.rank.scoring import _evaluate_all, _planned, _reason
from attn_audit.rank.settings import RISK_FLAGS, PlanConfig
from attn_audit.result import AuditResult


def rank_heads(result: AuditResult, config: PlanConfig | None = None) -> None:
    """Fill each head's ``score``, ``rank`` and risk ``flags``, and ``ranking``,
    ``ranking_layers`` and ``ranking_kv_groups`` in ``result.data``."""
    ctx, evals = _evaluate_all(result, config or PlanConfig())
    by_id = {(h["layer"], h["head"]): h for h in result.heads}
    ranking = []
    for rank, ev in enumerate(evals, start=1):
        rec = by_id[(ev.layer, ev.head)]
        kept = [f for f in rec.get("flags") or [] if f not in RISK_FLAGS and f != "unmeasured"]
        rec["flags"] = kept + ev.flags
        rec["score"], rec["rank"] = ev.score, rank
        ranking.append(
            {
                "layer": ev.layer,
                "head": ev.head,
                "kv_head": ev.kv_head,
                "score": ev.score,
                "rank": rank,
                "k": ev.k if ev.measured else None,
                "kfrac": ev.k / ctx.target if ev.measured else None,
                "pattern": (ev.kernel["pattern"] if ev.kernel is not None else "top-k") if ev.measured else None,
                "flops_saving": ev.saving,
                "oracle_flops_saving": ev.oracle_saving,
                "planned": _planned(ev, ctx),
                "flags": list(ev.flags),
                "reason": _reason(ev, ctx),
            }
        )
    for entry in ranking:  # encoder-decoder: each entry names its kind of site
        copy_site(by_id[(entry["layer"], entry["head"])], entry)
    result.data["ranking"] = ranking
    result.data["ranking_layers"] = _group_rows(evals, ctx, by_kv=False)
    result.data["ranking_kv_groups"] = _group_rows(evals, ctx, by_kv=True)


SITE_FIELDS = ("site_kind", "stack_layer", "causal")


def copy_site(rec: dict[str, Any], entry: dict[str, Any]) -> None:
    """Copy a head record's site fields (encoder-decoder models only) into a ranking or plan entry."""
    for key in SITE_FIELDS:
        if key in rec:
            entry[key] = rec[key]
