"""attn-audit: audit transformer attention for sparse-attention deployment.

Public API (importing this package does not import torch):

- :func:`audit` (model, tokenizer, dataset, config) -> :class:`AuditResult`
- :func:`run_audit` (model name, ...) loads the model and data, then audits
- :class:`AuditConfig`, :class:`AuditResult`
- :func:`assess_gaussianity` for your own (n, d) activations
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["AuditConfig", "AuditResult", "assess_gaussianity", "audit", "run_audit", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy imports keep `import attn_audit` (and `--load`) free of torch.
    if name == "audit":
        from attn_audit.api import audit

        return audit
    if name == "run_audit":
        from attn_audit.api import run_audit

        return run_audit
    if name == "AuditConfig":
        from attn_audit.config import AuditConfig

        return AuditConfig
    if name == "AuditResult":
        from attn_audit.result import AuditResult

        return AuditResult
    if name == "assess_gaussianity":
        from attn_audit.stats import assess_gaussianity

        return assess_gaussianity
    raise AttributeError(f"module 'attn_audit' has no attribute {name!r}")
