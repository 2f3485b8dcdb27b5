"""Layer x head heatmaps for the HTML report (numeric and verdict-letter maps), as inline SVG.

Layers run across, heads down; each map is returned with where its cells lie in the SVG
(:class:`HeatmapSvg`) so the page's hover read-out can find the head under the pointer. Shared
style and the SVG export are in :mod:`attn_audit.report.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from attn_audit.report.plots import RC, new_figure, safe_text, svg_text

__all__ = [
    "VERDICT_CODES",
    "VERDICT_COLORS",
    "HeatmapSvg",
    "categorical_heatmap",
    "heatmap",
    "heatmaps",
    "labelled",
]

#: Colours of the verdict letters, in the order of ``VERDICT_CODES``.
VERDICT_CODES = ("-", "G", "?", "S", "H", "O", "L")
# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies).
VERDICT_COLORS = ("#d9d9d9", "#009E73", "#56B4E9", "#F0E442", "#D55E00", "#CC79A7", "#0072B2")

# Values are written into heatmap cells only for small grids: each label is an SVG <text> that
# costs ~0.5 ms to lay out and ~200 bytes; bigger grids rely on the hover read-out and the table.
_LABEL_CELLS = 150
_LETTER_CELLS = 300  # verdict letters (colour-blind readers need them) up to this many cells


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
    fig = new_figure(width, height)
    x0, x1 = left / width, 1 - right / width
    y0, y1 = bottom / height, 1 - top / height
    with matplotlib.rc_context(RC):
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
    with matplotlib.rc_context(RC):
        colormap = matplotlib.colormaps[cmap].with_extremes(bad="#e0e0e0")
        image = ax.imshow(arrays[0], aspect="auto", interpolation="none", cmap=colormap, norm=norm)
        _ticks(ax, rows, cols)
        cax = fig.add_axes((box[2] + 0.012, 1 - box[3], 0.014, box[3] - box[1]))
        fig.colorbar(image, cax=cax).set_label(safe_text(colorbar_label))
        for arr, (_, title, salt) in zip(arrays, panels, strict=True):
            image.set_data(arr)
            ax.set_title(safe_text(title), loc="left")
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
    with matplotlib.rc_context(RC):
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
        ax.set_title(safe_text(title), loc="left")
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
