"""Report renderers: turn an :class:`~attn_audit.result.AuditResult` into text.

A renderer is a small class with a ``name``, a ``file_extension`` and
``render(result, **options) -> str`` (the shape pyinstrument uses). Renderers see only the result
(never the model), so ``attn-audit --load audit.json`` re-renders without torch. The registry maps
short names to lazy ``"module:Class"`` strings: importing this package imports only the standard
library, and matplotlib (HTML) or rich (terminal) load only when that format is chosen.

The small helpers in :mod:`~attn_audit.report.formatting` (labels, number formatting, verdict
letters) and :mod:`~attn_audit.report.headlines` (the three headline numbers, the verdict line)
are shared by every renderer so that the terminal, Markdown and HTML reports always agree;
:func:`headline` and :func:`verdict_line` are re-exported here as public API.

Formats: ``terminal`` (rich text, the default on stdout), ``json`` (``audit.json``, the result
itself), ``md`` (a GitHub-flavoured pull-request comment) and ``html`` (one self-contained page).
"""

from __future__ import annotations

import importlib
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Protocol

from attn_audit.errors import ConfigError
from attn_audit.report.headlines import headline, verdict_line

if TYPE_CHECKING:
    from attn_audit.result import AuditResult

__all__ = [
    "FORMATS",
    "RENDERERS",
    "Renderer",
    "file_name",
    "for_path",
    "get_renderer",
    "headline",
    "render",
    "verdict_line",
]

FORMATS: tuple[str, ...] = ("terminal", "json", "md", "html")

#: Format name -> "module:Class", imported only when asked for.
RENDERERS: dict[str, str] = {
    "terminal": "attn_audit.report.terminal:TerminalRenderer",
    "json": "attn_audit.report.jsonfmt:JsonRenderer",
    "md": "attn_audit.report.markdown:MarkdownRenderer",
    "html": "attn_audit.report.html:HtmlRenderer",
}

#: File written for each format inside the output directory.
_FILE_NAMES: dict[str, str] = {
    "terminal": "report.txt",
    "json": "audit.json",
    "md": "report.md",
    "html": "report.html",
}

#: Extra spellings accepted by :func:`get_renderer` and :func:`for_path`.
_ALIASES: dict[str, str] = {"markdown": "md", "text": "terminal", "txt": "terminal", "htm": "html"}


class Renderer(Protocol):
    """What every renderer provides."""

    name: str
    file_extension: str

    def render(self, result: AuditResult, **options: Any) -> str:
        """Return the whole report as one string."""
        ...


def _canonical(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in RENDERERS:
        known = ", ".join(FORMATS)
        raise ConfigError(f"unknown report format {name!r} (known: {known})")
    return key


def get_renderer(name: str) -> Renderer:
    """The renderer for format ``name`` ("terminal", "json", "md", "html").

    Raises:
        ConfigError: for an unknown name; the message lists the known ones.
    """
    module_name, _, class_name = RENDERERS[_canonical(name)].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    renderer: Renderer = cls()
    return renderer


def render(result: AuditResult, fmt: str, **options: Any) -> str:
    """``result`` rendered in format ``fmt`` ("terminal", "md", "html", "json")."""
    return get_renderer(fmt).render(result, **options)


def file_name(fmt: str) -> str:
    """The file a format is written to: ``report.md``, ``report.html``, ``audit.json``..."""
    return _FILE_NAMES[_canonical(fmt)]


def for_path(path: str) -> str:
    """The format implied by an output path's extension (``-o out.html`` -> ``"html"``)."""
    suffix = PurePath(path).suffix.lstrip(".").lower()
    try:
        return _canonical(suffix)
    except ConfigError:
        raise ConfigError(
            f"cannot tell the report format from {path!r} (use .txt, .json, .md or .html)"
        ) from None
