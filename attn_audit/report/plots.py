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

This module holds what every figure shares: the style (:data:`RC`, :data:`PALETTE`), figure
creation and the SVG export (:func:`svg_text`). The figures themselves are built in
:mod:`attn_audit.report.plots_heatmaps` (layer x head maps) and :mod:`attn_audit.report.plots_xy`
(line panels, scaling, QQ and prediction plots).
"""

from __future__ import annotations

import io
import re
import sys
from typing import Any

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # do not switch the backend under a live pyplot session
    matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

#: Tick labels as plain numbers (0.05, 128, 1000) instead of powers of ten.
PLAIN_TICKS = FuncFormatter(lambda value, _pos: f"{value:g}")

__all__ = ["PALETTE", "PLAIN_TICKS", "RC", "new_figure", "safe_text", "svg_text"]

#: Line and marker colours (matplotlib's tab10), indexed by ``Series.color``.
PALETTE = (
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

#: rcParams every figure is built and saved under (text stays text in the SVG).
RC: Any = {
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


def safe_text(text: str) -> str:
    """Text for matplotlib: ``$`` escaped so it is never read as mathtext."""
    return text.replace("$", r"\$")


def svg_text(fig: Figure, salt: str, label: str, clear: bool = True) -> str:
    """Render ``fig`` to SVG markup for inlining in HTML.

    ``salt`` makes the SVG's internal ids (clip paths, images) unique within the page; the XML
    prolog, DOCTYPE, metadata and namespace declarations are dropped (inline SVG in HTML does not
    need them, and the page then holds no http URL at all). ``clear`` empties the figure after.
    """
    buf = io.StringIO()
    rc: Any = {**RC, "svg.hashsalt": salt}
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


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches in the report's style (object API, no pyplot)."""
    with matplotlib.rc_context(RC):
        return Figure(figsize=(width, height))
