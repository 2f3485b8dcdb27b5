"""``--export duo``: the DuoAttention head pattern.

Files ``duo/full_attention_heads.tsv`` and ``duo/config.json``.

TSV: one row per layer, one tab-separated column per **KV head**, scientific-notation floats in
[0, 1]; higher means keep full attention. DuoAttention clips to [0, 1], then binarises at 0.5
(or at a sparsity quantile): 1 = retrieval head (full KV cache), 0 = streaming head (sinks +
recent window).

Value of KV head ``g`` in layer ``l``::

    gate = m / (m + ε),   m = max over g's query heads of the mean distant mass

where the distant mass is ``bulk_mass_mean``, the attention mass outside the ``run.sinks`` sink
tokens and the ``run.window`` most recent keys, i.e. exactly what a streaming head drops (its TV
error), and
``ε`` is the plan's eps. So the default threshold 0.5 marks a KV head as retrieval exactly when
streaming would lose more than ε of some query head's mass; the map is monotone, so a quantile
binarisation ranks KV heads by distant mass. Heads without mass figures get 1 (keep full).
**From measured patterns** (audits with ``heads[].patterns``): the streaming heads are the
measured ``streaming`` pattern (sink block + window of whole blocks). ``recent_size`` is the
window, in tokens, that the most heads whose kernel plan is ``streaming`` need
(``window_blocks·block``; ``run.window`` rounded up to blocks when no head is streaming),
``sink_size`` the sink block, and ``m`` is the mass that pattern at that window loses (one minus
its measured mean kept mass), so the 0.5 threshold again means "streaming loses more than ε".

``config.json`` carries ``sink_size = run.sinks`` and ``recent_size = run.window`` (the sizes the
masses were measured with) plus an ``attn_audit`` block saying how the values were made.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attn_audit.export.base import ExportError, index_heads, validate_against_model
from attn_audit.rank import distant_mass
from attn_audit.result import AuditResult

TSV = "duo/full_attention_heads.tsv"
CONFIG = "duo/config.json"


def export_duo(
    result: AuditResult, model_info: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """The TSV text (layers x KV heads) and the config dict for ``result``."""
    shape = validate_against_model(model_info or result.model, result.heads)
    summary = result.data.get("plan_summary") or {}
    eps_key = str(summary.get("eps_key") or result.primary_eps_key)
    eps = float(eps_key)
    sinks, window = int(result.run.get("sinks") or 0), int(result.run.get("window") or 0)
    if window < 1:
        raise ExportError(
            f"DuoAttention needs a recent window >= 1; the audit used window {window}"
        )
    records = index_heads(result.heads)
    measured = _measured_streaming(result, records)
    if measured is not None:
        sinks, window, loss = measured
    rows = []
    for layer in range(shape.num_layers):
        gates = []
        for kv in range(shape.num_kv_heads):
            group = range(kv * shape.group_size, (kv + 1) * shape.group_size)
            masses = [(loss(records[(layer, h)]) if measured is not None else distant_mass(records[(layer, h)]))
                      for h in group]
            known = [m for m in masses if m is not None]
            if len(known) < len(masses):
                gates.append(1.0)  # unknown distant mass: keep full attention
            else:
                m = max(known)
                gates.append(m / (m + eps) if m > 0 else 0.0)
        rows.append("\t".join(f"{g:.6e}" for g in gates))
    config = {
        "sink_size": sinks,
        "recent_size": window,
        "attn_audit": {
            "model": result.model.get("name"),
            "eps": eps_key,
            "seq_len": result.run.get("seq_len"),
            "value": "m/(m+eps), m = max over the KV group's query heads of the mean "
            "attention mass "
            "outside sink_size sinks and the recent_size window; 0.5 <=> m = eps"
            + (" (measured streaming pattern, whole blocks)" if measured is not None else ""),
            "layers": shape.num_layers,
            "kv_heads": shape.num_kv_heads,
        },
    }
    return "\n".join(rows) + "\n", config


def _measured_streaming(result: AuditResult, records: Mapping[tuple[int, int], Mapping[str, Any]]) -> Any:
    """(sink_size, recent_size, loss(record)) from the measured streaming pattern, or None."""
    from attn_audit.rank.kernel import kept_mass_at

    kernel = result.data.get("plan") if (result.data.get("plan_summary") or {}).get("kind") == "kernel" else None
    first = next(iter(records.values()), {})
    pats = first.get("patterns") if isinstance(first, Mapping) else None
    if kernel is None or not isinstance(pats, Mapping) or "streaming" not in (pats.get("by_pattern") or {}):
        return None
    block = int(pats["block_size"])
    windows = [int(e["window_blocks"]) for e in kernel if e.get("pattern") == "streaming"]
    if windows:
        level = max(set(windows), key=lambda w: (windows.count(w), -w))
    else:
        level = -(-int(result.run.get("window") or block) // block)
    level = max(level, 1)  # DuoAttention needs a recent window

    def loss(rec: Mapping[str, Any]) -> float | None:
        kept = kept_mass_at(rec, "streaming", level)
        return None if kept is None else max(0.0, 1.0 - float(kept))

    return block, level * block, loss


def render(result: AuditResult, model_info: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The files of this export: ``{relative path: text}``."""
    tsv, config = export_duo(result, model_info)
    return {TSV: tsv, CONFIG: json.dumps(config, indent=1) + "\n"}


