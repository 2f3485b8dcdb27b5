"""Terminal renderer: the end-of-run summary printed on stdout.

Rendered with rich into an in-memory :class:`rich.console.Console` of a fixed width, so the text
is the same on a TTY, in a pipe and in tests; colour is an option (``color=True``), never needed
to read the report. Everything fits in 80 columns: the ranked table (top N), a compact layer x head
map of k_eps/n (a two-digit percentage per head, or one digit per head on narrow screens) and,
when Gaussianity was tested, a one-letter-per-head map of verdicts. The one-line verdict is
separate (:func:`verdict_line`), because the CLI prints it on stderr.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from io import StringIO
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text

from attn_audit.report.formatting import (
    LETTER_NAMES,
    fmt_num,
    fmt_pct,
    head_label,
    head_letter,
    heads_shape,
    num,
    printable,
    short_reason,
    site_summary,
    sparsity_at,
)
from attn_audit.report.headlines import (
    failed_checks,
    headline,
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

__all__ = ["TerminalRenderer", "render_to_console"]

DEFAULT_TOP = 15
# Trailing blanks of a line, also when colour codes follow them.
_TRAILING = re.compile(r"\s+((?:\x1b\[[0-9;]*m)*)$")
_LETTER_STYLES = {
    "G": "green",
    "S": "yellow",
    "H": "red",
    "O": "magenta",
    "L": "blue",
    "?": "cyan",
    "-": "dim",
}


def _kfrac_style(frac: float) -> str:
    """Green when few keys are needed (sparse), red when most are."""
    if frac < 0.1:
        return "green"
    if frac < 0.3:
        return "yellow"
    return "red"


def _cells(*values: Any) -> list[Text]:
    """Table cells as Text, so that strings from the model or data are never read as markup."""
    return [Text("" if v is None else str(v)) for v in values]


def _header(result: AuditResult) -> Text:
    model, run = result.model, result.run
    dataset = run.get("dataset") or {}
    text = Text()
    text.append("attn-audit ", style="bold")
    text.append(str(model.get("name", "?")), style="bold cyan")
    text.append(
        f"  ({model.get('family', '?')}, {model.get('num_layers', '?')} layers x "
        f"{heads_shape(model, 'heads')})\n"
    )
    lens = ",".join(str(n) for n in run.get("seq_lens") or [run.get("seq_len")])
    if site_summary(model):
        text.append(f"{site_summary(model)}; decoder input teacher-forced\n")
    text.append(
        f"data {dataset.get('spec', '?')}: {run.get('num_sequences', '?')} x {lens} tokens; "
        f"eps {', '.join(run.get('eps_keys') or [])}; rows {run.get('rows', '?')}\n"
    )
    head = headline(result)
    for label, key in (
        ("gate", "gate"),
        ("planned FLOPs saving", "flops"),
        ("quality cost", "quality"),
        ("Gaussian-looking heads", "gaussian"),
    ):
        text.append(f"{label}: ", style="bold")
        style = ""
        if key == "gate":
            style = (
                "green" if head[key].startswith("PASS") else "red" if "FAIL" in head[key] else ""
            )
        text.append(head[key] + "\n", style=style)
    text.rstrip()
    return text


def _new_table(title: str, columns: list[tuple[str, JustifyMethod]]) -> Table:
    """A borderless table; only the last column (the reason, cut to 60 characters) wraps."""
    table = Table(
        title=Text(title),
        title_justify="left",
        expand=False,
        pad_edge=False,
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        show_edge=False,
    )
    for col, just in columns:
        table.add_column(col, justify=just, overflow="fold", no_wrap=col != columns[-1][0])
    return table


def _ranked_table(result: AuditResult, top: int) -> Table:
    eps = result.primary_eps_key
    plan = result.data.get("plan") or []
    kernel = _kernel_table(result, top)
    if kernel is not None:
        return kernel
    if plan:
        table = _new_table(
            f"Sparse-attention plan (top {min(top, len(plan))} of {len(plan)})",
            [
                ("#", "right"),
                ("head", "left"),
                ("kv", "right"),
                ("pattern", "left"),
                ("k", "right"),
                ("k/n", "right"),
                ("saved", "right"),
                ("reason", "left"),
            ],
        )
        for i, entry in enumerate(plan[:top], start=1):
            table.add_row(
                *_cells(
                    str(i),
                    head_label(entry),
                    entry.get("kv_head", ""),
                    entry.get("pattern", ""),
                    entry.get("k", ""),
                    fmt_pct(entry.get("kfrac")),
                    fmt_pct(entry.get("flops_saving"), 0),
                    short_reason(entry.get("reason"), 60),
                )
            )
        return table
    ranking = result.ranking
    table = _new_table(
        f"Heads ranked for sparse attention (top {min(top, len(ranking))} of {len(ranking)}; "
        f"k at eps={eps})",
        [
            ("#", "right"),
            ("head", "left"),
            ("kv", "right"),
            ("k/n", "right"),
            ("k", "right"),
            ("R", "right"),
            ("G", "center"),
            ("score", "right"),
            ("reason", "left"),
        ],
    )
    by_id = {(h["layer"], h["head"]): h for h in result.heads}
    for entry in ranking[:top]:
        rec = by_id.get((entry["layer"], entry["head"]), {})
        block = sparsity_at(rec, eps)
        flags = rec.get("flags") or []
        reason = short_reason(entry.get("reason"), 60) + (
            f" [{', '.join(map(str, flags))}]" if flags else ""
        )
        table.add_row(
            *_cells(
                entry.get("rank", ""),
                head_label(entry),
                entry.get("kv_head", ""),
                fmt_pct(block.get("kfrac_mean")),
                fmt_num(block.get("k_mean"), 3),
                fmt_num((rec.get("R") or {}).get("logit_range"), 3),
                head_letter(rec) if rec else "-",
                fmt_num(entry.get("score"), 3),
                reason,
            )
        )
    return table


def _kernel_table(result: AuditResult, top: int) -> Table | None:
    """The kernel plan's top heads: pattern, budget, kernel and oracle savings (no reason: the
    budget says what the head runs; the reports carry the reasons)."""
    from attn_audit.report.kernel import KERNEL_HEADER, kernel_rows

    got = kernel_rows(result, top)
    if got is None:
        return None
    title, rows = got
    just: list[JustifyMethod] = ["right", "left", "right", "left", "left", "right", "right"]
    table = _new_table(title, list(zip(KERNEL_HEADER[:-1], just)))
    for row in rows:
        table.add_row(*_cells(*row[:-1]))
    return table


def _kfrac_cell(rec: dict[str, Any] | None, eps: str, wide: bool) -> tuple[str, str]:
    """(cell text, style) for one head in the k_eps/n map."""
    frac = num(sparsity_at(rec, eps).get("kfrac_mean")) if rec else None
    if frac is None:
        return (".." if wide else "."), "dim"
    if wide:
        pct = round(100 * frac)
        text = "##" if pct >= 100 else f"{pct:02d}"
    else:
        decile = int(10 * frac)
        text = "#" if decile >= 10 else str(decile)
    return text, _kfrac_style(frac)


def _maps(result: AuditResult, width: int) -> RenderableType:
    """The k_eps/n map and, when tested, the verdict map side by side (or stacked)."""
    model = result.model
    layers = int(model.get("num_layers") or 1 + max((h["layer"] for h in result.heads), default=0))
    heads = int(model.get("num_heads") or 1 + max((h["head"] for h in result.heads), default=0))
    eps = result.primary_eps_key
    by_id = {(h["layer"], h["head"]): h for h in result.heads}
    show_verdicts = any(head_letter(h) != "-" for h in result.heads)
    label_w = len(f"L{layers - 1}") + 1
    wide = label_w + 3 * heads <= width
    cell = 3 if wide else 1
    side = show_verdicts and label_w + cell * heads + 3 + 2 * heads <= width
    verdict_cell = 2 if side or label_w + 2 * heads <= width else 1

    def kline(layer: int) -> Text:
        line = Text(f"L{layer}".ljust(label_w))
        for h in range(heads):
            text, style = _kfrac_cell(by_id.get((layer, h)), eps, wide)
            line.append(text.ljust(cell) if wide else text, style=style)
        return line

    def vline(layer: int, prefix: bool) -> Text:
        line = Text(f"L{layer}".ljust(label_w) if prefix else "")
        for h in range(heads):
            rec = by_id.get((layer, h))
            letter = head_letter(rec) if rec else "-"
            line.append(letter.ljust(verdict_cell), style=_LETTER_STYLES.get(letter, ""))
        return line

    out = Text()
    k_title = f"k_eps/n at eps={eps} (rows = layers, columns = heads)"
    head_axis = "".join(f"{h:<{cell}d}" if wide else str(h % 10) for h in range(heads))
    out.append(k_title + ("  |  Gaussianity" if side else "") + "\n", style="bold")
    axis = " " * label_w + head_axis
    if side:
        axis = (
            axis.ljust(label_w + cell * heads)
            + " | "
            + "".join(f"{h % 100:<2d}" for h in range(heads))
        )
    out.append(axis.rstrip() + "\n", style="dim")
    for layer in range(layers):
        out.append_text(kline(layer))
        if side:
            out.append(" | ")
            out.append_text(vline(layer, prefix=False))
        out.rstrip()
        out.append("\n")
    legend = "cell = 100*k/n, ## = all keys" if wide else "cell = tenths of keys needed, # = all"
    out.append(f"{legend}, .. = no data\n", style="dim")
    if show_verdicts and not side:
        out.append("\nGaussianity verdict per head\n", style="bold")
        for layer in range(layers):
            out.append_text(vline(layer, prefix=True))
            out.rstrip()
            out.append("\n")
    if show_verdicts:
        used = {head_letter(h) for h in result.heads}
        names = [f"{k} {v}" for k, v in LETTER_NAMES.items() if k in "GHSO" or k in used]
        out.append("verdicts: " + ", ".join(names) + "\n", style="dim")
    out.rstrip()
    return out


def _failed(result: AuditResult) -> Text | None:
    checks = failed_checks(result)
    if not checks:
        return None
    out = Text("Checks that did not pass\n", style="bold red")
    for check in checks:
        out.append(f"  {check.get('status', '?')}: ", style="red")
        out.append(
            f"{check.get('name', '?')}: {check.get('message') or check.get('expression', '')}\n"
        )
    out.rstrip()
    return out


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def render_to_console(result: AuditResult, console: Console, top: int = DEFAULT_TOP) -> None:
    """Print the report on ``console`` (the CLI may pass its own, e.g. stdout with colour)."""
    parts: list[RenderableType] = [
        _header(result),
        Text(""),
        _ranked_table(result, top),
        Text(""),
        _maps(result, console.width),
    ]
    failed = _failed(result)
    if failed is not None:
        parts += [Text(""), failed]
    theory = theory_lines(result)
    if theory:
        parts += [Text(""), Text("Theory check", style="bold"), *[Text(line) for line in theory]]
    search = search_lines(result)
    if search:
        parts += [Text(""), Text("Largest plan within budget", style="bold"), *[Text(line) for line in search]]
    speed = speed_lines(result)
    if speed:
        parts += [Text(""), Text("Measured attention speed", style="bold"), *[Text(line) for line in speed]]
    retrieval = retrieval_lines(result)
    if retrieval:
        parts += [Text(""), Text("Long-context retrieval (passkey)", style="bold"), *[Text(line) for line in retrieval]]
        rows = retrieval_rows(result)
        if rows:
            table = _new_table("", [(h, "right") for h in RETRIEVAL_HEADER])
            for row in rows:
                table.add_row(*row)
            parts.append(table)
    checked = config_lines(result)
    if checked:
        parts += [Text(""), Text("Third-party config check", style="bold"), *[Text(line) for line in checked]]
        rows = config_rows(result, 10)
        if rows:
            table = _new_table("", [(h, "left" if i < 2 else "right") for i, h in enumerate(CONFIG_HEADER)])
            for row in rows:
                table.add_row(*row)
            parts.append(table)
    console.print(Group(*parts), soft_wrap=False, crop=True)


class TerminalRenderer:
    """Plain or coloured text for a terminal; readable at 80 columns and without colour."""

    name = "terminal"
    file_extension = "txt"

    def render(self, result: AuditResult, **options: Any) -> str:
        """Render the report.

        Options:
            width: columns (default: the terminal's width, 40 to 160, when stdout is a
                terminal, else 80).
            color: ANSI colour on or off. Without it colour is on only when stdout is a
                terminal, ``no_color`` is false and the ``NO_COLOR`` variable is unset.
            no_color: turn colour off (the CLI's ``--no-color``).
            top: rows in the ranked table (default 15).
        """
        result = printable(result)  # no control character from a loaded file reaches the terminal
        tty = _stdout_is_tty()
        width = int(options.get("width") or 0) or (
            min(160, max(40, shutil.get_terminal_size((80, 24)).columns)) if tty else 80
        )
        if options.get("color") is not None:
            color = bool(options["color"])
        else:
            color = tty and not options.get("no_color") and not os.environ.get("NO_COLOR")
        top = int(options.get("top") or DEFAULT_TOP)
        buf = StringIO()
        console = Console(
            file=buf,
            width=width,
            no_color=not color,
            force_terminal=color,
            color_system="standard" if color else None,
            highlight=False,
            emoji=False,
            legacy_windows=False,
            soft_wrap=False,
        )
        render_to_console(result, console, top=top)
        lines = (_TRAILING.sub(r"\1", line) for line in buf.getvalue().splitlines())
        return "\n".join(lines) + "\n"
