"""The gate's decision: evaluate the checks on a result, pick the exit code, say the verdict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from attn_audit.errors import ExitCode
from attn_audit.gate.checks import Check, CheckResult, Status, _fmt
from attn_audit.gate.metric_table import metrics
from attn_audit.result import AuditResult


@dataclass(frozen=True)
class Outcome:
    """What the gate decided: per-check results and the exit code."""

    checks: tuple[CheckResult, ...]
    rows_measured: int
    exit_code: ExitCode
    values: dict[str, float | None]

    def _by(self, status: Status) -> list[CheckResult]:
        return [c for c in self.checks if c.status == status]

    def verdict_line(self) -> str:
        """One line for stderr, e.g. ``FAIL: 1 of 3 checks failed: saving < 0.3 (value 0.21)``."""
        if self.exit_code == ExitCode.NOTHING_MEASURED:
            return (
                "NO DATA: no query row was measured, so nothing was checked (exit 4, never a pass)"
            )
        total = len(self.checks)
        if not total:
            return "OK: audit complete; no checks configured"
        failed, unevaluable = self._by("failed"), self._by("unevaluable")
        if not failed and not unevaluable:
            return f"PASS: all {total} check{'s' if total > 1 else ''} passed"
        if failed and unevaluable:
            head = (
                f"{len(failed) + len(unevaluable)} of {total} checks did not pass "
                f"({len(failed)} failed, {len(unevaluable)} could not be evaluated)"
            )
        elif failed:
            head = f"{len(failed)} of {total} check{'s' if total > 1 else ''} failed"
        else:
            plural = "s" if total > 1 else ""
            head = f"{len(unevaluable)} of {total} check{plural} could not be evaluated"
        details = [f"{c.label()} (value {_detail(c)})" for c in failed]
        details += [
            f"{c.label()} ({c.message.replace(' (counts as failed)', '')})" for c in unevaluable
        ]
        return f"FAIL: {head}: " + "; ".join(details)

    def to_dict(self) -> dict[str, Any]:
        """The plain-JSON form stored in ``result.data["gate"]``."""
        return {
            "exit_code": int(self.exit_code),
            "passed": self.exit_code == ExitCode.OK,
            "verdict": self.verdict_line(),
            "rows_measured": self.rows_measured,
            "counts": {s: len(self._by(s)) for s in ("passed", "failed", "unevaluable")},
            "checks": [c.to_dict() for c in self.checks],
            "metrics": dict(self.values),
        }


def _detail(c: CheckResult) -> str:
    if len(c.values) == 1:
        return _fmt(c.value)
    return ", ".join(f"{m}={_fmt(v)}" for m, v in c.values.items())


def decide(result: AuditResult, checks: Sequence[Check]) -> Outcome:
    """Evaluate ``checks`` on ``result`` (pure). Exit 4 when no row was measured, whatever the
    checks say; else 1 if any check failed or was unevaluable; else 0."""
    values = metrics(result)
    results = tuple(c.evaluate(values) for c in checks)
    rows = result.rows_measured
    if rows == 0:
        code = ExitCode.NOTHING_MEASURED
    elif any(r.status != "passed" for r in results):
        code = ExitCode.CHECK_FAILED
    else:
        code = ExitCode.OK
    return Outcome(checks=results, rows_measured=rows, exit_code=code, values=values)
