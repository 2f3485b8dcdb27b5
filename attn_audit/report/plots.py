"""Matplotlib figure builders for the HTML report, each returning inline SVG text.

Why matplotlib rendered to inline SVG (and not a JavaScript plotting library, hand-written SVG or
PNG files):

* **Offline and self-contained.** The figures are part of the HTML text; the page makes no request
  (no CDN, no web font, no script bundle), so it opens from a laptop, an air-gapped cluster, a CI
  artefact or an e-mail attachment, and a strict Content-Security-Policy can forbid every fetch.
* **No JavaScript bundle.** A plotting library such as Plotly or Vega would add 1-4 MB of
  minified JS to every report and a second toolchain to audit; matplotlib is already a dependency
  of the analysis and runs in the same process. The page's own JS is a few dozen lines
  (eps selector, hover read-out, sortable table) and the report reads fine without it.
* **Small and printable.** SVG stays sharp on screen and paper; with ``svg.fonttype = "none"``
  text stays text (searchable, selectable, escaped by matplotlib's XML writer) and heatmaps are
  embedded as tiny PNGs of one pixel per head, so a 30-layer x 9-head model's report is a few
  hundred kB.
* **Reproducible.** Fixed hash salts and no timestamp give byte-identical output for the same
  result, which keeps diffs and tests meaningful.

Figures use matplotlib's object API (:class:`matplotlib.figure.Figure`, never pyplot), so no
global figure state is touched and nothing needs closing beyond dropping the figure. Text passed
to matplotlib is built here from numbers and head labels; strings from the model or the data are
never drawn (and ``$`` is escaped so nothing can trigger mathtext).
"""

from __future__ import annotations

import io
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np

if "matplotlib.pyplot" not in sys.modules:  # do not switch the backend under a live pyplot session
    matplotlib.use("Agg")

from matplotlib.colors import ListedColormap, Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator  # noqa: E402

#: Tick labels as plain numbers (0.05, 128, 1000) instead of powers of ten.
_PLAIN = FuncFormatter(lambda value, _pos: f"{value:g}")

__all__ = [
    "HeatmapSvg",
    "Series",
    "categorical_heatmap",
    "heatmap",
    "heatmaps",
    "line_panels",
    "qq_grid",
    "scaling_figure",
    "scatter_pred",
    "svg_text",
]

#: Colours of the verdict letters, in the order of ``VERDICT_CODES``.
VERDICT_CODES = ("-", "G", "?", "S", "H", "O", "L")
# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies).
VERDICT_COLORS = ("#d9d9d9", "#009E73", "#56B4E9", "#F0E442", "#D55E00", "#CC79A7", "#0072B2")
_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)

_RC: Any = {
    "svg.fonttype": "none",
    "svg.image_inline": True,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 8.5,
    "axes.titlesize": 9.5,
    "axes.labelsize": 8.5,
    "legend.fontsize": 7.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "path.simplify": True,
}

# Values are written into heatmap cells only for small grids: each label is an SVG <text> that
# costs ~0.5 ms to lay out and ~200 bytes; bigger grids rely on the hover read-out and the table.
_LABEL_CELLS = 150
_LETTER_CELLS = 300  # verdict letters (colour-blind readers need them) up to this many cells


def _safe(text: str) -> str:
    """Text for matplotlib: ``$`` escaped so it is never read as mathtext."""
    return text.replace("$", r"\$")


def svg_text(fig: Figure, salt: str, label: str, clear: bool = True) -> str:
    """Render ``fig`` to SVG markup for inlining in HTML.

    ``salt`` makes the SVG's internal ids (clip paths, images) unique within the page; the XML
    prolog, DOCTYPE, metadata and namespace declarations are dropped (inline SVG in HTML does not
    need them, and the page then holds no http URL at all). ``clear`` empties the figure after.
    """
    buf = io.StringIO()
    rc: Any = {**_RC, "svg.hashsalt": salt}
    with matplotlib.rc_context(rc):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    if clear:
        fig.clear()
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text)
    text = re.sub(r'\s+version="1\.1"', "", text, count=1)
    label = label.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
    return text.replace("<svg", f'<svg role="img" aria-label="{label}"', 1).strip()


def _figure(width: float, height: float) -> Figure:
    with matplotlib.rc_context(_RC):
        return Figure(figsize=(width, height))


@dataclass(frozen=True)
class HeatmapSvg:
    """An inline SVG heatmap and where its cells lie, for the page's hover read-out.

    ``box`` is (left, top, right, bottom) of the image in fractions of the SVG's size, measured
    from the top-left corner; cell (row, col) covers an equal share of it.
    """

    svg: str
    box: tuple[float, float, float, float]
    rows: int
    cols: int


