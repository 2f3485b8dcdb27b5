"""Stage ``stats``: is each head's Q, K (or standardized row logits) Gaussian-like?

Pure numpy/scipy, no torch. :func:`assess_gaussianity` takes a sample matrix ``(n, d)`` and
returns a :class:`GaussianityResult` with per-coordinate statistics, multivariate tests and a
verdict from effect sizes (docs/methods.md §4). Modules, in the order the assessment runs:
``marginal`` (per-coordinate moments and distances), ``normality_tests`` (p-values),
``multiple_testing`` (Benjamini-Hochberg), ``whitening``, ``mardia``, ``henze_zirkler``
(multivariate), ``rules`` (thresholds and departures), ``verdict`` (the result type),
``assess`` (the driver), ``distributions`` (null laws from ``scipy.special``).
"""

from __future__ import annotations

from attn_audit.stats.assess import assess_gaussianity, assess_gaussianity_batch
from attn_audit.stats.marginal import (
    CoordinateStats,
    coordinate_stats,
    coordinate_stats_many,
)
from attn_audit.stats.multiple_testing import bh_adjust, bh_adjust_joint, bh_adjust_rows
from attn_audit.stats.normality_tests import TESTS
from attn_audit.stats.rules import GaussianityThresholds
from attn_audit.stats.verdict import VERDICTS, GaussianityResult, Verdict, to_plain

__all__ = [
    "TESTS", "VERDICTS", "CoordinateStats", "GaussianityResult", "GaussianityThresholds", "Verdict",
    "assess_gaussianity", "assess_gaussianity_batch", "bh_adjust", "bh_adjust_joint", "bh_adjust_rows",
    "coordinate_stats", "coordinate_stats_many", "to_plain",
]  # fmt: skip
