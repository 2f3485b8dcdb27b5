"""The gate's metrics: what ``--fail-if`` and ``--policy`` checks can compare (stdlib only).

:data:`METRICS` maps each metric name to a :class:`Metric` that computes one number from an
:class:`~attn_audit.result.AuditResult` (None when the result lacks it, e.g. ``ppl_ratio`` without
``--verify``) and says why it is absent; :func:`metrics` evaluates them all.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from attn_audit.rank import is_non_gaussian, is_sink_saturated
from attn_audit.result import AuditResult


@dataclass(frozen=True)
class Metric:
    """One gate metric: how to compute it and what to say when it is absent."""

    name: str
    description: str
    compute: Callable[[AuditResult], float | None]
    missing: str


def _get(data: Mapping[str, Any], *path: str) -> float | None:
    node: Any = data
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
        return None
    return float(node)


def _kfracs(r: AuditResult) -> list[float]:
    key = r.primary_eps_key if r.run.get("eps_keys") else None
    out = []
    for h in r.heads:
        block = (h.get("sparsity") or {}).get(key) or {}
        if int(block.get("rows") or 0) and _get(block, "kfrac_mean") is not None:
            out.append(float(block["kfrac_mean"]))
    return out


def _stat(fn: Callable[[list[float]], float], values: list[float]) -> float | None:
    return float(fn(values)) if values else None


def _gauss_share(r: AuditResult, non_gaussian: bool) -> float | None:
    verdicts = [v for v in (is_non_gaussian(h) for h in r.heads) if v is not None]
    return sum(1 for v in verdicts if v is non_gaussian) / len(verdicts) if verdicts else None


def _ppl_increase(r: AuditResult) -> float | None:
    ratio = _get(r.data, "verify", "ppl_ratio")
    return None if ratio is None else ratio - 1.0


def _planned_share(r: AuditResult) -> float | None:
    planned, total = (
        _get(r.data, "plan_summary", "heads_planned"),
        _get(r.data, "plan_summary", "heads_total"),
    )
    return None if planned is None or not total else planned / total


def _flag_count(flag: str) -> Callable[[AuditResult], float | None]:
    return lambda r: float(sum(1 for h in r.heads if flag in (h.get("flags") or [])))


_PLAN = "the result has no plan; rank and plan the heads first"
_VERIFY = "verification did not run; add --verify"
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "planned_flops_saving",
            "model-wide share of attention FLOPs the plan saves (0-1)",
            lambda r: _get(r.data, "plan_summary", "planned_flops_saving"),
            _PLAN,
        ),
        Metric(
            "heads_planned",
            "number of heads the plan makes sparse",
            lambda r: _get(r.data, "plan_summary", "heads_planned"),
            _PLAN,
        ),
        Metric(
            "heads_planned_share",
            "share of all heads the plan makes sparse (0-1)",
            _planned_share,
            _PLAN,
        ),
        Metric(
            "ppl_ratio",
            "perplexity with the plan / dense perplexity (verify.ppl_ratio)",
            lambda r: _get(r.data, "verify", "ppl_ratio"),
            _VERIFY,
        ),
        Metric("ppl_increase", "ppl_ratio - 1 (0.01 = +1% perplexity)", _ppl_increase, _VERIFY),
        Metric(
            "top1_agreement",
            "share of positions whose top-1 token is unchanged (verify)",
            lambda r: _get(r.data, "verify", "top1_agreement"),
            _VERIFY,
        ),
        Metric(
            "hidden_cosine",
            "cosine of final hidden states, sparse vs dense (verify)",
            lambda r: _get(r.data, "verify", "hidden_cosine"),
            _VERIFY,
        ),
        Metric(
            "verified_flops_saving",
            "saving of the largest plan prefix within the quality budget (verify)",
            lambda r: _get(r.data, "verify", "largest_plan_flops_saving"),
            _VERIFY,
        ),
        Metric(
            "heads_non_gaussian",
            "share of decided heads with a non-Gaussian site (0-1; skipped tests left out)",
            lambda r: _gauss_share(r, True),
            "no head had a Gaussianity test",
        ),
        Metric(
            "heads_gaussian",
            "share of decided heads whose every site is Gaussian-like (0-1)",
            lambda r: _gauss_share(r, False),
            "no head had a Gaussianity test",
        ),
        Metric(
            "median_kfrac",
            "median over heads of kfrac_mean (k_eps/n) at the primary eps",
            lambda r: _stat(statistics.median, _kfracs(r)),
            "no head was measured",
        ),
        Metric(
            "mean_kfrac",
            "mean over heads of kfrac_mean (k_eps/n) at the primary eps",
            lambda r: _stat(statistics.fmean, _kfracs(r)),
            "no head was measured",
        ),
        Metric(
            "rows",
            "query rows measured over all heads (0 = nothing measured)",
            lambda r: float(r.rows_measured),
            "no rows",
        ),
        Metric(
            "heads_total",
            "number of (layer, query head) records",
            lambda r: float(len(r.heads)),
            "",
        ),
        Metric(
            "sink_saturated_heads",
            "heads with sink_mass_mean > 1 - eps (primary eps)",
            lambda r: (
                float(sum(is_sink_saturated(h, float(r.primary_eps_key)) for h in r.heads))
                if r.run.get("eps_keys")
                else None
            ),
            "the audit has no eps",
        ),
        Metric(
            "retrieval_like_heads",
            "heads flagged retrieval-like by the ranking",
            _flag_count("retrieval-like"),
            "",
        ),
        Metric(
            "unstable_heads", "heads flagged unstable by the ranking", _flag_count("unstable"), ""
        ),
        Metric(
            "nonfinite_rows",
            "rows dropped because they held NaN/inf (run.nonfinite_rows)",
            lambda r: _get(r.data, "run", "nonfinite_rows"),
            "the run did not record it",
        ),
    )
}


def metrics(result: AuditResult) -> dict[str, float | None]:
    """Every gate metric of ``result`` (None where absent); pure, never mutates ``result``."""
    return {name: m.compute(result) for name, m in METRICS.items()}
