"""The ``--fail-if`` expression language: syntax tree, parser and evaluation (stdlib only, no eval).

:class:`_Parser` turns the text of a check into a tree of :class:`Compare`, :class:`Not` and
:class:`BoolOp` nodes following the grammar in :mod:`attn_audit.gate`, raising
:class:`~attn_audit.errors.ConfigError` with the position of the first problem and the known
metrics.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, NoReturn

from attn_audit.errors import ConfigError
from attn_audit.gate.metric_table import METRICS


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
_BLANK = re.compile(r"\s*\Z")
#: Limits that keep parsing and evaluation linear in the text and the recursion shallow.
MAX_CHARS = 4096
MAX_DEPTH = 32  # nested parentheses and 'not'


def _known() -> str:
    return f"known metrics: {', '.join(METRICS)}"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []  # (kind, text, 1-based position)
        self.depth = 0
        if len(text) > MAX_CHARS:
            raise ConfigError(f"bad check of {len(text)} characters: at most {MAX_CHARS} are allowed")
        pos = 0
        while pos < len(text):
            if _BLANK.match(text, pos):
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
        kind, text, pos = self.peek()
        if (kind == "paren" and text == "(") or (kind == "name" and text.lower() == "not"):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                self.fail(pos, f"parentheses and 'not' nested deeper than {MAX_DEPTH} levels")
            try:
                return self._nested()
            finally:
                self.depth -= 1
        return self.compare()

    def _nested(self) -> Node:
        if self.keyword("not"):
            return Not(self.unary())
        self.i += 1  # "("
        node = self.or_()
        kind, text, pos = self.peek()
        if text != ")":
            self.fail(pos, f"expected ')', found {text!r}")
        self.i += 1
        return node

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


def _chain(node: BoolOp) -> list[Node]:
    """The operands of a left-deep chain ``a op b op c ...`` of one operator, in order (no recursion:
    the parser builds ``and`` / ``or`` chains of any length this way)."""
    items: list[Node] = []
    cur: Node = node
    while isinstance(cur, BoolOp) and cur.op == node.op:
        items.append(cur.right)
        cur = cur.left
    items.append(cur)
    return items[::-1]


def _metric_names(node: Node) -> list[str]:
    """The metrics ``node`` reads, each once, in reading order (linear in the tree's size)."""
    names: dict[str, None] = {}
    stack: list[Node] = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, Compare):
            names.setdefault(cur.metric)
        elif isinstance(cur, Not):
            stack.append(cur.operand)
        else:
            stack.extend(reversed(_chain(cur)))
    return list(names)


def _truth(node: Node, values: Mapping[str, float]) -> bool:
    if isinstance(node, Compare):
        return _OPS[node.op](values[node.metric], node.number)
    if isinstance(node, Not):
        return not _truth(node.operand, values)
    operands = _chain(node)  # recursion only through parentheses and 'not' (depth-limited)
    if node.op == "and":
        return all(_truth(x, values) for x in operands)
    return any(_truth(x, values) for x in operands)
