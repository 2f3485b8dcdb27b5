"""The pre-deployment gate: ``--fail-if EXPR`` and ``--policy FILE`` checks (stdlib only, no eval).

A check is a **failure condition**: the audit fails when the expression is true. Grammar::

    expr  := or
    or    := and ("or" and)*
    and   := unary ("and" unary)*
    unary := "not" unary | "(" expr ")" | METRIC OP NUMBER
    OP    := "<" | "<=" | ">" | ">=" | "==" | "!="

``NUMBER`` is a decimal or scientific literal (``0.3``, ``-1``, ``5e-3``); ``==`` and ``!=`` compare
with a relative tolerance of 1e-9. Keywords are case-insensitive; ``METRIC`` is one of
:data:`METRICS` (``attn-audit --help`` lists them). A metric that is absent from the result (e.g.
``ppl_increase`` without ``--verify``) makes its check **unevaluable**, which counts as failed
with a message saying why, never as a pass.

Policy files are TOML::

    [[check]]
    name = "enough-saving"
    description = "the plan must save at least 30% of attention FLOPs"
    fail_if = "planned_flops_saving < 0.3"

Exit codes (:class:`~attn_audit.errors.ExitCode`): 0 all checks passed (or none given), 1 a check
failed or was unevaluable, 4 nothing was measured (no rows; regardless of the checks). Malformed
expressions or policies raise :class:`~attn_audit.errors.ConfigError` (exit 2).
"""

from __future__ import annotations

from attn_audit.gate.checks import Check, CheckResult, Status, parse
from attn_audit.gate.decision import Outcome, decide
from attn_audit.gate.expression import BoolOp, Compare, Node, Not
from attn_audit.gate.metric_table import METRICS, Metric, metrics
from attn_audit.gate.policy import collect_checks, load_policy

__all__ = [
    "METRICS",
    "BoolOp",
    "Check",
    "CheckResult",
    "Compare",
    "Metric",
    "Node",
    "Not",
    "Outcome",
    "Status",
    "collect_checks",
    "decide",
    "load_policy",
    "metrics",
    "parse",
]
