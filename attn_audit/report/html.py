"""HTML renderer: one self-contained page for deciding whether and where to deploy sparse attention.

The page opens with a summary (model, data, run, the gate's verdict and the three numbers that
matter: planned FLOPs saving, quality cost, share of Gaussian-looking heads, each "not run" when
absent) and the gate's checks, then layer x head heatmaps (k_eps/n with an eps selector, R,
Gaussianity verdict), k_eps curves against eps and position for the top and bottom heads, the
n^C scaling fit, QQ plots and predicted-against-measured k when those data exist, the ranked plan
as a sortable table, layers and KV groups, the verification, and the provenance at the bottom.
Each optional section appears only when its data is in the result.

Self-contained and offline: CSS, JS and figures are inline (figures are matplotlib SVG, see
:mod:`attn_audit.report.plots` for why), fonts are the reader's system fonts, and a
Content-Security-Policy forbids every fetch and every script except the page's own (pinned by its
sha256), so the page works from ``file://`` and cannot leak or load anything. Every string that
comes from the model, tokenizer, config or data goes through :func:`html.escape`; numbers are
formatted here. Without JS every eps panel is shown and tables keep the ranked order; printing
shows every panel.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from html import escape
from importlib import resources
from string import Template
from typing import TYPE_CHECKING, Any

from attn_audit.report import (
    LETTER_NAMES,
    NOT_RUN,
    fmt_num,
    fmt_pct,
    gate_counts,
    gate_state,
    head_label,
    head_letter,
    headline,
    left_out,
    num,
    short_reason,
    site_letters,
    sparsity_at,
)

if TYPE_CHECKING:
    from attn_audit.result import AuditResult

__all__ = ["HtmlRenderer"]

CURVE_HEADS = 4  # top and bottom heads drawn in the curve plots
QQ_HEADS = 3  # worst and best heads in the QQ grid
NUM_CLASS = ' class="n"'


def e(value: Any) -> str:
    """HTML-escape any value (quotes included, so it is safe in attributes too)."""
    return escape("" if value is None else str(value), quote=True)


def _asset(name: str) -> str:
    return resources.files("attn_audit.report").joinpath("assets", name).read_text("utf-8")


def _json_for_script(data: Any) -> str:
    """JSON that can sit inside <script type="application/json"> (no "</" or "<!--")."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _td(value: Any, sort: Any = None, cls: str = "") -> str:
    """A table cell; ``sort`` (a number) becomes data-v so the column sorts numerically.

    Cells with data-v are right-aligned by the stylesheet (class "l" keeps one left-aligned);
    sort keys keep 7 significant digits, enough to order any displayed value.
    """
    attrs = f' class="{cls}"' if cls else ""
    if sort is not None:
        x = num(sort)
        attrs += f' data-v="{"" if x is None else format(x, ".7g")}"'
    return f"<td{attrs}>{e(value)}</td>"


def _head_td(rec: dict[str, Any]) -> str:
    """The L{layer}.H{head} cell, sorting by layer then head."""
    return _td(head_label(rec), rec["layer"] * 100_000 + rec["head"], "l")


def _table(
    table_id: str, header: list[tuple[str, bool]], rows: list[str], caption: str = ""
) -> str:
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


class _Page:
    """Collects sections and hover data while the page is built."""

    def __init__(self, result: AuditResult) -> None:
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
        self.toc.append((sid, title))
        return f'<section id="{sid}"><h2>{e(title)}</h2>{inner}</section>'

    def grid(self, fn: Any) -> list[list[Any]]:
        """``fn(rec)`` for every (head, layer) cell; rows are heads, columns layers."""
        return [
            [fn(self.by_id.get((layer, head))) for layer in range(self.layers)]
            for head in range(self.nheads)
        ]

    def heat_figure(self, key: str, fig: Any, cells: list[list[str]], caption: str) -> str:
        self.heat[key] = {
            "box": [round(v, 5) for v in fig.box],
            "rows": fig.rows,
            "cols": fig.cols,
            "cells": [c for row in cells for c in row],
        }
        return (
            f'<figure data-heat="{e(key)}">{fig.svg}<figcaption>{e(caption)}</figcaption></figure>'
        )

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


