"""The budget k at the target length and the length-scaling check behind it.

The budget starts from ``k_p90`` at the audited length and is taken as measured at the target length
when it was audited, else scaled by the head's fitted ``n^C`` law, else at constant ``k/n`` (see
"Budget k" in :mod:`attn_audit.rank`). The same per-length points decide the
``unstable-across-lengths`` flag.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from attn_audit.rank.head_facts import _num
from attn_audit.rank.settings import _Ctx


def _scaling_exponent(head: Mapping[str, Any], eps_key: str) -> float | None:
    scaling = head.get("scaling")
    if not isinstance(scaling, Mapping):
        return None
    by_eps = scaling.get("by_eps")
    if isinstance(by_eps, Mapping) and isinstance(by_eps.get(eps_key), Mapping):
        scaling = by_eps[eps_key]  # {C, alpha, ..., by_eps: {eps: fit}}: the fit at this eps
    elif isinstance(scaling.get(eps_key), Mapping):  # tolerate {eps: fit}
        scaling = scaling[eps_key]
    c = _num(scaling.get("C"))
    return None if c is None else min(1.0, max(0.0, c))


def _length_points(head: Mapping[str, Any], ctx: _Ctx) -> dict[int, Mapping[str, Any]]:
    points: dict[int, Mapping[str, Any]] = {}
    for length, block in (head.get("by_length") or {}).items():
        if isinstance(block, Mapping) and isinstance(block.get("sparsity"), Mapping):
            block = block["sparsity"]  # {n: {"sparsity": {eps: ...}}} as well as {n: {eps: ...}}
        if isinstance(block, Mapping) and isinstance(block.get(ctx.eps_key), Mapping):
            points[int(length)] = block[ctx.eps_key]
    points[ctx.n] = head["sparsity"][ctx.eps_key]
    return points


def _budget(head: Mapping[str, Any], ctx: _Ctx) -> tuple[int, float, str]:
    points = _length_points(head, ctx)
    block = points[ctx.n]
    k_audit = _num(block.get("k_p90"))
    if k_audit is None:
        k_audit = _num(block.get("k_mean")) or 0.0
    at_target = points.get(ctx.target)
    c = _scaling_exponent(head, ctx.eps_key)
    if at_target is not None and _num(at_target.get("k_p90")) is not None:
        k_raw, basis = float(at_target["k_p90"]), f"measured at {ctx.target}"
    elif c is not None:
        k_raw = k_audit * (ctx.target / ctx.n) ** c
        basis = f"scaled from {ctx.n} by the fitted n^C law, C={c:.2f}"
    else:
        k_raw = k_audit * ctx.target / ctx.n
        basis = f"scaled from {ctx.n} at constant k/n, no n^C fit"
    k = min(ctx.target, max(1, math.ceil(k_raw - 1e-9) + ctx.sinks))
    return k, k_audit, basis


def _unstable_across_lengths(head: Mapping[str, Any], ctx: _Ctx) -> bool:
    pts = []
    for length, block in sorted(_length_points(head, ctx).items()):
        k = _num(block.get("k_median"))
        k = k if k is not None and k > 0 else _num(block.get("k_mean"))
        if k is not None and k > 0 and length > 0:
            pts.append((math.log(length), math.log(k)))
    if len(pts) < 2:
        return False
    c = _scaling_exponent(head, ctx.eps_key)
    if c is None:
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        c = 1.0 if sxx == 0 else sum((x - mx) * (y - my) for x, y in pts) / sxx
        c = min(1.0, max(0.0, c))
    intercept = sum(y - c * x for x, y in pts) / len(pts)
    worst = max(abs(y - intercept - c * x) for x, y in pts)
    return worst > math.log1p(ctx.config.length_tolerance) + 1e-12
