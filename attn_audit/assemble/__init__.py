"""Stage ``assemble``: per-length capture summaries become one record per layer and query head.

``sparsity`` (k_eps quantiles, masses, bootstrap intervals, by position), ``gaussianity`` (runs
:mod:`attn_audit.stats` on the reservoirs), ``theory`` (predicted k, R bounds, correlations, the
n^C fit from :mod:`attn_audit.theory`), ``records`` (puts them together).
"""

from __future__ import annotations

from attn_audit.assemble.records import assemble

__all__ = ["assemble"]
