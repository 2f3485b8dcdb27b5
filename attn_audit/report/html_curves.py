"""The HTML report's k_eps curves: k against eps and position, and its scaling with length.

Both sections draw the top and bottom heads of the ranking (:meth:`Page.chosen_heads`); the
scaling section adds the fitted n^C lines, the spread of C over all heads and a map of C.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attn_audit.report.formatting import fmt_num, head_label, num, sparsity_at
from attn_audit.report.html_page import CURVE_HEADS, Page, e

if TYPE_CHECKING:
    from attn_audit.report.plots_xy import Series

__all__ = ["curves_section", "scaling_section"]


def curves_section(page: Page) -> str:
    """k_eps against eps and against position for the chosen heads; "" without data."""
    from attn_audit.report.plots_xy import line_panels

    eps_series, pos_series = _curve_series(page)
    if not eps_series and not pos_series:
        return ""
    panels = []
    if eps_series:
        panels.append(
            {
                "series": eps_series,
                "title": "mean k_eps against eps (band: CI)",
                "xlabel": "eps",
                "ylabel": "mean k_eps",
                "logx": True,
                "logy": True,
                "xticks": sorted({x for s in eps_series for x in s.x}),
            }
        )
    if pos_series:
        panels.append(
            {
                "series": pos_series,
                "title": f"mean k_eps against position, eps={page.eps}",
                "xlabel": "query position",
                "ylabel": "mean k_eps",
                "logx": True,
                "logy": True,
                "base2": True,
            }
        )
    svg = line_panels(panels, salt="curves", label="k_eps curves of the top and bottom heads")
    caption = (
        f"The {CURVE_HEADS} heads ranked first (solid) and last (dashed). A flat curve "
        "against position means a fixed budget suffices; a rising one needs k to grow "
        "with the context."
    )
    return page.section(
        "curves", "k_eps curves", f"<figure>{svg}<figcaption>{e(caption)}</figcaption></figure>"
    )


def _curve_series(page: Page) -> tuple[list[Series], list[Series]]:
    """Per chosen head, mean k against eps (with CI band) and against query position."""
    from attn_audit.report.plots_xy import Series

    eps_keys = page.result.run.get("eps_keys") or []
    eps_series, pos_series = [], []
    for color, (rec, label, bottom) in enumerate(page.chosen_heads()):
        xs, ys, lo, hi = [], [], [], []
        for key in eps_keys:
            block = sparsity_at(rec, key)
            k, x = num(block.get("k_mean")), num(key)
            ci = (block.get("ci") or {}).get("k_mean") or [k, k]
            if k is None or x is None or k <= 0:
                continue
            xs.append(x)
            ys.append(k)
            lo.append(num(ci[0]) or k)
            hi.append(num(ci[-1]) or k)
        if xs:
            eps_series.append(Series(label, xs, ys, lo, hi, color, bottom))
        raw = [
            (num(b.get("lo")), num(b.get("hi")), num(b.get("k_mean")))
            for b in sparsity_at(rec, page.eps).get("by_position") or []
        ]
        pts = [
            ((a + b) / 2, k)
            for a, b, k in raw
            if a is not None and b is not None and k is not None and k > 0 and a + b > 0
        ]
        if pts:
            pos_series.append(
                Series(label, [p[0] for p in pts], [p[1] for p in pts], color=color, dashed=bottom)
            )
    return eps_series, pos_series


def scaling_section(page: Page) -> str:
    """Mean k against sequence length with the fitted n^C; "" with under two lengths."""
    from attn_audit.report.plots_xy import scaling_figure

    result = page.result
    lens = sorted(int(n) for n in result.run.get("seq_lens") or [])
    if len(lens) < 2 or not any(h.get("by_length") or h.get("scaling") for h in result.heads):
        return ""
    series = _scaling_series(page, lens)
    exponents = [
        c for h in result.heads if (c := num((h.get("scaling") or {}).get("C"))) is not None
    ]
    inner = f"<figure>{scaling_figure(series, exponents, eps=page.eps, salt='scaling')}"
    inner += (
        "<figcaption>Method A: mean k at each audited length, fitted k = alpha * n^C. "
        "C near 1 means no sub-linear sparsity; C near 0 a fixed budget.</figcaption>"
        "</figure>"
    )
    inner += _exponent_map(page)
    return page.section("scaling", f"Scaling with length ({', '.join(map(str, lens))})", inner)


def _scaling_series(page: Page, lens: list[int]) -> list[Series]:
    """Per chosen head, mean k at each audited length and its fitted alpha * n^C line."""
    from attn_audit.report.plots_xy import Series

    series = []
    for color, (rec, label, bottom) in enumerate(page.chosen_heads()):
        by_length = rec.get("by_length") or {}
        raw = [
            (n, num(sparsity_at(by_length.get(str(n)) or {}, page.eps).get("k_mean"))) for n in lens
        ]
        pts = [(n, k) for n, k in raw if k is not None and k > 0]
        if pts:
            series.append(
                Series(label, [p[0] for p in pts], [p[1] for p in pts], color=color, dashed=bottom)
            )
        fit = rec.get("scaling") or {}
        c_exp, alpha = num(fit.get("C")), num(fit.get("alpha"))
        if c_exp is not None and alpha is not None and alpha > 0:
            series.append(
                Series("_fit", lens, [alpha * n**c_exp for n in lens], color=color, dashed=True)
            )
    return series


def _exponent_cell(rec: dict[str, Any] | None) -> str:
    """Hover text of one head in the map of C: the fit with its bootstrap interval."""
    fit = (rec or {}).get("scaling") or {}
    ci = fit.get("C_ci") or []
    ci_text = f" [{fmt_num(ci[0])}, {fmt_num(ci[1])}]" if len(ci) == 2 else ""
    return (
        f"{head_label(rec)}: C {fmt_num(fit.get('C'))}{ci_text}, alpha {fmt_num(fit.get('alpha'))}"
        if rec
        else "no data"
    )


def _exponent_map(page: Page) -> str:
    """The layer x head map of the fitted exponent C ("" when no head has one)."""
    return page.value_map(
        "C",
        lambda rec: (rec.get("scaling") or {}).get("C"),
        _exponent_cell,
        "Fitted exponent C (hover for its bootstrap interval).",
        title="fitted exponent C per head",
        colorbar_label="C",
        salt="cheat",
        vmin=0.0,
        vmax=1.0,
        cmap="cividis",
        cell_format="{:.2f}",
    )