def _grid_figure(
    rows: int, cols: int, legend_h: float = 0.0
) -> tuple[Figure, Any, tuple[float, float, float, float]]:
    """A figure with one axes sized for a rows x cols grid (layers across, heads down)."""
    width = min(11.0, max(6.0, 2.2 + 0.27 * cols))
    height = min(9.0, max(2.3, 1.0 + 0.24 * rows)) + legend_h
    left, right, top, bottom = 0.55, 1.25, 0.32, 0.5 + legend_h
    fig = _figure(width, height)
    x0, x1 = left / width, 1 - right / width
    y0, y1 = bottom / height, 1 - top / height
    with matplotlib.rc_context(_RC):
        ax = fig.add_axes((x0, y0, x1 - x0, y1 - y0))
    return fig, ax, (x0, 1 - y1, x1, 1 - y0)


def _ticks(ax: Any, rows: int, cols: int) -> None:
    # Tick creation dominates the cost of a heatmap: label at most ~16 layers and ~24 heads.
    step_c = max(1, math.ceil(cols / 16))
    step_r = max(1, math.ceil(rows / 24))
    ax.set_xticks(range(0, cols, step_c))
    ax.set_yticks(range(0, rows, step_r))
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    ax.tick_params(length=2, pad=1.5)


def labelled(rows: int, cols: int) -> bool:
    """Whether a numeric heatmap of this size gets its values written into the cells."""
    return rows * cols <= _LABEL_CELLS


def _masked(values: Sequence[Sequence[float | None]]) -> Any:
    return np.ma.masked_invalid(
        np.array([[np.nan if v is None else v for v in r] for r in values], dtype=float)
    )


def heatmaps(
    panels: Sequence[tuple[Sequence[Sequence[float | None]], str, str]],
    *,
    colorbar_label: str,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    cell_format: str = "{:.0f}",
    cell_scale: float = 1.0,
) -> list[HeatmapSvg]:
    """Layer x head heatmaps on one colour scale, one per (values, title, salt) panel.

    ``values[row][col]`` is head ``row`` of layer ``col`` (None: no data). The panels share one
    figure, redrawn with each panel's data (building the axes and ticks is most of the cost).
    Cells are labelled (``cell_format`` of value x ``cell_scale``) when the grid is small
    enough; the page's hover read-out gives the exact numbers either way.
    """
    if not panels:
        return []
    arrays = [_masked(values) for values, _, _ in panels]
    rows, cols = arrays[0].shape if arrays[0].ndim == 2 else (0, 0)
    every = np.concatenate([np.asarray(a.compressed(), dtype=float) for a in arrays])
    lo = vmin if vmin is not None else (float(every.min()) if every.size else 0.0)
    hi = vmax if vmax is not None else (float(every.max()) if every.size else 1.0)
    norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)
    fig, ax, box = _grid_figure(rows, cols)
    out = []
    with matplotlib.rc_context(_RC):
        colormap = matplotlib.colormaps[cmap].with_extremes(bad="#e0e0e0")
        image = ax.imshow(arrays[0], aspect="auto", interpolation="none", cmap=colormap, norm=norm)
        _ticks(ax, rows, cols)
        cax = fig.add_axes((box[2] + 0.012, 1 - box[3], 0.014, box[3] - box[1]))
        fig.colorbar(image, cax=cax).set_label(_safe(colorbar_label))
        for arr, (_, title, salt) in zip(arrays, panels, strict=True):
            image.set_data(arr)
            ax.set_title(_safe(title), loc="left")
            labels = []
            if labelled(rows, cols):
                mask = np.ma.getmaskarray(arr)
                for r, c in zip(*np.nonzero(~mask), strict=True):
                    value = float(arr[r, c])
                    labels.append(
                        ax.text(
                            c,
                            r,
                            cell_format.format(value * cell_scale),
                            ha="center",
                            va="center",
                            fontsize=6.5,
                            color="white" if norm(value) < 0.6 else "black",
                        )
                    )
            out.append(HeatmapSvg(svg_text(fig, salt, title, clear=False), box, rows, cols))
            for label in labels:
                label.remove()
    fig.clear()
    return out


def heatmap(
    values: Sequence[Sequence[float | None]],
    *,
    title: str,
    colorbar_label: str,
    salt: str,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    cell_format: str = "{:.0f}",
    cell_scale: float = 1.0,
) -> HeatmapSvg:
    """One layer x head heatmap (see :func:`heatmaps`)."""
    return heatmaps(
        [(values, title, salt)],
        colorbar_label=colorbar_label,
        vmin=vmin,
        vmax=vmax,
        cmap=cmap,
        cell_format=cell_format,
        cell_scale=cell_scale,
    )[0]