# -- sections --------------------------------------------------------------------------------------


def _summary(page: _Page) -> str:
    result = page.result
    model, run = result.model, result.run
    dataset = run.get("dataset") or {}
    head = headline(result)
    gate_cls = {"PASS": "pass", "FAIL": "fail", "NO DATA": "fail"}.get(gate_state(result), "none")
    gate_word = head["gate"].split(" (")[0]
    gate_detail = head["gate"][len(gate_word) :].strip(" ()")

    def card(label: str, value: str, detail: str, cls: str = "") -> str:
        cls = cls or ("none" if value == NOT_RUN else "")
        return (
            f'<div class="card {cls}"><div class="k">{e(label)}</div>'
            f'<div class="v">{e(value)}</div><div class="d">{e(detail)}</div></div>'
        )

    flops_v, _, flops_d = head["flops"].partition(" (")
    gauss_v, _, gauss_d = head["gaussian"].partition(" (")
    quality_v, _, quality_d = head["quality"].partition(", ")
    summary = result.data.get("plan_summary") or {}
    cards = "".join(
        [
            card(
                "gate verdict", gate_word, gate_detail or "no --fail-if or policy given", gate_cls
            ),
            card(
                "planned FLOPs saving",
                flops_v,
                (
                    flops_d.rstrip(")") + f", eps={summary.get('eps_key', page.eps)}, "
                    f"n={summary.get('target_len', run.get('seq_len'))}"
                )
                if flops_d
                else "attention FLOPs, planned heads",
            ),
            card("quality cost", quality_v, quality_d or "measured by the verification run"),
            card(
                "Gaussian-looking heads",
                gauss_v,
                gauss_d.rstrip(")") + ": Q and K pass" if gauss_d else "Q/K Gaussianity tests",
            ),
        ]
    )
    lens = ", ".join(str(n) for n in run.get("seq_lens") or [run.get("seq_len")])
    rows = run.get("rows")
    rows_text = (
        f"sampled, {run.get('rows_per_sequence')} per sequence" if rows == "sampled" else str(rows)
    )
    facts = [
        ("model", f"{model.get('name')} ({model.get('family')}, {model.get('source')})"),
        (
            "shape",
            f"{model.get('num_layers')} layers x {model.get('num_heads')} query heads, "
            f"{model.get('num_kv_heads')} KV heads, head_dim {model.get('head_dim')}, "
            f"{model.get('dtype')}, {'causal' if model.get('causal') else 'bidirectional'}"
            f", {'RoPE' if model.get('rope') else 'no RoPE'}",
        ),
        ("data", f"{dataset.get('spec')}: {run.get('num_sequences')} sequences x {lens} tokens"),
        (
            "run",
            f"eps {', '.join(run.get('eps_keys') or [])} (primary {page.eps}); rows "
            f"{rows_text}; {fmt_num(run.get('elapsed_s'))} s on {run.get('device')}",
        ),
    ]
    if result.rows_measured == 0:
        facts.append(("warning", "no query row was measured: nothing here is evidence"))
    dl = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts)
    return (
        f'<section id="summary"><div class="cards">{cards}</div>'
        f'<dl class="facts">{dl}</dl></section>'
    )


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


