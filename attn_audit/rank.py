"""Rank heads for sparse attention and build a per-head top-k plan (stdlib only).

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

**Score** (higher = make sparse first)::

    score = w_saving·saving + w_sparsity·(1 − kfrac) + w_stability·stability − Σ_flags penalty(flag)

``saving`` is the head's FLOP saving at ``N`` with budget k, ``kfrac`` its measured
``kfrac_mean`` at the audited length, ``stability = max(0, 1 − relative CI width)`` (0 when
no CI). Defaults (:class:`RankWeights`): 0.6, 0.2, 0.2; penalties non-gaussian 0.05,
sink-saturated 0.05, retrieval-like 0.15, unstable 0.10, unstable-across-lengths 0.15. Ties
break by (layer, head); heads with no measured row rank last with score 0. The plan keeps the
heads whose ``k ≤ max_kfrac·N``.

**KV-head groups and layers** are scored as one head whose k is the **max over its query heads**,
kfrac the max, stability the worst and flags the union (the ``rule`` field says so): KV-cache
methods act per KV head, so the group must keep what its most demanding query head needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from attn_audit.errors import ConfigError
from attn_audit.result import AuditResult

RISK_FLAGS = (
    "non-gaussian",
    "sink-saturated",
    "retrieval-like",
    "unstable",
    "unstable-across-lengths",
)
SKIPPED_VERDICTS = frozenset({"skipped", "not-assessed", "insufficient-data", "not-tested", "n/a", "unknown"})
FORMULA = (
    "score = w_saving*saving + w_sparsity*(1 - kfrac) + w_stability*stability "
    "- sum(penalty[flag]); "
    "saving = 1 - sum_i min(k, n_i) / sum_i n_i at target_len (QK^T + PV, 4*d FLOPs per pair); "
    "k = min(N, max(1, ceil(k_p90 scaled to N) + sinks)); stability = max(0, 1 - CI width / kfrac)"
)
GROUP_RULE = (
    "k = max over the group's query heads; kfrac = max; stability = worst; flags = union; "
    "scored like one head"
)


@dataclass(frozen=True)
class RankWeights:
    """Weights of the score terms and the penalty subtracted per risk flag (all ≥ 0)."""

    saving: float = 0.6
    sparsity: float = 0.2
    stability: float = 0.2
    non_gaussian: float = 0.05
    sink_saturated: float = 0.05
    retrieval_like: float = 0.15
    unstable: float = 0.10
    unstable_across_lengths: float = 0.15

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(
                    f"rank weight {f.name} must be a finite number >= 0, got {value!r}"
                )

    def penalty(self, flag: str) -> float:
        """The penalty for ``flag`` (a kebab-case risk flag); 0 for flags not penalised."""
        return float(getattr(self, flag.replace("-", "_"), 0.0)) if flag in RISK_FLAGS else 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> RankWeights:
        """Build from a dict (e.g. a TOML table); ``-`` and ``_`` are interchangeable in keys."""
        known = {f.name for f in fields(cls)}
        values: dict[str, float] = {}
        for key, value in mapping.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigError(
                    f"unknown rank weight {key!r} (known: {', '.join(sorted(known))})"
                )
            values[name] = value
        return cls(**values)


@dataclass(frozen=True)
class PlanConfig:
    """What to plan for and the thresholds of the risk flags."""

    target_len: int | None = None  # default: the audited run.seq_len
    eps_key: str | None = None  # default: result.primary_eps_key
    weights: RankWeights = field(default_factory=RankWeights)
    max_kfrac: float = 0.5  # heads needing more than this share of keys stay dense
    retrieval_mass: float = 0.5  # bulk_mass_mean above this → retrieval-like
    unstable_ci: float = 0.5  # relative CI width of kfrac_mean above this → unstable
    length_tolerance: float = 0.5  # deviation factor 1 + this from n^C → unstable-across-lengths

    def __post_init__(self) -> None:
        if self.target_len is not None and (
            not isinstance(self.target_len, int) or self.target_len < 1
        ):
            raise ConfigError(f"--target-len must be a positive integer, got {self.target_len!r}")
        if not 0 < self.max_kfrac <= 1:
            raise ConfigError(f"max_kfrac must lie in (0, 1], got {self.max_kfrac!r}")
        for name in ("retrieval_mass", "unstable_ci", "length_tolerance"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")

    def thresholds(self) -> dict[str, float]:
        return {
            "max_kfrac": self.max_kfrac,
            "retrieval_mass": self.retrieval_mass,
            "unstable_ci": self.unstable_ci,
            "length_tolerance": self.length_tolerance,
        }


# -- FLOPs -------------------------------------------------------------------------------------
def kept_pairs(n: int, k: int, causal: bool) -> int:
    """(query, key) pairs a top-k head computes over one sequence: Σ_i min(k, n_i)."""
    if n <= 0 or k <= 0:
        return 0
    if not causal:
        return n * min(k, n)
    if k >= n:
        return n * (n + 1) // 2
    return k * (k + 1) // 2 + (n - k) * k


def attention_flops(n: int, head_dim: int, causal: bool) -> int:
    """Dense QKᵀ + PV FLOPs of one head for one sequence: 4·d·n² (causal 4·d·n(n+1)/2)."""
    return 4 * head_dim * kept_pairs(n, n, causal)


def sparse_flops(n: int, k: int, head_dim: int, causal: bool) -> int:
    """QKᵀ + PV FLOPs of a top-k head: 4·d·Σ_i min(k, n_i) (top-k selection not counted)."""
    return 4 * head_dim * kept_pairs(n, k, causal)


def flops_saving(n: int, k: int, causal: bool) -> float:
    """Fraction of a head's attention FLOPs saved by keeping ``k`` keys per row (0 when k ≥ n)."""
    dense = kept_pairs(n, n, causal)
    return 0.0 if dense == 0 else 1.0 - kept_pairs(n, k, causal) / dense