def categorical_heatmap(
    codes: Sequence[Sequence[str]], *, title: str, names: dict[str, str], salt: str
) -> HeatmapSvg:
    """A layer x head map of verdict letters (see ``VERDICT_CODES``), with a legend."""
    rows, cols = len(codes), len(codes[0]) if codes else 0
    index = {code: i for i, code in enumerate(VERDICT_CODES)}
    arr = np.array([[index.get(c, 2) for c in r] for r in codes], dtype=float)
    fig, ax, box = _grid_figure(rows, cols, legend_h=0.3)
    with matplotlib.rc_context(_RC):
        cmap = ListedColormap(list(VERDICT_COLORS))
        ax.imshow(
            arr,
            aspect="auto",
            interpolation="none",
            cmap=cmap,
            vmin=-0.5,
            vmax=len(VERDICT_CODES) - 0.5,
        )
        _ticks(ax, rows, cols)
        ax.set_title(_safe(title), loc="left")
        if rows * cols <= _LETTER_CELLS:
            for r in range(rows):
                for c in range(cols):
                    code = codes[r][c]
                    ax.text(
                        c,
                        r,
                        code,
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="black" if code in ("-", "?", "S", "O") else "white",
                    )
        used = [c for c in VERDICT_CODES if any(c in row for row in codes)]
        handles = [
            Patch(color=VERDICT_COLORS[index[c]], label=f"{c} {names.get(c, c)}") for c in used
        ]
        fig.legend(
            handles=handles,
            loc="lower left",
            ncol=min(len(handles), 6),
            frameon=False,
            bbox_to_anchor=(box[0], 0.0),
            handlelength=1.0,
            columnspacing=1.2,
        )
    return HeatmapSvg(svg_text(fig, salt, title), box, rows, cols)


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
        color = _PALETTE[s.color % len(_PALETTE)]
        style = "--" if s.dashed else "-"
        ax.plot(
            s.x,
            s.y,
            style,
            marker="o",
            markersize=2.5,
            linewidth=1.1,
            color=color,
            label=_safe(s.label),
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
    fig = _figure(width, height)
    with matplotlib.rc_context(_RC):
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, panel in zip(axes, panels, strict=True):
            _plot_series(ax, panel["series"])
            ax.set_title(_safe(panel["title"]), loc="left")
            ax.set_xlabel(_safe(panel["xlabel"]))
            ax.set_ylabel(_safe(panel["ylabel"]))
            if panel.get("logx"):
                ax.set_xscale("log", base=2 if panel.get("base2") else 10)
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.xaxis.set_major_formatter(_PLAIN)
            if panel.get("xticks"):
                ax.set_xticks(list(panel["xticks"]))
                ax.xaxis.set_minor_locator(NullLocator())
            if panel.get("logy"):
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(_PLAIN)
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
    fig = _figure(10.0, 3.4)
    with matplotlib.rc_context(_RC):
        ax, hist = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        _plot_series(ax, series)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(_PLAIN)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(_PLAIN)
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(_safe(f"mean k at eps={eps}"))
        ax.set_title("k = alpha * n^C: measured (points), fitted (lines)", loc="left")
        ax.grid(True, linewidth=0.4, alpha=0.5)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower left", ncol=4, frameon=False)
        if exponents:
            hist.hist(
                list(exponents),
                bins=min(30, max(5, len(exponents) // 4)),
                color=_PALETTE[0],
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
    fig = _figure(3.3 * cols, 2.6 * rows + 0.2)
    with matplotlib.rc_context(_RC):
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        for ax, panel in zip(axes.flat, panels, strict=False):
            pts = [(float(p[0]), float(p[1])) for p in panel["points"] if len(p) >= 2]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            color = _PALETTE[3] if panel.get("worst") else _PALETTE[2]
            ax.scatter(xs, ys, s=5, color=color, linewidths=0)
            if pts:
                lo, hi = min(xs + ys), max(xs + ys)
                ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--")
            ax.set_title(_safe(panel["title"]), loc="left")
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
    fig = _figure(6.4, 4.6)
    markers = ("o", "^", "s", "D")
    with matplotlib.rc_context(_RC):
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
                label=_safe(label),
            )
        values = [v for pts in series.values() for p in pts for v in p[:2] if v > 0]
        if values:
            lo, hi = min(values), max(values)
            ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(_PLAIN)
            ax.yaxis.set_major_formatter(_PLAIN)
        ax.set_xlabel(_safe(f"measured mean k at eps={eps}"))
        ax.set_ylabel(_safe(f"Gaussian-predicted k at eps={eps}"))
        ax.set_title("prediction against measurement (dashed: equal)", loc="left")
        if len(series) > 1:
            ax.legend(loc="upper left", frameon=False)
        if points is not None:
            bar = fig.colorbar(points, cax=fig.add_axes((0.85, 0.12, 0.025, 0.78)))
            bar.set_label("layer")
    return svg_text(fig, salt, "predicted against measured k")