def _heatmaps(page: _Page) -> str:
    from attn_audit.report import plots

    result = page.result
    seq_len = result.run.get("seq_len")
    eps_keys = [k for k in result.run.get("eps_keys") or []]
    panels, radios = [], []
    label_note = (
        "cells in percent"
        if plots.labelled(page.nheads, page.layers)
        else "exact values in the ranked table"
    )
    figures = plots.heatmaps(
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
    inner = (
        '<div class="eps-select js-only" data-for="kfrac-panels" role="radiogroup" '
        f'aria-label="eps">eps: {"".join(radios)}</div>'
        f'<div id="kfrac-panels">{"".join(panels)}</div>'
    )
    r_values = page.grid(lambda rec: num((rec.get("R") or {}).get("logit_range")) if rec else None)
    if any(v is not None for row in r_values for v in row):
        fig = plots.heatmap(
            r_values,
            title="R: empirical logit range per head",
            colorbar_label="max |logit| range",
            salt="rheat",
            cmap="magma",
            cell_format="{:.0f}",
        )
        inner += page.heat_figure(
            "R",
            fig,
            page.grid(_r_cell),
            "Empirical logit range (the quantity the norm bound R bounds); "
            "hover for the bound and the Q/K norms.",
        )
    codes = page.grid(lambda rec: head_letter(rec) if rec else "-")
    if any(c != "-" for row in codes for c in row):
        fig = plots.categorical_heatmap(
            codes, title="Gaussianity verdict per head (Q and K)", names=LETTER_NAMES, salt="gheat"
        )
        inner += page.heat_figure(
            "gauss",
            fig,
            page.grid(_verdict_cell),
            "G only when every tested site (Q and K) looks Gaussian; "
            "otherwise the worst site's verdict. Hover for each site.",
        )
    return page.section("heatmaps", "Layer x head maps", inner)


def _curves(page: _Page) -> str:
    from attn_audit.report import plots

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
            eps_series.append(plots.Series(label, xs, ys, lo, hi, color, bottom))
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
                plots.Series(
                    label, [p[0] for p in pts], [p[1] for p in pts], color=color, dashed=bottom
                )
            )
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
    svg = plots.line_panels(panels, salt="curves", label="k_eps curves of the top and bottom heads")
    caption = (
        f"The {CURVE_HEADS} heads ranked first (solid) and last (dashed). A flat curve "
        "against position means a fixed budget suffices; a rising one needs k to grow "
        "with the context."
    )
    return page.section(
        "curves", "k_eps curves", f"<figure>{svg}<figcaption>{e(caption)}</figcaption></figure>"
    )


def _scaling(page: _Page) -> str:
    from attn_audit.report import plots

    result = page.result
    lens = sorted(int(n) for n in result.run.get("seq_lens") or [])
    if len(lens) < 2 or not any(h.get("by_length") or h.get("scaling") for h in result.heads):
        return ""
    series = []
    for color, (rec, label, bottom) in enumerate(page.chosen_heads()):
        by_length = rec.get("by_length") or {}
        raw = [
            (n, num(sparsity_at(by_length.get(str(n)) or {}, page.eps).get("k_mean"))) for n in lens
        ]
        pts = [(n, k) for n, k in raw if k is not None and k > 0]
        if pts:
            series.append(
                plots.Series(
                    label, [p[0] for p in pts], [p[1] for p in pts], color=color, dashed=bottom
                )
            )
        fit = rec.get("scaling") or {}
        c_exp, alpha = num(fit.get("C")), num(fit.get("alpha"))
        if c_exp is not None and alpha is not None and alpha > 0:
            series.append(
                plots.Series(
                    "_fit", lens, [alpha * n**c_exp for n in lens], color=color, dashed=True
                )
            )
    exponents = [
        c for h in result.heads if (c := num((h.get("scaling") or {}).get("C"))) is not None
    ]
    inner = f"<figure>{plots.scaling_figure(series, exponents, eps=page.eps, salt='scaling')}"
    inner += (
        "<figcaption>Method A: mean k at each audited length, fitted k = alpha * n^C. "
        "C near 1 means no sub-linear sparsity; C near 0 a fixed budget.</figcaption>"
        "</figure>"
    )
    c_values = page.grid(lambda rec: num((rec.get("scaling") or {}).get("C")) if rec else None)
    if any(v is not None for row in c_values for v in row):
        fig = plots.heatmap(
            c_values,
            title="fitted exponent C per head",
            colorbar_label="C",
            salt="cheat",
            vmin=0.0,
            vmax=1.0,
            cmap="cividis",
            cell_format="{:.2f}",
        )

        def cell(rec: dict[str, Any] | None) -> str:
            fit = (rec or {}).get("scaling") or {}
            ci = fit.get("C_ci") or []
            ci_text = f" [{fmt_num(ci[0])}, {fmt_num(ci[1])}]" if len(ci) == 2 else ""
            return (
                f"{head_label(rec)}: C {fmt_num(fit.get('C'))}{ci_text}, alpha "
                f"{fmt_num(fit.get('alpha'))}"
                if rec
                else "no data"
            )

        inner += page.heat_figure(
            "C", fig, page.grid(cell), "Fitted exponent C (hover for its bootstrap interval)."
        )
    return page.section("scaling", f"Scaling with length ({', '.join(map(str, lens))})", inner)


