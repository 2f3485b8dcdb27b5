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


def _minus_one(x: float | None) -> float | None:
    return None if x is None else x - 1.0


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
_CONFIG = "no third-party config was checked; add --check-config FILE"
_RETRIEVAL = ("no informative retrieval check: add --verify (causal LMs only) and a --retrieval-len where "
              "the dense model finds the passkey")
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
            "kernel_ppl_increase",
            "perplexity increase with the kernel plan applied (FlexAttention; verify.kernel.ppl_ratio - 1)",
            lambda r: _minus_one(_get(r.data, "verify", "kernel", "ppl_ratio")),
            _VERIFY,
        ),
        Metric(
            "kernel_top1_agreement",
            "top-1 agreement with the kernel plan applied (verify.kernel)",
            lambda r: _get(r.data, "verify", "kernel", "top1_agreement"),
            _VERIFY,
        ),
        Metric(
            "kernel_hidden_cosine",
            "hidden-state cosine with the kernel plan applied (encoders; verify.kernel)",
            lambda r: _get(r.data, "verify", "kernel", "hidden_cosine"),
            _VERIFY,
        ),
        Metric(
            "verified_flops_saving",
            "saving of the largest plan prefix within the quality budget (verify)",
            lambda r: _get(r.data, "verify", "largest_plan_flops_saving"),
            _VERIFY,
        ),
        Metric(
            "retrieval_accuracy_plan",
            "passkey accuracy with the plan, where the dense model retrieves (verify.retrieval)",
            lambda r: _get(r.data, "verify", "retrieval", "plan_accuracy"),
            _RETRIEVAL,
        ),
        Metric(
            "retrieval_drop",
            "share of passkeys the dense model found and the plan lost (0 = none lost)",
            lambda r: _get(r.data, "verify", "retrieval", "drop"),
            _RETRIEVAL,
        ),
        Metric(
            "measured_attention_speedup",
            "dense attention time / the plan's, summed over layers (verify --measure-speed)",
            lambda r: _get(r.data, "verify", "speed", "attention_speedup"),
            "attention speed was not measured; add --verify --measure-speed",
        ),
        Metric(
            "config_heads_losing",
            "heads of the --check-config file losing more than eps of their mass in 10% of rows",
            lambda r: (float(len(r.data["check_config"].get("heads_losing") or []))
                       if isinstance(r.data.get("check_config"), Mapping) else None),
            _CONFIG,
        ),
        Metric(
            "config_ppl_increase",
            "perplexity increase with the --check-config patterns in the model (ratio - 1)",
            lambda r: _minus_one(_get(r.data, "check_config", "quality", "ppl_ratio")),
            _CONFIG,
        ),
        Metric(
            "config_hidden_cosine",
            "hidden-state cosine with the --check-config patterns (encoders)",
            lambda r: _get(r.data, "check_config", "quality", "hidden_cosine"),
            _CONFIG,
        ),
        Metric(
            "config_retrieval_drop",
            "share of passkeys the dense model found and the --check-config patterns lost",
            lambda r: _get(r.data, "check_config", "retrieval", "drop"),
            _CONFIG,
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
