"""Markdown renderer: a GitHub-flavoured summary short enough for a pull-request comment.

Layout (guarded by the gold file ``tests/gold/report.md``): a title with the verdict, one table
with the four headline numbers, one line on the model and data, the plan's top 10 (or the
ranking's top 10 when no plan ran), the checks that did not pass, and a provenance footer.

Every string that comes from the model, tokenizer, config or data is written inside a code span
(so it cannot become a link, an image, HTML or emphasis) with ``|`` escaped for tables; the
report contains no links at all.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from attn_audit.report.formatting import (
    fmt_num,
    fmt_pct,
    head_label,
    head_letter,
    heads_shape,
    printable,
    short_reason,
    site_summary,
    sparsity_at,
)
from attn_audit.report.headlines import (
    failed_checks,
    gate_state,
    headline,
    left_out,
    theory_lines,
)
from attn_audit.report.predeploy import (
    CONFIG_HEADER,
    RETRIEVAL_HEADER,
    config_lines,
    config_rows,
    retrieval_lines,
    retrieval_rows,
    search_lines,
    speed_lines,
)

if TYPE_CHECKING:
    from attn_audit.result import AuditResult

__all__ = ["MarkdownRenderer", "md_code"]

DEFAULT_TOP = 10


def md_code(value: Any, cell: bool = False) -> str:
    """``value`` as an inline code span: shown verbatim, never a link, HTML or emphasis.

    The fence is one backtick longer than the longest run inside the value and newlines become
    spaces. With ``cell=True`` (inside a GFM table) ``|`` is backslash-escaped, because GFM splits
    cells before it parses code spans; elsewhere a backslash would show literally.
    """
    text = " ".join(str(value).split()) if value is not None else ""
    if not text:
        return "` `"
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    if cell:
        text = text.replace("|", "\\|")
    return f"{fence}{pad}{text}{pad}{fence}"


def _word(value: Any) -> str:
    """A short token (status, count) reduced to characters that Markdown never interprets."""
    return re.sub(r"[^\w.+-]", "", str(value)) or "?"


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A GFM table; ``align`` has one character per column: l, r or c."""
    marks = {"l": "---", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _title(result: AuditResult) -> str:
    name = md_code(result.model.get("name", "?"))
    state = gate_state(result)
    if state in ("PASS", "FAIL", "NO DATA"):
        return f"### attn-audit: **{state}** for {name}"
    return f"### attn-audit: no checks ran for {name}"


def _model_line(result: AuditResult) -> str:
    model, run = result.model, result.run
    dataset = run.get("dataset") or {}
    lens = ", ".join(str(n) for n in run.get("seq_lens") or [run.get("seq_len")])
    shape = (heads_shape(model) if model.get("layer_heads")
             else f"{model.get('num_heads', '?')} query heads ({model.get('num_kv_heads', '?')} KV heads)")
    return (
        f"{md_code(model.get('family', '?'))}, {model.get('num_layers', '?')} layers x "
        f"{shape}, "
        f"{md_code(model.get('dtype', '?'))}; data {md_code(dataset.get('spec', '?'))}: "
        f"{run.get('num_sequences', '?')} sequences x {lens} tokens; "
        f"eps {', '.join(run.get('eps_keys') or [])}."
        + (f" {site_summary(model)}; decoder input teacher-forced (`run.inputs`)." if site_summary(model) else "")
    )


def _kernel_lines(result: AuditResult, top: int) -> list[str]:
    """The kernel plan table (pattern, budget, kernel vs oracle saving); none without patterns."""
    from attn_audit.report.kernel import KERNEL_HEADER, kernel_rows

    got = kernel_rows(result, top)
    if got is None:
        return []
    title, rows = got
    rows = [[*r[:3], md_code(r[3], cell=True), md_code(r[4], cell=True), r[5], r[6],
             md_code(short_reason(r[7]), cell=True)] for r in rows]
    return [f"#### {title}", "", *_table(KERNEL_HEADER, rows, "rlrllrrl"), ""]


def _plan_rows(result: AuditResult, top: int) -> tuple[str, list[str]]:
    plan = result.data.get("plan") or []
    kernel = _kernel_lines(result, top)
    if kernel:
        return kernel[0], kernel[2:]
    if plan:
        title = f"#### Sparse-attention plan: top {min(top, len(plan))} of {len(plan)} heads"
        rows = [
            [
                str(i),
                head_label(e),
                _word(e.get("kv_head", "")),
                md_code(e.get("pattern", ""), cell=True),
                _word(e.get("k", "")),
                fmt_pct(e.get("kfrac")),
                fmt_pct(e.get("flops_saving")),
                md_code(short_reason(e.get("reason")), cell=True),
            ]
            for i, e in enumerate(plan[:top], start=1)
        ]
        header = ["#", "head", "kv", "pattern", "k", "k/n", "FLOPs saved", "reason"]
        return title, _table(header, rows, "rlrlrrrl")
    eps = result.primary_eps_key
    by_id = {(h["layer"], h["head"]): h for h in result.heads}
    ranking = result.ranking
    title = (
        f"#### Heads to make sparse first: top {min(top, len(ranking))} of {len(ranking)} "
        f"(no plan ran)"
    )
    rows = []
    for e in ranking[:top]:
        rec = by_id.get((e["layer"], e["head"]), {})
        block = sparsity_at(rec, eps)
        rows.append(
            [
                _word(e.get("rank", "")),
                head_label(e),
                _word(e.get("kv_head", "")),
                fmt_pct(block.get("kfrac_mean")),
                fmt_num(block.get("k_mean")),
                head_letter(rec) if rec else "-",
                fmt_num(e.get("score")),
                md_code(short_reason(e.get("reason")), cell=True),
            ]
        )
    header = ["rank", "head", "kv", f"k/n at eps={eps}", "k", "Gauss.", "score", "reason"]
    return title, _table(header, rows, "rlrrrcrl")


def _checks(result: AuditResult) -> list[str]:
    gate = result.data.get("gate")
    state = gate_state(result)
    if state == "NO DATA":
        return ["#### Checks", "", "Nothing was checked: no query row was measured."]
    if not isinstance(gate, dict) or state == "no checks":
        return ["#### Checks", "", "No checks ran (no `--fail-if` or policy given)."]
    bad = failed_checks(result)
    total = len(gate.get("checks") or [])
    if not bad:
        return ["#### Checks", "", f"All {total} checks passed."]
    rows = [
        [
            _word(c.get("status", "?")),
            md_code(c.get("name", ""), cell=True),
            md_code(c.get("expression", ""), cell=True),
            fmt_num(c.get("value")),
            md_code(c.get("message", ""), cell=True),
        ]
        for c in bad
    ]
    return [
        f"#### Checks that did not pass ({len(bad)} of {total})",
        "",
        *_table(["status", "check", "expression", "value", "message"], rows, "lllrl"),
    ]


def _footer(result: AuditResult) -> str:
    run, model = result.run, result.model
    dataset = run.get("dataset") or {}
    versions = run.get("versions") or {}
    version_text = ", ".join(md_code(f"{k} {v}") for k, v in versions.items()) or "n/a"
    rows = run.get("rows", "?")
    if rows == "sampled":
        rows = f"sampled, {run.get('rows_per_sequence', '?')} per sequence"
    token_hash = str(dataset.get("token_hash") or "n/a")[:16]
    missing = ", ".join(left_out(result)) or "nothing"
    return (
        f"<sub>Provenance: model {md_code(model.get('name', '?'))} revision "
        f"{md_code(model.get('revision') or 'n/a')}; data {md_code(dataset.get('spec', '?'))}, "
        f"{dataset.get('tokens', '?')} tokens, sha256 {md_code(token_hash)}; sites "
        f"{md_code(', '.join(map(str, run.get('sites') or [])))} "
        f"({md_code(run.get('capture_point', '?'))}); rows {rows}; seed {run.get('seed', '?')}; "
        f"created {md_code(run.get('created', '?'))}; versions: {version_text}; "
        f"left out: {missing}.</sub>"
    )


class MarkdownRenderer:
    """A pull-request-sized Markdown summary."""

    name = "md"
    file_extension = "md"

    def render(self, result: AuditResult, **options: Any) -> str:
        """Render the summary. Option: ``top`` (rows in the plan or ranking table, default 10)."""
        top = int(options.get("top") or DEFAULT_TOP)
        result = printable(result)  # control characters from a loaded file shown as escapes
        head = headline(result)
        lines = [
            _title(result),
            "",
            *_table(
                ["gate", "planned FLOPs saving", "quality cost", "Gaussian-looking heads"],
                [[head["gate"], head["flops"], head["quality"], head["gaussian"]]],
                "llll",
            ),
            "",
            _model_line(result),
            "",
        ]
        title, table = _plan_rows(result, top)
        lines += [title, "", *table, ""]
        lines += [*_checks(result), ""]
        search = search_lines(result)
        if search:
            lines += ["#### Largest plan within budget", "", *[f"- {md_code(t)}" for t in search], ""]
        speed = speed_lines(result)
        if speed:
            lines += ["#### Measured attention speed", "", *[f"- {md_code(t)}" for t in speed], ""]
        retrieval = retrieval_lines(result)
        if retrieval:
            lines += ["#### Long-context retrieval (passkey)", "", *[f"- {md_code(t)}" for t in retrieval], ""]
            rows = retrieval_rows(result)
            if rows:
                lines += [*_table(RETRIEVAL_HEADER, rows, "rrrrrl"), ""]
        checked = config_lines(result)
        if checked:
            lines += ["#### Third-party config check", "", *[f"- {md_code(t)}" for t in checked], ""]
            rows = [[md_code(c, cell=True) for c in row] for row in config_rows(result, 10)]
            if rows:
                lines += [*_table(CONFIG_HEADER, rows, "llrr"), ""]
        theory = theory_lines(result)
        if theory:
            lines += ["#### Theory check", "", *[f"- {t}" for t in theory], ""]
        lines += [_footer(result)]
        return "\n".join(lines) + "\n"