def _qq_points(block: dict[str, Any]) -> tuple[list[list[float]], bool]:
    """QQ pairs of one site and whether they are Mahalanobis/chi-square points.

    Accepts ``qq`` as [[theoretical, observed], ...] or the ``qq_chi2`` / ``qq_empirical`` arrays
    that attn_audit.stats writes; pairs with a missing (null) value are dropped.
    """
    if isinstance(block.get("qq"), list):
        raw = [p for p in block["qq"] if isinstance(p, (list, tuple)) and len(p) >= 2]
        pairs, chi2 = [(p[0], p[1]) for p in raw], False
    elif isinstance(block.get("qq_chi2"), list) and isinstance(block.get("qq_empirical"), list):
        pairs, chi2 = list(zip(block["qq_chi2"], block["qq_empirical"], strict=False)), True
    else:
        return [], False
    clean = [[x, y] for a, b in pairs if (x := num(a)) is not None and (y := num(b)) is not None]
    return clean, chi2


def _qq_badness(block: dict[str, Any], points: list[list[float]], chi2: bool) -> float:
    """How far from Gaussian a site looks: the statistic its QQ plot shows best."""
    keys = (
        ("mahalanobis_qq_max_dev", "ks_distance", "anderson")
        if chi2
        else ("ks_distance", "anderson", "mahalanobis_qq_max_dev")
    )
    for key in keys:
        value = num(block.get(key))
        if value is not None:
            return value
    return max((abs(y - x) for x, y in points), default=0.0)


def _qq(page: _Page) -> str:
    from attn_audit.report import plots

    candidates = []
    kinds = set()
    seen = set()
    for rec in page.result.heads:
        for site, block in (rec.get("gaussianity") or {}).items():
            if not isinstance(block, dict):
                continue
            points, chi2 = _qq_points(block)
            # Under GQA the query heads of one group share K: show each K sample once.
            key = (rec["layer"], str(site), tuple(map(tuple, points)))
            if len(points) < 3 or key in seen:
                continue
            seen.add(key)
            kinds.add(chi2)
            badness = _qq_badness(block, points, chi2)
            candidates.append((badness, rec, re.sub(r"[^\w.-]", "", str(site)), points, chi2))
    if not candidates:
        return ""
    candidates.sort(key=lambda c: (c[0], c[1]["layer"], c[1]["head"], c[2]))
    worst = candidates[::-1][:QQ_HEADS]
    best = [c for c in candidates[:QQ_HEADS] if c not in worst]
    panels = [
        {
            "points": c[3],
            "worst": is_worst,
            "chi2": c[4],
            "title": f"{'worst' if is_worst else 'best'} {i}: {head_label(c[1])} {c[2]} "
            f"({fmt_num(c[0])})",
        }
        for group, is_worst in ((worst, True), (best, False))
        for i, c in enumerate(group, 1)
    ]
    what = (
        "squared Mahalanobis distances against chi-square quantiles, ordered by the largest "
        "QQ deviation"
        if kinds == {True}
        else "observed against Gaussian quantiles, ordered by KS distance"
    )
    caption = (
        f"QQ points of the least (red) and most (green) Gaussian head/site pairs: {what} "
        "(number in brackets). Points on the dashed line are Gaussian."
    )
    return page.section(
        "qq",
        "QQ plots",
        f"<figure>{plots.qq_grid(panels, salt='qq')}<figcaption>{e(caption)}</figcaption></figure>",
    )


