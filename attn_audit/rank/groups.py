"""Layers and KV-head groups scored as one head (see "KV-head groups and layers" in
:mod:`attn_audit.rank`): k, kfrac and flags of the most demanding member, the worst stability.
"""

from __future__ import annotations

from typing import Any

from attn_audit.rank.flops import flops_saving
from attn_audit.rank.scoring import _Eval, _order_key, _score
from attn_audit.rank.settings import RISK_FLAGS, _Ctx

GROUP_RULE = (
    "k = max over the group's query heads; kfrac = max; stability = worst; flags = union; "
    "saving = the smallest member's kernel-pattern saving (oracle top-k at k without patterns); "
    "scored like one head"
)


def _aggregate(members: list[_Eval], ctx: _Ctx, layer: int, kv_head: int | None) -> _Eval:
    measured = [m for m in members if m.measured]
    agg = _Eval(layer, None, kv_head, measured=bool(measured))
    if not measured:
        agg.flags = ["unmeasured"]
        return agg
    agg.k = max(m.k for m in measured)
    agg.kfrac_measured = max(m.kfrac_measured for m in measured)
    agg.stability = min(m.stability for m in measured)
    agg.window = measured[0].window  # one layer: one window
    agg.head_dim = measured[0].head_dim  # one layer: one head size
    agg.causal = measured[0].causal  # one layer: one kind of site
    agg.oracle_saving = flops_saving(ctx.target, agg.k, agg.causal, agg.window)
    kernel = [m.saving for m in measured if m.kernel is not None]
    agg.saving = min(kernel) if kernel else agg.oracle_saving
    flags = {f for m in members for f in m.flags}
    agg.flags = sorted(flags, key=lambda f: (RISK_FLAGS.index(f) if f in RISK_FLAGS else 99, f))
    agg.score = _score(agg, ctx.config.weights)
    return agg


def _group_rows(evals: list[_Eval], ctx: _Ctx, by_kv: bool) -> list[dict[str, Any]]:
    groups: dict[tuple[int, int | None], list[_Eval]] = {}
    for ev in evals:
        groups.setdefault((ev.layer, ev.kv_head if by_kv else None), []).append(ev)
    aggs = sorted((_aggregate(m, ctx, *key) for key, m in groups.items()), key=_order_key)
    rows = []
    for rank, agg in enumerate(aggs, start=1):
        members = sorted(
            groups[(agg.layer, agg.kv_head if by_kv else None)], key=lambda e: e.head or 0
        )
        row: dict[str, Any] = {"layer": agg.layer}
        if by_kv:
            row["kv_head"] = agg.kv_head
        row.update(
            heads=[m.head for m in members],
            k=agg.k,
            kfrac=agg.k / ctx.target if agg.measured else None,
            flops_saving=agg.saving,
            oracle_flops_saving=agg.oracle_saving,
            mean_head_saving=sum(m.saving for m in members) / len(members),
            score=agg.score,
            rank=rank,
            flags=agg.flags,
            rule=GROUP_RULE,
        )
        rows.append(row)
    return rows
