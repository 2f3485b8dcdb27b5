"""Per-head facts read from a head record, shared by the ranking, the gate and the exports.

Whether the head's Q/K failed a Gaussianity test, how much attention mass lies outside the sinks and
the local window, and whether the sinks saturate it; all read plain head dicts (stdlib only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

SKIPPED_VERDICTS = frozenset({"skipped", "not-assessed", "insufficient-data", "not-tested", "n/a", "unknown"})


def is_non_gaussian(head: Mapping[str, Any]) -> bool | None:
    """Tell whether the head's Q/K failed a Gaussianity test.

    True if some tested site has ``is_gaussian`` False or a verdict other than ``gaussian-like``;
    False if every site was tested and is Gaussian-like; None if there is no site or some site was
    skipped (``verdict`` "skipped", even with ``is_gaussian`` False): a skipped test is evidence
    neither way, so it neither raises the flag nor counts as Gaussian.
    """
    sites = [s for s in (head.get("gaussianity") or {}).values() if isinstance(s, Mapping)]
    undecided = not sites
    for site in sites:
        flag, verdict = site.get("is_gaussian"), site.get("verdict")
        if (
            verdict is None
            and flag is None
            or (
                isinstance(verdict, str)
                and (verdict in SKIPPED_VERDICTS or verdict.startswith("skip"))
            )
        ):
            undecided = True
        elif flag is False or (verdict is not None and verdict != "gaussian-like"):
            return True
    return None if undecided else False


def distant_mass(head: Mapping[str, Any]) -> float | None:
    """Mean mass outside sinks and the local window (bulk, else 1 − sink − local), in [0, 1]."""
    bulk = _num(head.get("bulk_mass_mean"))
    if bulk is None:
        sink, local = _num(head.get("sink_mass_mean")), _num(head.get("local_mass_mean"))
        if sink is None or local is None:
            return None
        bulk = 1.0 - sink - local
    return min(1.0, max(0.0, bulk))


def is_sink_saturated(head: Mapping[str, Any], eps: float) -> bool:
    sink = _num(head.get("sink_mass_mean"))
    return sink is not None and sink > 1.0 - eps


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None