def _median(values: list[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _theory(page: _Page) -> str:
    from attn_audit.report import plots

    result = page.result
    eps = page.eps
    series: dict[str, list[tuple[float, float, int]]] = {"k_pred": [], "k_pred_finite_n": []}
    ratios, spearman = [], []
    for rec in result.heads:
        theory = rec.get("theory")
        if not isinstance(theory, dict):
            continue
        meas = num((theory.get("k_measured_mean") or {}).get(eps))
        if meas is None:
            meas = num(sparsity_at(rec, eps).get("k_mean"))
        for key, points in series.items():
            pred = num((theory.get(key) or {}).get(eps))
            if pred is not None and meas is not None and pred > 0 and meas > 0:
                points.append((meas, pred, int(rec["layer"])))
        if (x := num((theory.get("log_ratio_median") or {}).get(eps))) is not None:
            ratios.append(x)
        if (x := num((theory.get("spearman") or {}).get(eps))) is not None:
            spearman.append(x)
    summary = result.data.get("theory_summary")
    if not any(series.values()) and not isinstance(summary, dict):
        return ""
    inner = ""
    if any(series.values()):
        labels = {"k_pred": "large-n formula", "k_pred_finite_n": "finite-n Monte Carlo"}
        svg = plots.scatter_pred(
            {labels[k]: v for k, v in series.items() if v}, eps=eps, salt="theory"
        )
        inner += (
            f"<figure>{svg}<figcaption>Each point is a head: the Gaussian model's prediction of "
            f"k against the measured mean k at eps={e(eps)}, coloured by layer; points under "
            "the dashed line are sparser than predicted.</figcaption></figure>"
        )
    facts = []
    if (x := _median(ratios)) is not None:
        facts.append((f"median over heads of log(k / k_pred), eps={eps}", fmt_num(x)))
    if (x := _median(spearman)) is not None:
        facts.append(
            (f"median over heads of Spearman(k, k_pred) across rows, eps={eps}", fmt_num(x))
        )
    for key, value in (summary or {}).items():
        if isinstance(value, list) and len(value) == 3:
            text = f"{fmt_num(value[0])} [{fmt_num(value[1])}, {fmt_num(value[2])}]"
        elif isinstance(value, (int, float)):
            text = fmt_num(value)
        else:
            text = str(value)
        facts.append((str(key), text))
    if facts:
        inner += (
            '<dl class="facts">'
            + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts)
            + "</dl>"
        )
    return page.section("theory", "Theory: predicted against measured k", inner)


def _reason_td(text: Any, full: bool) -> str:
    """A reason cell: the whole text, or its first clause with the rest on hover."""
    whole = "" if text is None else str(text)
    if full:
        return f'<td class="reason">{e(whole)}</td>'
    return f'<td class="reason" title="{e(whole)}">{e(short_reason(whole))}</td>'


def _plan_intro(result: AuditResult) -> str:
    summary = result.data.get("plan_summary")
    if not isinstance(summary, dict):
        return ""
    out = f"<p>{e(summary['text'])}</p>" if isinstance(summary.get("text"), str) else ""
    facts = [
        ("planned attention FLOPs saving", fmt_pct(summary.get("planned_flops_saving"))),
        ("heads planned", f"{summary.get('heads_planned')} of {summary.get('heads_total')}"),
        ("target length, eps", f"{summary.get('target_len')}, eps={summary.get('eps_key')}"),
    ]
    if num(summary.get("attention_speedup_bound")) is not None:
        facts.append(
            ("ideal attention speed-up", f"{fmt_num(summary['attention_speedup_bound'])}x")
        )
    out += (
        '<dl class="facts">'
        + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts)
        + "</dl>"
    )
    excluded = [x for x in summary.get("excluded") or [] if isinstance(x, dict)]
    if excluded:
        rows = [
            "<tr>" + _head_td(x) + _td(x.get("k"), x.get("k")) + _td(x.get("why")) + "</tr>"
            for x in excluded
            if "layer" in x and "head" in x
        ]
        out += (
            f"<details><summary>{len(excluded)} heads left out of the plan, and why</summary>"
            + _table("excluded-table", [("head", False), ("k", True), ("why", False)], rows)
            + "</details>"
        )
    return out


