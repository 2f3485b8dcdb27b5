"""Stage ``rows``: exact per-row sparsity of attention scores (docs/methods.md §2).

:func:`row_metrics` takes the pre-softmax scores of a block of query rows and returns, per row,
the exact mass-based ``k_eps``, tail masses, entropy and the sink / local / bulk split. Modules:
``spec`` (what to measure, what comes back, the bin geometry both kernels share), ``reference``
(the sort-based float64 definition the kernels must match), ``cpu`` + ``cpu_stages`` (the
compiled numba kernel), ``torch_kernel`` + ``torch_stream`` + ``torch_select`` (the vectorised
kernel for any torch device), ``dispatch`` (picks the kernel and redoes rows near a rounding
margin with the reference).
"""

from __future__ import annotations

from attn_audit.rows.dispatch import clear_workspace, row_metrics
from attn_audit.rows.reference import reference_row_metrics
from attn_audit.rows.spec import RowMetrics

__all__ = ["RowMetrics", "clear_workspace", "reference_row_metrics", "row_metrics"]
