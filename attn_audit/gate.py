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

import difflib
import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from attn_audit.errors import ConfigError, ExitCode
from attn_audit.rank import is_non_gaussian, is_sink_saturated
from attn_audit.result import AuditResult

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised only on Python 3.10
    tomllib = None  # type: ignore[assignment]

Status = Literal["passed", "failed", "unevaluable"]


# -- metrics -------------------------------------------------------------------------------
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


# -- expressions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Compare:
    metric: str
    op: str
    number: float


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class BoolOp:
    op: Literal["and", "or"]
    left: Node
    right: Node


Node = Compare | Not | BoolOp
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12),
    "!=": lambda a, b: not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12),
}
_TOKEN = re.compile(
    r"\s*(?:(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![\w.]))|(?P<op><=|>=|==|!=|<|>)"
    r"|(?P<name>[A-Za-z_]\w*)|(?P<paren>[()]))"
)
_BAD_NUMBER = re.compile(r"[-+]?[\d.][\w.+-]*")


def _known() -> str:
    return f"known metrics: {', '.join(METRICS)}"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []  # (kind, text, 1-based position)
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                # Report a lexical error only when the parser reaches it, so the first problem in
                # reading order is the one named.
                col = pos + len(text[pos:]) - len(text[pos:].lstrip())
                bad = _BAD_NUMBER.match(text, col)
                what = (
                    f"malformed number {bad.group()!r}"
                    if bad
                    else f"unexpected character {text[col]!r}"
                )
                self.tokens.append(("error", what, col + 1))
                break
            kind = m.lastgroup or ""
            self.tokens.append((kind, m.group(kind), m.start(kind) + 1))
            pos = m.end()
        self.i = 0

    def fail(self, pos: int, message: str, hint: str = "") -> NoReturn:
        raise ConfigError(
            f"bad check {self.text!r} at position {pos}: {message}{hint} ({_known()})"
        )

    def peek(self) -> tuple[str, str, int]:
        if self.i >= len(self.tokens):
            return ("end", "end of input", len(self.text) + 1)
        kind, text, pos = self.tokens[self.i]
        if kind == "error":
            self.fail(pos, text)
        return kind, text, pos

    def keyword(self, word: str) -> bool:
        kind, text, _ = self.peek()
        if kind == "name" and text.lower() == word:
            self.i += 1
            return True
        return False

    def parse(self) -> Node:
        if not self.tokens:
            self.fail(1, "empty expression")
        node = self.or_()
        kind, text, pos = self.peek()
        if kind != "end":
            self.fail(pos, f"expected 'and', 'or' or the end, found {text!r}")
        return node

    def or_(self) -> Node:
        node = self.and_()
        while self.keyword("or"):
            node = BoolOp("or", node, self.and_())
        return node

    def and_(self) -> Node:
        node = self.unary()
        while self.keyword("and"):
            node = BoolOp("and", node, self.unary())
        return node

    def unary(self) -> Node:
        if self.keyword("not"):
            return Not(self.unary())
        kind, text, pos = self.peek()
        if kind == "paren" and text == "(":
            self.i += 1
            node = self.or_()
            kind, text, pos = self.peek()
            if text != ")":
                self.fail(pos, f"expected ')', found {text!r}")
            self.i += 1
            return node
        return self.compare()

    def compare(self) -> Compare:
        kind, name, pos = self.peek()
        if kind != "name" or name.lower() in ("and", "or", "not"):
            self.fail(pos, f"expected a metric name, found {name!r}")
        if name not in METRICS:
            close = difflib.get_close_matches(name.lower(), METRICS, n=1)
            self.fail(
                pos, f"unknown metric {name!r}", f"; did you mean {close[0]!r}?" if close else ""
            )
        self.i += 1
        kind, op, pos = self.peek()
        if kind != "op":
            self.fail(pos, f"expected one of {' '.join(_OPS)} after {name!r}, found {op!r}")
        self.i += 1
        kind, num, pos = self.peek()
        if kind != "num":
            self.fail(pos, f"expected a number after {op!r}, found {num!r}")
        self.i += 1
        return Compare(name, op, float(num))


def _metric_names(node: Node) -> list[str]:
    if isinstance(node, Compare):
        return [node.metric]
    if isinstance(node, Not):
        return _metric_names(node.operand)
    return _metric_names(node.left) + [
        m for m in _metric_names(node.right) if m not in _metric_names(node.left)
    ]


def _truth(node: Node, values: Mapping[str, float]) -> bool:
    if isinstance(node, Compare):
        return _OPS[node.op](values[node.metric], node.number)
    if isinstance(node, Not):
        return not _truth(node.operand, values)
    if node.op == "and":
        return _truth(node.left, values) and _truth(node.right, values)
    return _truth(node.left, values) or _truth(node.right, values)


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


# -- policies ------------------------------------------------------------------------------
_CHECK_KEYS = {"name", "fail_if", "description"}
_TOP_KEYS = {"check", "name", "description"}


def load_policy(path: str | Path) -> list[Check]:
    """Read ``[[check]]`` tables (``name``, ``fail_if``, ``description``) from a TOML file."""
    p = Path(path)
    if tomllib is None:  # pragma: no cover
        raise ConfigError(f"policy {p}: reading TOML policies needs Python 3.11 or newer")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"policy file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {p}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"policy file {p} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"policy file {p} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"policy {p}: unknown top-level key(s) {', '.join(unknown)} (expected [[check]] tables)"
        )
    tables = data.get("check")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"policy {p} defines no [[check]] tables")
    checks: list[Check] = []
    for i, table in enumerate(tables, start=1):
        where = f"policy {p}, check {i}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: each check must be a [[check]] table")
        extra = sorted(set(table) - _CHECK_KEYS)
        if extra:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(extra)} (allowed: name, fail_if, description)"
            )
        name, expr, desc = table.get("name"), table.get("fail_if"), table.get("description", "")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: 'name' must be a non-empty string")
        if not isinstance(expr, str) or not expr.strip():
            raise ConfigError(f"{where} ({name}): 'fail_if' must be a non-empty string")
        if not isinstance(desc, str):
            raise ConfigError(f"{where} ({name}): 'description' must be a string")
        if any(c.name == name for c in checks):
            raise ConfigError(f"{where}: duplicate check name {name!r}")
        try:
            checks.append(parse(expr, name=name.strip(), description=desc))
        except ConfigError as exc:
            raise ConfigError(f"{where} ({name}): {exc}") from None
    return checks


def collect_checks(fail_if: Sequence[str] = (), policy: str | Path | None = None) -> list[Check]:
    """The checks of ``--fail-if`` (in order) followed by those of ``--policy``."""
    checks = [parse(expr) for expr in fail_if]
    if policy is not None:
        checks.extend(load_policy(policy))
    return checks


# -- decision ------------------------------------------------------------------------------
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