def _plan_and_ranking(page: _Page) -> str:
    result = page.result
    inner = _plan_intro(result)
    plan = result.data.get("plan") or []
    if plan:
        rows = []
        for i, p in enumerate(plan, 1):
            cells = [
                _td(i, i),
                _head_td(p),
                _td(p.get("kv_head"), p.get("kv_head")),
                _td(p.get("pattern")),
                _td(p.get("k"), p.get("k")),
                _td(fmt_pct(p.get("kfrac")), p.get("kfrac")),
                _td(fmt_pct(p.get("flops_saving")), p.get("flops_saving")),
                _td(fmt_pct(p.get("flops_saving_model"), 2), p.get("flops_saving_model")),
                _td(fmt_num(p.get("score")), p.get("score")),
                _reason_td(p.get("reason"), full=True),
            ]
            rows.append("<tr>" + "".join(cells) + "</tr>")
        header = [
            ("#", True),
            ("head", False),
            ("kv", True),
            ("pattern", False),
            ("k", True),
            ("k/n", True),
            ("attention FLOPs saved", True),
            ("model FLOPs saved", True),
            ("score", True),
            ("reason", False),
        ]
        inner += _table(
            "plan-table", header, rows, f"{len(plan)} planned heads; click a column to sort."
        )
    eps_keys = result.run.get("eps_keys") or []
    rows = []
    for entry in result.ranking:
        rec = page.by_id.get((entry["layer"], entry["head"]), {})
        r = rec.get("R") or {}
        cells = [
            _td(entry.get("rank"), entry.get("rank")),
            _head_td(entry),
            _td(entry.get("kv_head"), entry.get("kv_head")),
        ]
        for key in eps_keys:
            frac = sparsity_at(rec, key).get("kfrac_mean")
            cells.append(_td(fmt_pct(frac), frac))
        k_mean = sparsity_at(rec, page.eps).get("k_mean")
        letters = " ".join(f"{s}:{v}" for s, v in site_letters(rec).items())
        cells += [
            _td(fmt_num(k_mean), k_mean),
            _td(fmt_num(r.get("logit_range")), r.get("logit_range")),
            _td(head_letter(rec) + (f" ({letters})" if letters else "")),
            _td(fmt_num(rec.get("entropy_mean")), rec.get("entropy_mean")),
            _td(fmt_pct(rec.get("sink_mass_mean")), rec.get("sink_mass_mean")),
            _td(fmt_num(entry.get("score")), entry.get("score")),
            _td(", ".join(map(str, rec.get("flags") or []))),
            _reason_td(entry.get("reason"), full=False),
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = (
        [("rank", True), ("head", False), ("kv", True)]
        + [(f"k/n eps={k}", True) for k in eps_keys]
        + [
            (f"k eps={page.eps}", True),
            ("logit range", True),
            ("Gaussianity", False),
            ("entropy", True),
            ("sink mass", True),
            ("score", True),
            ("flags", False),
            ("reason", False),
        ]
    )
    title = "Sparse-attention plan" if plan else "Ranked heads (no plan ran)"
    if plan:
        inner += "<h3>All heads, ranked</h3>"
    inner += _table(
        "ranking-table",
        header,
        rows,
        f"All {len(rows)} heads, best candidates first; hover a reason for all of it; "
        "click a column to sort.",
    )
    return page.section("plan", title, inner)


def _groups(page: _Page) -> str:
    """Layers and KV groups ranked as units (what a runtime that shares K/V must pick)."""
    data = page.result.data
    inner = ""
    for key, title, table_id, kv in (
        ("ranking_kv_groups", "KV groups (query heads sharing one K/V head)", "kv-table", True),
        ("ranking_layers", "Layers", "layers-table", False),
    ):
        entries = [x for x in data.get(key) or [] if isinstance(x, dict)]
        if not entries:
            continue
        rows = []
        for x in entries:
            heads = x.get("heads") or []
            cells = [_td(x.get("rank"), x.get("rank")), _td(x.get("layer"), x.get("layer"))]
            if kv:
                cells.append(_td(x.get("kv_head"), x.get("kv_head")))
            cells += [
                _td(", ".join(map(str, heads)) if kv else len(heads), None if kv else len(heads)),
                _td(x.get("k"), x.get("k")),
                _td(fmt_pct(x.get("kfrac")), x.get("kfrac")),
                _td(fmt_pct(x.get("flops_saving")), x.get("flops_saving")),
                _td(fmt_pct(x.get("mean_head_saving")), x.get("mean_head_saving")),
                _td(fmt_num(x.get("score")), x.get("score")),
                _td(", ".join(map(str, x.get("flags") or []))),
            ]
            rows.append("<tr>" + "".join(cells) + "</tr>")
        header = [("rank", True), ("layer", True)] + ([("kv", True)] if kv else [])
        header += [
            ("query heads" if kv else "heads", not kv),
            ("k", True),
            ("k/n", True),
            ("FLOPs saved", True),
            ("mean head saving", True),
            ("score", True),
            ("flags", False),
        ]
        rule = next((str(x["rule"]) for x in entries if isinstance(x.get("rule"), str)), "")
        inner += f"<h3>{e(title)}</h3>" + _table(table_id, header, rows, rule)
    if not inner:
        return ""
    return page.section("groups", "Layers and KV groups", inner)


def _verify(page: _Page) -> str:
    verify = page.result.data.get("verify")
    if not isinstance(verify, dict):
        return ""
    facts = [("quality cost", headline(page.result)["quality"])]
    for key, label, fmt in (
        ("ppl_ratio", "perplexity ratio", _fixed4),
        ("hidden_cosine", "hidden-state cosine", _fixed4),
        ("top1_agreement", "top-1 agreement", fmt_pct),
        ("max_ppl_increase", "allowed perplexity increase", fmt_pct),
        ("largest_plan_heads", "largest plan within budget (heads)", str),
        ("largest_plan_flops_saving", "its attention FLOPs saving", fmt_pct),
    ):
        if verify.get(key) is not None:
            facts.append((label, fmt(verify[key])))
    inner = (
        '<dl class="facts">'
        + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts)
        + "</dl>"
    )
    rows = []
    for h in verify.get("heads") or []:
        rows.append(
            "<tr>"
            + "".join(
                [
                    _head_td(h),
                    _td(fmt_pct(h.get("rel_error_mean"), 2), h.get("rel_error_mean")),
                    _td(fmt_pct(h.get("rel_error_p99"), 2), h.get("rel_error_p99")),
                    _td(fmt_pct(h.get("tail_mass_mean"), 2), h.get("tail_mass_mean")),
                ]
            )
            + "</tr>"
        )
    if rows:
        inner += _table(
            "verify-table",
            [
                ("head", False),
                ("relative error, mean", True),
                ("relative error, p99", True),
                ("tail mass, mean", True),
            ],
            rows,
            "Per-head output error of the planned sparse attention.",
        )
    return page.section("verify", "Verification", inner)


