"""attn-audit: audit transformer attention for sparse-attention deployment.

Public API (importing this package does not import torch):

- :func:`audit` (model, tokenizer, dataset, config) -> :class:`AuditResult`
- :func:`run_audit` (model name, ...) loads the model and data, then audits
- :class:`AuditConfig` with its :class:`MeasureSpec`, :class:`AuditResult`
- :func:`render` a result as terminal text, Markdown, HTML or JSON
- :func:`assess_gaussianity` for your own (n, d) activations
- :func:`apply_plan` / :func:`remove_plan`: run a plan's kernel patterns in the model (FlexAttention)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it; imported on first use so `import attn_audit` (and
# `attn-audit --load`) stay free of torch
_LAZY = {
    "audit": "attn_audit.api",
    "run_audit": "attn_audit.api",
    "AuditConfig": "attn_audit.config",
    "MeasureSpec": "attn_audit.config",
    "AuditResult": "attn_audit.result",
    "render": "attn_audit.report",
    "assess_gaussianity": "attn_audit.stats",
    "apply_plan": "attn_audit.apply",
    "remove_plan": "attn_audit.apply",
}

__all__ = [*sorted(_LAZY), "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attn_audit' has no attribute {name!r}")
