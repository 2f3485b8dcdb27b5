"""What :func:`attn_audit.apply_plan` runs: per (layer, query head) a kernel pattern (no torch).

A plan comes as an :class:`~attn_audit.result.AuditResult` (its kernel plan, see
:mod:`attn_audit.rank.kernel`), a flex plan dict or the path of a ``flex_plan.json``
(:mod:`attn_audit.export.flex`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attn_audit.export.flex import BUDGETS, check_flex_plan, flex_plan_of, read_flex


@dataclass(frozen=True)
class HeadPattern:
    """One head's pattern and its budgets (0 where the pattern has none)."""

    pattern: str = "dense"
    sink_blocks: int = 0
    window_blocks: int = 0
    blocks: int = 0
    vertical_size: int = 0
    slash_size: int = 0


@dataclass
class LoadedPlan:
    """A validated plan: block size and the non-dense heads by (layer, head)."""

    block_size: int
    heads: dict[tuple[int, int], HeadPattern] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def layer(self, layer: int) -> dict[int, HeadPattern]:
        """The planned (non-dense) heads of ``layer``."""
        return {h: p for (la, h), p in self.heads.items() if la == layer}


def load_plan(plan: Any, model_info: Mapping[str, Any] | None = None) -> LoadedPlan:
    """Read ``plan`` (AuditResult, flex plan dict, or path) and check it against ``model_info``
    (``result.model``-style or Hugging Face config dict) when given."""
    from attn_audit.result import AuditResult

    if isinstance(plan, AuditResult):
        data = check_flex_plan(flex_plan_of(plan), "the audit's plan", model_info)
    elif isinstance(plan, (str, Path)):
        data = read_flex(plan, model_info)
    elif isinstance(plan, Mapping):
        data = check_flex_plan(dict(plan), "the plan", model_info)
    else:
        raise TypeError(f"apply_plan takes an AuditResult, a flex plan dict or a path, not {type(plan).__name__}")
    heads = {}
    for layer, entry in enumerate(data["layers"]):
        for head, value in entry.items():
            if value["pattern"] == "dense":
                continue
            heads[(layer, int(head))] = HeadPattern(value["pattern"], **{k: int(value[k]) for k in BUDGETS[value["pattern"]]})
    return LoadedPlan(int(data["block_size"]), heads, data)