def _fixed4(value: Any) -> str:
    x = num(value)
    return "n/a" if x is None else f"{x:.4f}"


def _gate(page: _Page) -> str:
    gate = page.result.data.get("gate")
    state = gate_state(page.result)
    if not isinstance(gate, dict) or state == "no checks":
        return ""
    counts = gate_counts(gate)
    order = {"failed": 0, "unevaluable": 1, "passed": 2}
    checks = sorted(gate.get("checks") or [], key=lambda c: order.get(str(c.get("status")), 1))
    rows = []
    for c in checks:
        status = re.sub(r"[^a-z]", "", str(c.get("status", "")).lower()) or "unevaluable"
        rows.append(
            f'<tr class="{status}">'
            + "".join(
                [
                    _td(c.get("status"), None, f"status-{status}"),
                    _td(c.get("name")),
                    f'<td class="mono">{e(c.get("expression"))}</td>',
                    _td(fmt_num(c.get("value")), c.get("value")),
                    _td(c.get("message")),
                ]
            )
            + "</tr>"
        )
    inner = (
        f"<p><strong>{e(state)}</strong>, exit code {e(gate.get('exit_code'))}: "
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['unevaluable']} "
        "unevaluable (an unevaluable check never counts as a pass).</p>"
    )
    if isinstance(gate.get("verdict"), str):
        inner += f'<p class="mono">{e(gate["verdict"])}</p>'
    if not rows:
        return page.section("gate", "Checks", inner)
    inner += _table(
        "gate-table",
        [
            ("status", False),
            ("check", False),
            ("expression", False),
            ("value", True),
            ("message", False),
        ],
        rows,
    )
    return page.section("gate", "Checks", inner)


