"""Building blocks shared by the HTML report's sections.

Escaping (:func:`e`, used for every string that reaches the page), the markup of table cells and
sortable tables, and :class:`Page`, the page under construction: the result, its layer x head
grid, the sections' table of contents and the hover data of the heatmaps.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any

from attn_audit.report.formatting import head_label, num, short_reason

if TYPE_CHECKING:
    from attn_audit.result import AuditResult

__all__ = ["CURVE_HEADS", "NUM_CLASS", "Page", "e", "head_td", "reason_td", "table", "td"]

CURVE_HEADS = 4  # top and bottom heads drawn in the curve plots
NUM_CLASS = ' class="n"'


def e(value: Any) -> str:
    """HTML-escape any value (quotes included, so it is safe in attributes too)."""
    return escape("" if value is None else str(value), quote=True)


def td(value: Any, sort: Any = None, cls: str = "") -> str:
    """A table cell; ``sort`` (a number) becomes data-v so the column sorts numerically.

    Cells with data-v are right-aligned by the stylesheet (class "l" keeps one left-aligned);
    sort keys keep 7 significant digits, enough to order any displayed value.
    """
    attrs = f' class="{cls}"' if cls else ""
    if sort is not None:
        x = num(sort)
        attrs += f' data-v="{"" if x is None else format(x, ".7g")}"'
    return f"<td{attrs}>{e(value)}</td>"


def head_td(rec: dict[str, Any]) -> str:
    """The L{layer}.H{head} cell, sorting by layer then head."""
    return td(head_label(rec), rec["layer"] * 100_000 + rec["head"], "l")


def table(table_id: str, header: list[tuple[str, bool]], rows: list[str], caption: str = "") -> str:
    """A sortable table; ``header`` holds (label, numeric) pairs, ``rows`` ready-made <tr>s."""
    ths = "".join(
        f'<th{NUM_CLASS if numeric else ""} scope="col">{e(label)}</th>'
        for label, numeric in header
    )
    cap = f'<caption class="muted">{e(caption)}</caption>' if caption else ""
    return (
        f'<div class="table-wrap"><table class="sortable" id="{e(table_id)}">{cap}'
        f"<thead><tr>{ths}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def reason_td(text: Any, full: bool) -> str:
    """A reason cell: the whole text, or its first clause with the rest on hover."""
    whole = "" if text is None else str(text)
    if full:
        return f'<td class="reason">{e(whole)}</td>'
    return f'<td class="reason" title="{e(whole)}">{e(short_reason(whole))}</td>'


class Page:
    """Collects sections and hover data while the page is built."""

    def __init__(self, result: AuditResult) -> None:
        """Index the result's heads by (layer, head) and size the layer x head grid."""
        self.result = result
        self.eps = result.primary_eps_key
        self.heat: dict[str, dict[str, Any]] = {}
        self.toc: list[tuple[str, str]] = []
        self.by_id = {(h["layer"], h["head"]): h for h in result.heads}
        model = result.model
        self.layers = int(model.get("num_layers") or 0) or 1 + max(
            (h["layer"] for h in result.heads), default=0
        )
        self.nheads = int(model.get("num_heads") or 0) or 1 + max(
            (h["head"] for h in result.heads), default=0
        )

    # -- helpers -----------------------------------------------------------------------------
    def section(self, sid: str, title: str, inner: str) -> str:
        """Wrap ``inner`` in a titled <section> and list it in the table of contents."""
        self.toc.append((sid, title))
        return f'<section id="{sid}"><h2>{e(title)}</h2>{inner}</section>'

    def grid(self, fn: Any) -> list[list[Any]]:
        """``fn(rec)`` for every (head, layer) cell; rows are heads, columns layers."""
        return [
            [fn(self.by_id.get((layer, head))) for layer in range(self.layers)]
            for head in range(self.nheads)
        ]

    def heat_figure(self, key: str, fig: Any, cells: list[list[str]], caption: str) -> str:
        """A heatmap <figure>; its cell box and hover texts go to the page's heat data."""
        self.heat[key] = {
            "box": [round(v, 5) for v in fig.box],
            "rows": fig.rows,
            "cols": fig.cols,
            "cells": [c for row in cells for c in row],
        }
        return (
            f'<figure data-heat="{e(key)}">{fig.svg}<figcaption>{e(caption)}</figcaption></figure>'
        )

    def value_map(self, key: str, value: Any, cell: Any, caption: str, **heatmap_args: Any) -> str:
        """A heatmap of one number per head, ``value(rec)``, with ``cell(rec)`` as the hover
        text of each cell ("" when no head has a value); ``heatmap_args`` go to the plot."""
        from attn_audit.report.plots_heatmaps import heatmap

        values = self.grid(lambda rec: num(value(rec)) if rec else None)
        if not any(v is not None for row in values for v in row):
            return ""
        return self.heat_figure(key, heatmap(values, **heatmap_args), self.grid(cell), caption)

    def chosen_heads(self) -> list[tuple[dict[str, Any], str, bool]]:
        """Top and bottom heads of the ranking: (head record, legend label, is_bottom)."""
        ranking = self.result.ranking
        top = ranking[:CURVE_HEADS]
        bottom = [r for r in ranking[-CURVE_HEADS:] if r not in top]
        out = []
        for entry, is_bottom in [(r, False) for r in top] + [(r, True) for r in bottom]:
            rec = self.by_id.get((entry["layer"], entry["head"]))
            if rec is not None:
                out.append((rec, f"{head_label(rec)} (#{entry.get('rank', '?')})", is_bottom))
        return out