# -- per-head facts shared with the gate and the exports ------------------------------------
def is_non_gaussian(head: Mapping[str, Any]) -> bool | None:
    """Tell whether the head's Q/K failed a Gaussianity test.

    True if some tested site has ``is_gaussian`` False or a verdict other than ``gaussian-like``;
    False if every site was tested and is Gaussian-like; None if there is no site or some site was
    skipped (``verdict`` "skipped", even with ``is_gaussian`` False): a skipped test is evidence
    neither way, so it neither raises the flag nor counts as Gaussian.
    """
    sites = [s for s in (head.get("gaussianity") or {}).values() if isinstance(s, Mapping)]
    undecided = not sites
    for site in sites:
        flag, verdict = site.get("is_gaussian"), site.get("verdict")
        if (
            verdict is None
            and flag is None
            or (
                isinstance(verdict, str)
                and (verdict in SKIPPED_VERDICTS or verdict.startswith("skip"))
            )
        ):
            undecided = True
        elif flag is False or (verdict is not None and verdict != "gaussian-like"):
            return True
    return None if undecided else False


def distant_mass(head: Mapping[str, Any]) -> float | None:
    """Mean mass outside sinks and the local window (bulk, else 1 − sink − local), in [0, 1]."""
    bulk = _num(head.get("bulk_mass_mean"))
    if bulk is None:
        sink, local = _num(head.get("sink_mass_mean")), _num(head.get("local_mass_mean"))
        if sink is None or local is None:
            return None
        bulk = 1.0 - sink - local
    return min(1.0, max(0.0, bulk))


def is_sink_saturated(head: Mapping[str, Any], eps: float) -> bool:
    sink = _num(head.get("sink_mass_mean"))
    return sink is not None and sink > 1.0 - eps


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# -- evaluation ----------------------------------------------------------------------------
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
    saving: float = 0.0
    stability: float = 0.0
    ci_half: float | None = None
    flags: list[str] = field(default_factory=list)
    score: float = 0.0


@dataclass(frozen=True)
class _Ctx:
    n: int
    target: int
    eps_key: str
    eps: float
    sinks: int
    causal: bool
    head_dim: int
    config: PlanConfig


def _context(result: AuditResult, config: PlanConfig) -> _Ctx:
    run, model = result.run, result.model
    keys = [str(k) for k in run.get("eps_keys") or []]
    if not keys:
        raise ConfigError("the audit has no eps keys; nothing to rank")
    eps_key = result.primary_eps_key if config.eps_key is None else str(config.eps_key)
    if eps_key not in keys:
        match = [k for k in keys if _same_float(k, eps_key)]
        if not match:
            raise ConfigError(f"eps {eps_key} was not audited (audited: {', '.join(keys)})")
        eps_key = match[0]
    n = int(run["seq_len"])
    return _Ctx(
        n=n,
        target=int(config.target_len or n),
        eps_key=eps_key,
        eps=float(eps_key),
        sinks=max(0, int(run.get("sinks") or 0)),
        causal=bool(model.get("causal", True)),
        head_dim=int(model.get("head_dim") or 0),
        config=config,
    )


def _same_float(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b))
    except ValueError:
        return False


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


def _evaluate(head: Mapping[str, Any], ctx: _Ctx) -> _Eval:
    ev = _Eval(int(head["layer"]), int(head["head"]), int(head.get("kv_head", 0)), measured=False)
    block = (head.get("sparsity") or {}).get(ctx.eps_key)
    if not isinstance(block, Mapping) or not int(block.get("rows") or 0):
        ev.flags = ["unmeasured"]
        return ev
    ev.measured = True
    ev.k, ev.k_audit, ev.basis = _budget(head, ctx)
    ev.saving = flops_saving(ctx.target, ev.k, ctx.causal)
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
    return ev.measured and ev.k <= ctx.config.max_kfrac * ctx.target


