"""Figures on x/y axes for the HTML report, as inline SVG: line panels, scaling, QQ, prediction.

k_eps curves against eps and position (:func:`line_panels`), k against sequence length with the
fitted n^C and the spread of C (:func:`scaling_figure`), QQ plots (:func:`qq_grid`) and predicted
against measured k (:func:`scatter_pred`). Shared style and the SVG export are in
:mod:`attn_audit.report.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
from matplotlib.colors import Normalize
from matplotlib.ticker import NullFormatter, NullLocator

from attn_audit.report.plots import (
    PALETTE,
    PLAIN_TICKS,
    RC,
    new_figure,
    safe_text,
    svg_text,
)

__all__ = ["Series", "line_panels", "qq_grid", "scaling_figure", "scatter_pred"]


@dataclass(frozen=True)
class Series:
    """One line of a line plot: points (x, y), optional error bars, and its legend label."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    lo: Sequence[float] | None = None
    hi: Sequence[float] | None = None
    color: int = 0
    dashed: bool = False


def _plot_series(ax: Any, series: Sequence[Series]) -> None:
    for s in series:
        color = PALETTE[s.color % len(PALETTE)]
        style = "--" if s.dashed else "-"
        ax.plot(
            s.x,
            s.y,
            style,
            marker="o",
            markersize=2.5,
            linewidth=1.1,
            color=color,
            label=safe_text(s.label),
        )
        if s.lo is not None and s.hi is not None:
            ax.fill_between(s.x, s.lo, s.hi, color=color, alpha=0.15, linewidth=0)


def line_panels(
    panels: Sequence[dict[str, Any]],
    *,
    salt: str,
    label: str,
    width: float = 10.0,
    height: float = 3.4,
) -> str:
    """Side-by-side line plots with one shared legend below them.

    Each panel is a dict with ``series``, ``title``, ``xlabel``, ``ylabel``, ``logx``, ``logy``
    and optionally ``xticks`` (values labelled plainly, e.g. the audited eps) or ``base2``
    (a log2 x axis with plain labels, for positions).
    """
    fig = new_figure(width, height)
    with matplotlib.rc_context(RC):
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, panel in zip(axes, panels, strict=True):
            _plot_series(ax, panel["series"])
            ax.set_title(safe_text(panel["title"]), loc="left")
            ax.set_xlabel(safe_text(panel["xlabel"]))
            ax.set_ylabel(safe_text(panel["ylabel"]))
            if panel.get("logx"):
                ax.set_xscale("log", base=2 if panel.get("base2") else 10)
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.xaxis.set_major_formatter(PLAIN_TICKS)
            if panel.get("xticks"):
                ax.set_xticks(list(panel["xticks"]))
                ax.xaxis.set_minor_locator(NullLocator())
            if panel.get("logy"):
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(PLAIN_TICKS)
            ax.grid(True, which="major", linewidth=0.4, alpha=0.5)
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), frameon=False)
        fig.subplots_adjust(left=0.07, right=0.99, top=0.9, bottom=0.34, wspace=0.22)
    return svg_text(fig, salt, label)


def scaling_figure(
    series: Sequence[Series], exponents: Sequence[float], *, eps: str, salt: str
) -> str:
    """Plot log k against log n for chosen heads (points and fitted lines) and the spread of C."""
    fig = new_figure(10.0, 3.4)
    with matplotlib.rc_context(RC):
        ax, hist = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        _plot_series(ax, series)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(PLAIN_TICKS)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(PLAIN_TICKS)
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(safe_text(f"mean k at eps={eps}"))
        ax.set_title("k = alpha * n^C: measured (points), fitted (lines)", loc="left")
        ax.grid(True, linewidth=0.4, alpha=0.5)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower left", ncol=4, frameon=False)
        if exponents:
            hist.hist(
                list(exponents),
                bins=min(30, max(5, len(exponents) // 4)),
                color=PALETTE[0],
                alpha=0.8,
            )
        hist.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        hist.set_xlabel("fitted exponent C (1 = no sub-linear sparsity)")
        hist.set_ylabel("heads")
        hist.set_title("C over all heads", loc="left")
        fig.subplots_adjust(left=0.07, right=0.99, top=0.9, bottom=0.36, wspace=0.25)
    return svg_text(fig, salt, "scaling of k with sequence length")


def qq_grid(panels: Sequence[dict[str, Any]], *, salt: str) -> str:
    """QQ plots, one per panel: ``points`` [[theoretical, observed]...], ``title``, ``worst``."""
    cols = min(3, max(1, len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig = new_figure(3.3 * cols, 2.6 * rows + 0.2)
    with matplotlib.rc_context(RC):
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        for ax, panel in zip(axes.flat, panels, strict=False):
            pts = [(float(p[0]), float(p[1])) for p in panel["points"] if len(p) >= 2]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            color = PALETTE[3] if panel.get("worst") else PALETTE[2]
            ax.scatter(xs, ys, s=5, color=color, linewidths=0)
            if pts:
                lo, hi = min(xs + ys), max(xs + ys)
                ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--")
            ax.set_title(safe_text(panel["title"]), loc="left")
            if panel.get("chi2"):
                ax.set_xlabel("chi-square quantile")
                ax.set_ylabel("squared Mahalanobis distance")
            else:
                ax.set_xlabel("theoretical quantile")
                ax.set_ylabel("observed quantile")
        fig.subplots_adjust(left=0.08, right=0.98, top=0.9, bottom=0.16, hspace=0.55, wspace=0.3)
    return svg_text(fig, salt, "QQ plots of the least and most Gaussian heads")


def scatter_pred(
    series: dict[str, Sequence[tuple[float, float, int]]], *, eps: str, salt: str
) -> str:
    """Predicted against measured k (log-log), one marker per series, coloured by layer.

    ``series`` maps a legend label to (measured, predicted, layer) points.
    """
    fig = new_figure(6.4, 4.6)
    markers = ("o", "^", "s", "D")
    with matplotlib.rc_context(RC):
        ax = fig.add_axes((0.11, 0.12, 0.7, 0.78))
        layers = [p[2] for pts in series.values() for p in pts] or [0]
        norm = Normalize(vmin=min(layers), vmax=max(max(layers), min(layers) + 1))
        points = None
        for i, (label, pts) in enumerate(series.items()):
            points = ax.scatter(
                [p[0] for p in pts],
                [p[1] for p in pts],
                c=[p[2] for p in pts],
                cmap="viridis",
                norm=norm,
                s=10,
                marker=markers[i % len(markers)],
                linewidths=0,
                label=safe_text(label),
            )
        values = [v for pts in series.values() for p in pts for v in p[:2] if v > 0]
        if values:
            lo, hi = min(values), max(values)
            ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(PLAIN_TICKS)
            ax.yaxis.set_major_formatter(PLAIN_TICKS)
        ax.set_xlabel(safe_text(f"measured mean k at eps={eps}"))
        ax.set_ylabel(safe_text(f"Gaussian-predicted k at eps={eps}"))
        ax.set_title("prediction against measurement (dashed: equal)", loc="left")
        if len(series) > 1:
            ax.legend(loc="upper left", frameon=False)
        if points is not None:
            bar = fig.colorbar(points, cax=fig.add_axes((0.85, 0.12, 0.025, 0.78)))
            bar.set_label("layer")
    return svg_text(fig, salt, "predicted against measured k")
