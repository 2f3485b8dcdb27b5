"""``--export minference``: the per-head pattern JSON of MInference and vLLM/SGLang dual-chunk.

File ``minference.json``: a list with one object per layer, keyed by the **global query-head index**
as a string (``"0"`` .. ``"H-1"``, counted after ``repeat_kv``; every head present, so
tensor-parallel ranks can slice it), each value ``[pattern, vertical_size, slash_size, score]``.

Mapping from the plan (budget ``k`` keys per row at the target length ``N``, ``s = run.sinks``,
``w = run.window``, ``ε`` = the plan's eps):

- planned head whose sink + local-window mass is at least ``1 − ε``: ``["stream_llm", s, w, m]``
  (initial columns and local window; ``m`` = that mass);
- other planned heads: ``["vertical_and_slash", s + ⌈k/2⌉, w + ⌊k/2⌋, 1 − ε]``: vertical
  columns for the sinks plus half the budget, slash diagonals for the local window plus the
  other half. The sink and window terms are a margin for the runtime's last-64-query index
  estimate, which is not an exact top-k;
- unplanned heads stay dense: ``["vertical_and_slash", N, N, 1.0]``.

**From measured patterns** (audits with ``heads[].patterns``, the default): the sizes come from the
measured kernel patterns instead (:func:`measured_entry`): a head whose kernel plan is
``streaming`` becomes ``["stream_llm", sink_blocks·block, window_blocks·block, kept mass]``; any
other head whose measured ``vertical-slash`` level (p90 rows at ``1 − ε``, taken to ``N``) is below
the dense level becomes ``["vertical_and_slash", vertical_size, slash_size, kept mass]`` with the
measured sizes (MInference's own estimate from the last 64 queries, the one the audit measured);
the rest stay dense. The mapping above from ``k`` is used only for audits without patterns.

Sizes are clamped to the runtime minimums, ``vertical ∈ [30, N]`` and ``slash ∈ [50, N]``
(MInference clamps the same way). ``score`` is the expected kept attention mass (recall); runtimes
ignore it. Runtime knob ``minference_ratio`` multiplies both sizes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attn_audit.export.base import ExportError, index_heads, validate_against_model
from attn_audit.rank.kernel import kept_mass_at, measured_level
from attn_audit.result import AuditResult

PATTERNS = ("vertical_and_slash", "stream_llm", "block_sparse")
MIN_VERTICAL, MIN_SLASH = 30, 50
FILENAME = "minference.json"


def _clamp(value: int, low: int, n: int) -> int:
    return min(n, max(low, value))


def export_minference(
    result: AuditResult, model_info: Mapping[str, Any] | None = None
) -> list[dict[str, list[Any]]]:
    """The MInference per-layer list for ``result``'s plan."""
    shape = validate_against_model(model_info or result.model, result.heads)
    if "plan" not in result.data or "plan_summary" not in result.data:
        raise ExportError("the audit has no plan to export; run the audit (or --load a complete audit.json) first")
    summary = result.data["plan_summary"]
    n, eps = int(summary["target_len"]), float(summary["eps_key"])
    sinks, window = int(result.run.get("sinks") or 0), int(result.run.get("window") or 0)
    planned = {(int(p["layer"]), int(p["head"])): p for p in result.data["plan"]}
    records = index_heads(result.heads)
    if summary.get("kind") == "kernel":
        kernel = planned
        return [{str(h): measured_entry(records[(la, h)], kernel.get((la, h)), summary["eps_key"], n)
                 for h in range(shape.num_heads)} for la in range(shape.num_layers)]
    layers: list[dict[str, list[Any]]] = []
    for layer in range(shape.num_layers):
        entry: dict[str, list[Any]] = {}
        for head in range(shape.num_heads):
            plan = planned.get((layer, head))
            if plan is None:
                entry[str(head)] = ["vertical_and_slash", n, n, 1.0]
                continue
            rec = records[(layer, head)]
            local = float(rec.get("sink_mass_mean") or 0.0) + float(
                rec.get("local_mass_mean") or 0.0
            )
            if local >= 1.0 - eps:
                entry[str(head)] = [
                    "stream_llm",
                    _clamp(sinks, MIN_VERTICAL, n),
                    _clamp(window, MIN_SLASH, n),
                    round(min(1.0, local), 6),
                ]
                continue
            k = int(plan["k"])
            vertical = _clamp(sinks + math.ceil(k / 2), MIN_VERTICAL, n)
            slash = _clamp(window + k // 2, MIN_SLASH, n)
            entry[str(head)] = ["vertical_and_slash", vertical, slash, round(1.0 - eps, 6)]
        layers.append(entry)
    return layers


def measured_entry(rec: Mapping[str, Any], kernel: Mapping[str, Any] | None, eps_key: str,
                   n: int) -> list[Any]:
    """One head's ``[pattern, vertical, slash, score]`` from its measured patterns (see above)."""
    if kernel is not None and kernel.get("pattern") == "streaming":
        block = int(kernel["block_size"])
        level = int(kernel["window_blocks"])
        mass = kept_mass_at(rec, "streaming", level)
        return ["stream_llm", _clamp(int(kernel["sink_blocks"]) * block, MIN_VERTICAL, n),
                _clamp(level * block, MIN_SLASH, n), round(float(mass if mass is not None else 1.0), 6)]
    vs = measured_level(rec, "vertical-slash", eps_key, n)
    block = int((rec.get("patterns") or {}).get("block_size") or 1)
    if vs is not None and vs[0] * block < n:
        v, s = vs[0] * block, vs[0] * block
        mass = kept_mass_at(rec, "vertical-slash", vs[0])
        return ["vertical_and_slash", _clamp(v, MIN_VERTICAL, n), _clamp(s, MIN_SLASH, n),
                round(float(mass if mass is not None else 1.0), 6)]
    return ["vertical_and_slash", n, n, 1.0]


def render(result: AuditResult, model_info: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The files of this export: ``{relative path: text}``."""
    return {FILENAME: json.dumps(export_minference(result, model_info)) + "\n"}


def read_minference(path: str | Path, model_info: Mapping[str, Any]) -> list[dict[str, list[Any]]]:
    """Load a MInference pattern file and check it against the model (:class:`ExportError`)."""
    p = Path(path)
    if p.is_dir():
        p = p / FILENAME
    shape = validate_against_model(model_info)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{p}: cannot read a MInference pattern file ({exc})") from None
    if not isinstance(data, list) or len(data) != shape.num_layers:
        got = len(data) if isinstance(data, list) else type(data).__name__
        raise ExportError(f"{p}: expected a list of {shape.num_layers} layers, got {got}")
    want = {str(h) for h in range(shape.num_heads)}
    for layer, entry in enumerate(data):
        if not isinstance(entry, dict) or set(entry) != want:
            keys = sorted(entry, key=str) if isinstance(entry, dict) else entry
            raise ExportError(
                f"{p}: layer {layer} must map query heads '0'..'{shape.num_heads - 1}', got {keys}"
            )
        for head, value in entry.items():
            _check_value(p, layer, head, value)
    return data


def _check_value(p: Path, layer: int, head: str, value: Any) -> None:
    where = f"{p}: layer {layer}, head {head}"
    if not isinstance(value, list) or len(value) != 4:
        raise ExportError(
            f"{where}: expected [pattern, vertical_size, slash_size, score], got {value!r}"
        )
    pattern, vertical, slash, score = value
    if pattern not in PATTERNS:
        raise ExportError(f"{where}: unknown pattern {pattern!r} (known: {', '.join(PATTERNS)})")
    for name, size in (("vertical_size", vertical), ("slash_size", slash)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ExportError(f"{where}: {name} must be a positive integer, got {size!r}")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise ExportError(f"{where}: score must be a finite number, got {score!r}")
    if not 0.0 <= score <= 1.0:  # a recall; some shipped configs carry raw counts (~2e7) here
        raise ExportError(f"{where}: score {score!r} is outside [0, 1] (it is the recalled attention mass)")