def _reason(ev: _Eval, ctx: _Ctx) -> str:
    if not ev.measured:
        return f"no row measured at eps={ctx.eps_key}; not planned"
    parts = [
        f"keeps {ev.k} of {ctx.target} keys ({ev.k / ctx.target:.0%}) for eps={ctx.eps_key} in 90% "
        f"of rows ({ev.basis}, {ctx.sinks} sink(s) added)",
        f"saves {ev.saving:.0%} of its attention FLOPs at {ctx.target}",
    ]
    if ev.ci_half is None:
        parts.append("stability unknown (no CI)")
    else:
        word = "unstable" if "unstable" in ev.flags else "stable"
        parts.append(f"{word} (CI ±{ev.ci_half:.1%})")
    parts.append(f"flags: {', '.join(ev.flags) or 'none'}")
    if not _planned(ev, ctx):
        parts.append(
            f"not planned: needs {ev.k / ctx.target:.1%} of keys "
            f"> max_kfrac {ctx.config.max_kfrac:.0%}"
        )
    return "; ".join(parts)


def _aggregate(members: list[_Eval], ctx: _Ctx, layer: int, kv_head: int | None) -> _Eval:
    measured = [m for m in members if m.measured]
    agg = _Eval(layer, None, kv_head, measured=bool(measured))
    if not measured:
        agg.flags = ["unmeasured"]
        return agg
    agg.k = max(m.k for m in measured)
    agg.kfrac_measured = max(m.kfrac_measured for m in measured)
    agg.stability = min(m.stability for m in measured)
    agg.saving = flops_saving(ctx.target, agg.k, ctx.causal)
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
            mean_head_saving=sum(m.saving for m in members) / len(members),
            score=agg.score,
            rank=rank,
            flags=agg.flags,
            rule=GROUP_RULE,
        )
        rows.append(row)
    return rows


# -- public steps --------------------------------------------------------------------------
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
                "flops_saving": ev.saving,
                "planned": _planned(ev, ctx),
                "flags": list(ev.flags),
                "reason": _reason(ev, ctx),
            }
        )
    result.data["ranking"] = ranking
    result.data["ranking_layers"] = _group_rows(evals, ctx, by_kv=False)
    result.data["ranking_kv_groups"] = _group_rows(evals, ctx, by_kv=True)


def build_plan(result: AuditResult, config: PlanConfig | None = None) -> None:
    """Fill ``result.data["plan"]`` (best first) and ``result.data["plan_summary"]``."""
    config = config or PlanConfig()
    ctx, evals = _evaluate_all(result, config)
    model = result.model
    total = max(
        len(result.heads), int(model.get("num_layers") or 0) * int(model.get("num_heads") or 0)
    )
    plan, excluded = [], []
    for ev in evals:
        if not _planned(ev, ctx):
            why = (
                "not measured"
                if not ev.measured
                else (
                    f"needs {ev.k} of {ctx.target} keys ({ev.k / ctx.target:.1%}) "
                    f"> max_kfrac {config.max_kfrac:g}"
                )
            )
            excluded.append(
                {"layer": ev.layer, "head": ev.head, "k": ev.k if ev.measured else None, "why": why}
            )
            continue
        plan.append(
            {
                "layer": ev.layer,
                "head": ev.head,
                "kv_head": ev.kv_head,
                "k": ev.k,
                "pattern": "top-k",
                "kfrac": ev.k / ctx.target,
                "flops_saving": ev.saving,
                "flops_saving_model": ev.saving / total if total else 0.0,
                "score": ev.score,
                "flags": list(ev.flags),
                "reason": _reason(ev, ctx),
            }
        )
    saving = sum(ev.saving for ev in evals if _planned(ev, ctx)) / total if total else 0.0
    dense = total * attention_flops(ctx.target, ctx.head_dim, ctx.causal)
    result.data["plan"] = plan
    result.data["plan_summary"] = {
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
        "weights": config.weights.to_dict(),
        "thresholds": config.thresholds(),
    }


def rank_and_plan(result: AuditResult, config: PlanConfig | None = None) -> None:
    """Run :func:`rank_heads` then :func:`build_plan` with the same configuration."""
    rank_heads(result, config)
    build_plan(result, config)


def ensure_plan(result: AuditResult, config: PlanConfig | None = None) -> None:
    """Rank and plan with ``config`` (default settings) unless the result already has a plan."""
    if "plan" not in result.data or "plan_summary" not in result.data:
        rank_and_plan(result, config)
