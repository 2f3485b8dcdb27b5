"""What a ranking run is configured with: score weights, plan thresholds and the resolved context.

:class:`RankWeights` and :class:`PlanConfig` are the user's settings (validated on construction,
raising :class:`~attn_audit.errors.ConfigError`); :func:`_context` resolves them against one
:class:`~attn_audit.result.AuditResult` (eps key, audited and target lengths, sinks, causality, head
dimension) into the :class:`_Ctx` every later step reads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from attn_audit.errors import ConfigError
from attn_audit.result import AuditResult

RISK_FLAGS = (
    "non-gaussian",
    "sink-saturated",
    "retrieval-like",
    "unstable",
    "unstable-across-lengths",
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
