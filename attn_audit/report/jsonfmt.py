"""JSON renderer: the result itself, as ``audit.json``.

Named ``jsonfmt`` so it can never shadow the standard library's ``json``. The output is exactly
:meth:`AuditResult.to_json` (strict JSON, NaN written as null), so ``attn-audit --load`` reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attn_audit.result import AuditResult


class JsonRenderer:
    """Render the result as the versioned ``audit.json`` document."""

    name = "json"
    file_extension = "json"

    def render(self, result: AuditResult, **options: Any) -> str:
        """Return ``result.to_json()``; no option changes it."""
        return result.to_json()
