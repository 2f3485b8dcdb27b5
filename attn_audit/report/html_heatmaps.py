"""The HTML report's layer x head maps: k_eps/n per eps (with a selector), R and Gaussianity.

Each map is a matplotlib SVG with a hover read-out; the cell functions here write the exact
values (confidence intervals, k, norms, per-site verdicts) that the read-out shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attn_audit.report.formatting import (
    LETTER_NAMES,
    fmt_num,
    fmt_pct,
    head_label,
    head_letter,
    num,
    sparsity_at,
)
from attn_audit.report.html_page import Page, e

if TYPE_CHECKING:
    from attn_audit.report.plots_heatmaps import HeatmapSvg

__all__ = ["heatmaps_section"]


def _kfrac_cell(rec: dict[str, Any] | None, eps: str) -> str:
    if rec is None:
        return "no data"
    block = sparsity_at(rec, eps)
    frac = num(block.get("kfrac_mean"))
    if frac is None:
        return f"{head_label(rec)}: no data at eps={eps}"
    ci = (block.get("ci") or {}).get("kfrac_mean") or []
    ci_text = f" [{fmt_pct(ci[0])}, {fmt_pct(ci[1])}]" if len(ci) == 2 else ""
    return (
        f"{head_label(rec)} kv{rec.get('kv_head')}: k/n {fmt_pct(frac, 2)}{ci_text}, "
        f"k {fmt_num(block.get('k_mean'))} (p90 {fmt_num(block.get('k_p90'))}), "
        f"{block.get('rows', '?')} rows"
    )


def _r_cell(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "no data"
    r = rec.get("R") or {}
    return (
        f"{head_label(rec)}: logit range {fmt_num(r.get('logit_range'))}, bound "
        f"{fmt_num(r.get('qk_bound'))}, max|q| {fmt_num(r.get('max_q_norm'))}, "
        f"max|k| {fmt_num(r.get('max_k_norm'))}"
    )


def _verdict_cell(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "no data"
    gauss = rec.get("gaussianity") or {}
    sites = "; ".join(
        f"{site} {block.get('verdict', '?')}"
        for site, block in gauss.items()
        if isinstance(block, dict)
    )
    return f"{head_label(rec)}: {head_letter(rec)} ({sites or 'not tested'})"


def heatmaps_section(page: Page) -> str:
    """Layer x head maps of k_eps/n (a panel per eps), R and the Gaussianity verdict."""
    inner = _kfrac_maps(page) + _r_map(page) + _verdict_map(page)
    return page.section("heatmaps", "Layer x head maps", inner)


def _kfrac_figures(page: Page, eps_keys: list[str]) -> list[HeatmapSvg]:
    """The k_eps/n maps, one per eps, on one colour scale."""
    from attn_audit.report.plots_heatmaps import heatmaps

    return heatmaps(
        [
            (
                page.grid(
                    lambda rec, key=key: (
                        num(sparsity_at(rec, key).get("kfrac_mean")) if rec else None
                    )
                ),
                f"k_eps/n at eps={key} (share of keys needed)",
                f"kfrac{i}",
            )
            for i, key in enumerate(eps_keys)
        ],
        colorbar_label="k/n",
        vmin=0.0,
        vmax=1.0,
        cell_scale=100.0,
    )


def _kfrac_maps(page: Page) -> str:
    """The k_eps/n panels behind an eps selector (only the primary eps shown with JS)."""
    from attn_audit.report.plots_heatmaps import labelled

    result = page.result
    seq_len = result.run.get("seq_len")
    eps_keys = [k for k in result.run.get("eps_keys") or []]
    panels, radios = [], []
    label_note = (
        "cells in percent"
        if labelled(page.nheads, page.layers)
        else "exact values in the ranked table"
    )
    figures = _kfrac_figures(page, eps_keys)
    for i, (key, fig) in enumerate(zip(eps_keys, figures, strict=True)):
        cells = page.grid(lambda rec, key=key: _kfrac_cell(rec, key))
        hidden = "" if key == page.eps else " hidden"
        panels.append(
            f'<div class="eps-panel" data-eps="{e(key)}"{hidden}>'
            + page.heat_figure(
                f"kfrac{i}",
                fig,
                cells,
                f"Mean k_eps/n per head at eps={key}, n={seq_len}: the share of keys a "
                "query needs to keep all but eps of its attention mass (lower = sparser; "
                f"{label_note}). Hover for exact values, confidence intervals and k.",
            )
            + "</div>"
        )
        checked = " checked" if key == page.eps else ""
        radios.append(
            f'<label><input type="radio" name="eps" value="{e(key)}"{checked}> {e(key)}</label>'
        )
    return (
        '<div class="eps-select js-only" data-for="kfrac-panels" role="radiogroup" '
        f'aria-label="eps">eps: {"".join(radios)}</div>'
        f'<div id="kfrac-panels">{"".join(panels)}</div>'
    )


def _r_map(page: Page) -> str:
    """The map of the empirical logit range R ("" when no head has one)."""
    return page.value_map(
        "R",
        lambda rec: (rec.get("R") or {}).get("logit_range"),
        _r_cell,
        "Empirical logit range (the quantity the norm bound R bounds); "
        "hover for the bound and the Q/K norms.",
        title="R: empirical logit range per head",
        colorbar_label="max |logit| range",
        salt="rheat",
        cmap="magma",
        cell_format="{:.0f}",
    )


def _verdict_map(page: Page) -> str:
    """The map of Gaussianity verdict letters ("" when no head was tested)."""
    from attn_audit.report.plots_heatmaps import categorical_heatmap

    codes = page.grid(lambda rec: head_letter(rec) if rec else "-")
    if not any(c != "-" for row in codes for c in row):
        return ""
    fig = categorical_heatmap(
        codes, title="Gaussianity verdict per head (Q and K)", names=LETTER_NAMES, salt="gheat"
    )
    return page.heat_figure(
        "gauss",
        fig,
        page.grid(_verdict_cell),
        "G only when every tested site (Q and K) looks Gaussian; "
        "otherwise the worst site's verdict. Hover for each site.",
    )
