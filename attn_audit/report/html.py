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

This module assembles the page (skeleton, assets, CSP); the sections are rendered by
:mod:`~attn_audit.report.html_overview` (summary, checks, provenance),
:mod:`~attn_audit.report.html_heatmaps` (layer x head maps), :mod:`~attn_audit.report.html_curves`
(k_eps curves, scaling), :mod:`~attn_audit.report.html_theory` (QQ plots, theory) and
:mod:`~attn_audit.report.html_plan` (plan, ranking, groups, verification), from the building
blocks in :mod:`~attn_audit.report.html_page`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from importlib import resources
from string import Template
from typing import TYPE_CHECKING, Any

from attn_audit.report.headlines import headline
from attn_audit.report.html_curves import curves_section, scaling_section
from attn_audit.report.html_heatmaps import heatmaps_section
from attn_audit.report.html_overview import (
    gate_section,
    provenance_footer,
    summary_section,
)
from attn_audit.report.html_page import Page, e
from attn_audit.report.html_plan import (
    config_section,
    groups_section,
    plan_section,
    verify_section,
)
from attn_audit.report.html_theory import qq_section, theory_section

if TYPE_CHECKING:
    from attn_audit.result import AuditResult

__all__ = ["HtmlRenderer"]


def _asset(name: str) -> str:
    return resources.files("attn_audit.report").joinpath("assets", name).read_text("utf-8")


def _json_for_script(data: Any) -> str:
    """JSON that can sit inside <script type="application/json"> (no "</" or "<!--")."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class HtmlRenderer:
    """One self-contained HTML page (inline CSS, JS and SVG; no request leaves it)."""

    name = "html"
    file_extension = "html"

    def render(self, result: AuditResult, **options: Any) -> str:
        """Render the page. No options are needed; unknown ones are ignored."""
        page = Page(result)
        # The checks come first: a reviewer wants to know what failed before anything else.
        sections = [
            gate_section(page),
            heatmaps_section(page),
            curves_section(page),
            scaling_section(page),
            qq_section(page),
            theory_section(page),
            plan_section(page),
            groups_section(page),
            verify_section(page),
            config_section(page),
        ]
        summary = summary_section(page)
        page.toc.append(("provenance", "Provenance"))
        toc = "".join(f'<a href="#{sid}">{e(title)}</a>' for sid, title in page.toc)
        name = str(result.model.get("name", "?"))
        body = (
            f'<header><h1>attn-audit: <span class="mono">{e(name)}</span></h1>'
            f'<p class="sub">{e(headline(result)["gate"])} &middot; created '
            f"{e(result.run.get('created'))}</p>"
            f'<nav class="toc">{toc}</nav></header>'
            f"<main>{summary}{''.join(sections)}</main>{provenance_footer(result)}"
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