def _provenance(result: AuditResult) -> str:
    model, run = result.model, result.run
    dataset = run.get("dataset") or {}
    versions = run.get("versions") or {}
    tool = result.data.get("tool") or {}
    sites = ", ".join(str(s) for s in run.get("sites") or []) or "none"
    tested = sorted({str(s) for h in result.heads for s in (h.get("gaussianity") or {})})
    rows = run.get("rows")
    rows_text = (
        "all query rows"
        if rows == "all"
        else f"sampled: {run.get('rows_per_sequence')} rows per sequence (seeded)"
    )
    facts = [
        ("attn-audit", tool.get("version") or versions.get("attn_audit", "?")),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or "n/a"),
        (
            "model",
            f"{model.get('name')} (source {model.get('source')}, revision "
            f"{model.get('revision') or 'n/a'}, trust_remote_code "
            f"{bool(model.get('trust_remote_code'))})",
        ),
        (
            "dataset",
            f"{dataset.get('spec')} (kind {dataset.get('kind')}, split "
            f"{dataset.get('split') or 'n/a'}, column {dataset.get('text_column') or 'n/a'}"
            f", {dataset.get('documents')} documents, {dataset.get('tokens')} tokens)",
        ),
        ("token hash", f"sha256 {dataset.get('token_hash') or 'n/a'}"),
        (
            "sites captured",
            f"{sites} at {run.get('capture_point')} (model "
            f"{'with' if model.get('rope') else 'without'} RoPE); Gaussianity tested on "
            f"{', '.join(tested) or 'no site'}",
        ),
        (
            "rows",
            f"{rows_text}; reservoir {run.get('reservoir_size')} per head; "
            f"{run.get('nonfinite_rows', 0)} non-finite rows dropped",
        ),
        (
            "settings",
            f"seed {run.get('seed')}, batch {run.get('batch_size')}, device "
            f"{run.get('device')}, min_keys {run.get('min_keys')}, budgets "
            f"{run.get('budgets')}, sinks {run.get('sinks')}, window {run.get('window')}",
        ),
        (
            "timing",
            f"{fmt_num(run.get('elapsed_s'))} s, {fmt_num(run.get('tokens_per_s'))} "
            f"tokens/s, created {run.get('created')}",
        ),
        ("left out", ", ".join(left_out(result)) or "nothing"),
    ]
    dl = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts)
    return f'<footer id="provenance"><h2>Provenance</h2><dl class="facts">{dl}</dl></footer>'


class HtmlRenderer:
    """One self-contained HTML page (inline CSS, JS and SVG; no request leaves it)."""

    name = "html"
    file_extension = "html"

    def render(self, result: AuditResult, **options: Any) -> str:
        """Render the page. No options are needed; unknown ones are ignored."""
        page = _Page(result)
        # The checks come first: a reviewer wants to know what failed before anything else.
        sections = [
            _gate(page),
            _heatmaps(page),
            _curves(page),
            _scaling(page),
            _qq(page),
            _theory(page),
            _plan_and_ranking(page),
            _groups(page),
            _verify(page),
        ]
        summary = _summary(page)
        page.toc.append(("provenance", "Provenance"))
        toc = "".join(f'<a href="#{sid}">{e(title)}</a>' for sid, title in page.toc)
        name = str(result.model.get("name", "?"))
        body = (
            f'<header><h1>attn-audit: <span class="mono">{e(name)}</span></h1>'
            f'<p class="sub">{e(headline(result)["gate"])} &middot; created '
            f"{e(result.run.get('created'))}</p>"
            f'<nav class="toc">{toc}</nav></header>'
            f"<main>{summary}{''.join(sections)}</main>{_provenance(result)}"
        )
        js = _asset("report.js")
        digest = base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode("ascii")
        csp = (
            "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
            f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
        )
        versions = result.run.get("versions") or {}
        return Template(_asset("report.html.tmpl")).substitute(
            csp=csp,
            version=e(versions.get("attn_audit", "")),
            title=e(name),
            css=_asset("report.css"),
            body=body,
            heat_data=_json_for_script(page.heat),
            js=js,
        )
