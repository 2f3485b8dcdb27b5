"""Checks: a named failure condition, its evaluation on metric values, its result (stdlib only)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from attn_audit.errors import ConfigError
from attn_audit.gate.expression import Node, _known, _metric_names, _Parser, _truth
from attn_audit.gate.metric_table import METRICS

Status = Literal["passed", "failed", "unevaluable"]


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check on one result."""

    name: str
    expression: str
    status: Status
    value: float | None  # the first metric's value
    values: dict[str, float | None]
    message: str
    description: str = ""

    def label(self) -> str:
        return (
            self.expression if self.name == self.expression else f"{self.name}: {self.expression}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "expression": self.expression,
            "description": self.description,
            "status": self.status,
            "value": self.value,
            "values": dict(self.values),
            "message": self.message,
        }


@dataclass(frozen=True)
class Check:
    """A parsed failure condition: the audit fails when ``node`` is true."""

    name: str
    expression: str
    node: Node
    description: str = ""

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(_metric_names(self.node))

    def evaluate(self, values: Mapping[str, float | None]) -> CheckResult:
        used = {m: values.get(m) for m in self.metrics}
        first = used[self.metrics[0]]
        missing = [m for m, v in used.items() if v is None]
        if missing:
            why = "; ".join(f"{m} not available, {METRICS[m].missing}" for m in missing)
            return CheckResult(
                self.name,
                self.expression,
                "unevaluable",
                first,
                used,
                f"unevaluable (counts as failed): {why}",
                self.description,
            )
        shown = (
            _fmt(first) if len(used) == 1 else ", ".join(f"{m}={_fmt(v)}" for m, v in used.items())
        )
        if _truth(self.node, used):  # type: ignore[arg-type]
            return CheckResult(
                self.name,
                self.expression,
                "failed",
                first,
                used,
                f"{self.expression} (value {shown})",
                self.description,
            )
        return CheckResult(
            self.name,
            self.expression,
            "passed",
            first,
            used,
            f"not {self.expression} (value {shown})",
            self.description,
        )


def parse(expr: str, name: str | None = None, description: str = "") -> Check:
    """Parse a failure condition; ConfigError with the position and the known metrics if bad."""
    if not isinstance(expr, str):
        raise ConfigError(f"a check must be a string, got {type(expr).__name__} ({_known()})")
    text = expr.strip()
    node = _Parser(text).parse()
    return Check(name=name or text, expression=text, node=node, description=description)