DEFAULT_SIZES = {"sink_size": 64, "recent_size": 256}  # assumed when a TSV comes without config.json


def read_duo(
    directory: str | Path, model_info: Mapping[str, Any], *, require_config: bool = True
) -> tuple[list[list[float]], dict[str, Any]]:
    """Load ``full_attention_heads.tsv`` and ``config.json`` from ``directory`` (the ``duo`` folder,
    the export root, or the TSV file itself) and check them against the model; raises
    :class:`ExportError`. Without ``require_config`` a missing ``config.json`` gives
    :data:`DEFAULT_SIZES` (recorded under ``"assumed"``)."""
    d = Path(directory)
    if d.is_file():
        d = d.parent
    if not (d / "full_attention_heads.tsv").exists() and (d / "duo").is_dir():
        d = d / "duo"
    shape = validate_against_model(model_info)
    tsv, cfg = d / "full_attention_heads.tsv", d / "config.json"
    try:
        lines = tsv.read_text(encoding="utf-8").splitlines()
        if require_config or cfg.exists():
            config = json.loads(cfg.read_text(encoding="utf-8"))
        else:
            config = {**DEFAULT_SIZES, "assumed": sorted(DEFAULT_SIZES)}
    except (OSError, ValueError) as exc:
        raise ExportError(f"{d}: cannot read a DuoAttention pattern ({exc})") from None
    lines = [line for line in lines if line.strip()]
    if len(lines) != shape.num_layers:
        raise ExportError(f"{tsv}: {len(lines)} rows, but the model has {shape.num_layers} layers")
    matrix = []
    for layer, line in enumerate(lines):
        cells = line.split("\t")
        if len(cells) != shape.num_kv_heads:
            raise ExportError(
                f"{tsv}: row {layer} has {len(cells)} columns, "
                f"the model has {shape.num_kv_heads} KV heads"
            )
        try:
            values = [float(c) for c in cells]
        except ValueError:
            raise ExportError(f"{tsv}: row {layer} holds a non-number: {line!r}") from None
        for kv, v in enumerate(values):
            if not math.isfinite(v) or not 0.0 <= v <= 1.0:
                raise ExportError(f"{tsv}: layer {layer}, KV head {kv}: value {cells[kv].strip()} is outside [0, 1]")
        matrix.append(values)
    if not isinstance(config, dict):
        raise ExportError(f"{cfg}: expected a JSON object")
    for key, low in (("sink_size", 0), ("recent_size", 1)):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ExportError(f"{cfg}: {key} must be an integer >= {low}, got {value!r}")
    return matrix, config
