"""The HTML report's checks of the Gaussian model: QQ plots and predicted against measured k.

The QQ grid shows the least and most Gaussian head/site pairs; the theory section plots each
head's Gaussian-predicted k against its measured k and lists the theory summary.
"""

from __future__ import annotations

import re
from typing import Any

from attn_audit.report.formatting import fmt_num, head_label, num, sparsity_at
from attn_audit.report.html_page import Page, e

__all__ = ["qq_section", "theory_section"]

QQ_HEADS = 3  # worst and best heads in the QQ grid


def _qq_points(block: dict[str, Any]) -> tuple[list[list[float]], bool]:
    """QQ pairs of one site and whether they are Mahalanobis/chi-square points.

    Accepts ``qq`` as [[theoretical, observed], ...] or the ``qq_chi2`` / ``qq_empirical`` arrays
    that attn_audit.stats.assess writes; pairs with a missing (null) value are dropped.
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


def _qq_candidates(page: Page) -> tuple[list[tuple[Any, ...]], set[bool]]:
    """Every head/site with QQ points as (badness, head, site, points, chi2), and the kinds seen."""
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
    return candidates, kinds


def qq_section(page: Page) -> str:
    """QQ plots of the least and most Gaussian head/site pairs; "" without QQ data."""
    from attn_audit.report.plots_xy import qq_grid

    candidates, kinds = _qq_candidates(page)
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
        f"<figure>{qq_grid(panels, salt='qq')}<figcaption>{e(caption)}</figcaption></figure>",
    )


def _median(values: list[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def theory_section(page: Page) -> str:
    """Gaussian-predicted against measured k and the theory summary; "" without."""
    from attn_audit.report.plots_xy import scatter_pred

    result = page.result
    eps = page.eps
    series, ratios, spearman = _theory_points(page)
    summary = result.data.get("theory_summary")
    if not any(series.values()) and not isinstance(summary, dict):
        return ""
    inner = ""
    if any(series.values()):
        labels = {"k_pred": "large-n formula", "k_pred_finite_n": "finite-n Monte Carlo"}
        svg = scatter_pred({labels[k]: v for k, v in series.items() if v}, eps=eps, salt="theory")
        inner += (
            f"<figure>{svg}<figcaption>Each point is a head: the Gaussian model's prediction of "
            f"k against the measured mean k at eps={e(eps)}, coloured by layer; points under "
            "the dashed line are sparser than predicted.</figcaption></figure>"
        )
    facts = _theory_facts(eps, ratios, spearman, summary)
    if facts:
        inner += (
            '<dl class="facts">'
            + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts)
            + "</dl>"
        )
    return page.section("theory", "Theory: predicted against measured k", inner)


def _theory_points(
    page: Page,
) -> tuple[dict[str, list[tuple[float, float, int]]], list[float], list[float]]:
    """The theory data of every head at the primary eps.

    Returns (measured, predicted, layer) points per prediction ("k_pred", "k_pred_finite_n"),
    and the heads' median log(k / k_pred) and Spearman(k, k_pred) values.
    """
    eps = page.eps
    series: dict[str, list[tuple[float, float, int]]] = {"k_pred": [], "k_pred_finite_n": []}
    ratios, spearman = [], []
    for rec in page.result.heads:
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
    return series, ratios, spearman


def _theory_facts(
    eps: str, ratios: list[float], spearman: list[float], summary: Any
) -> list[tuple[str, str]]:
    """Medians over heads, then every entry of the run's theory summary, as display text."""
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
    return facts
