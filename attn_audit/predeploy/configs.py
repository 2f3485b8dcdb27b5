"""Read a third-party pattern config, check it against the model, and turn it into per-head
:class:`~attn_audit.predeploy.patterns.Pattern` s.

Accepted (``--check-config FILE``), detected from the file:

- a MInference pattern JSON (a list per layer of ``{"head": [pattern, vertical_size, slash_size,
  score]}``), read by :func:`attn_audit.export.read_minference` (every head present, known patterns,
  positive sizes, ``score`` in [0, 1]). Runtime semantics: ``vertical_and_slash`` keeps at least 30
  columns and 50 diagonals (MInference clamps), estimated from the last 64 queries with the first
  30 columns and the last 100 diagonals always in; ``stream_llm`` keeps ``vertical_size`` initial
  keys and a window of ``slash_size``; ``block_sparse`` keeps the top 100 key blocks of 64 per
  query block (the kernel ignores the sizes);
- a DuoAttention ``full_attention_heads.tsv`` (layers x KV heads; ``config.json`` beside it gives
  ``sink_size`` / ``recent_size``, optionally ``deploy_sink_size`` / ``deploy_recent_size``), read
  by :func:`attn_audit.export.read_duo`; a gate below 0.5 makes the KV head's query heads streaming;
- an attn-audit ``flex_plan.json`` (``"format": "attn-audit/flex-plan"``): per layer and query head
  ``{"pattern": "dense" | "streaming" | "block-topk" | "vertical-slash", budgets}``; streaming
  windows and sinks are given in blocks of ``block_size``.

Every error is an :class:`~attn_audit.export.ExportError` (exit 2) whose one line names the file
and the entry (layer, head, field).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attn_audit.errors import ConfigError
from attn_audit.export import (
    ExportError,
    read_duo,
    read_minference,
    validate_against_model,
)
from attn_audit.predeploy.patterns import Pattern

FLEX_FORMAT = "attn-audit/flex-plan"
FLEX_BUDGETS = {
    "dense": (),
    "streaming": ("sink_blocks", "window_blocks"),
    "block-topk": ("blocks",),
    "vertical-slash": ("vertical_size", "slash_size"),
}
DUO_THRESHOLD = 0.5


def detect_format(path: str | Path) -> str:
    """``"minference"``, ``"duo"`` or ``"flex"`` from the file (or folder); :class:`ConfigError`
    if it is none of them. Reads only the file, so it runs before any model is loaded."""
    p = Path(path)
    if p.is_dir():
        for name, fmt in (("full_attention_heads.tsv", "duo"), ("flex_plan.json", "flex"),
                          ("minference.json", "minference")):
            if (p / name).is_file() or (p / "duo" / name).is_file():
                return fmt
        raise ConfigError(f"--check-config {p}: the folder holds no full_attention_heads.tsv, flex_plan.json "
                          "or minference.json")
    if not p.is_file():
        raise ConfigError(f"--check-config {p}: no such file")
    if p.suffix.lower() == ".tsv":
        return "duo"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--check-config {p}: not a JSON or TSV pattern file ({type(exc).__name__})") from None
    if isinstance(data, dict) and data.get("format") == FLEX_FORMAT:
        return "flex"
    if isinstance(data, list):
        return "minference"
    raise ConfigError(f"--check-config {p}: not a MInference pattern list, a DuoAttention TSV or a flex plan")


def _minference(path: Path, info: Mapping[str, Any]) -> dict[tuple[int, int], Pattern]:
    out = {}
    for layer, entry in enumerate(read_minference(path, info)):
        for head, (kind, vertical, slash, _score) in entry.items():
            if kind == "vertical_and_slash":
                p = Pattern("vertical-slash", vertical=max(30, vertical), slash=max(50, slash),
                            forced_vertical=30, forced_slash=100)
            elif kind == "stream_llm":
                p = Pattern("streaming", sinks=vertical, window=slash)
            else:  # block_sparse: the kernel keeps a fixed top 100 blocks of 64
                p = Pattern("block-topk", blocks=100, block_size=64)
            out[(layer, int(head))] = p
    return out


def _duo(path: Path, info: Mapping[str, Any]) -> tuple[dict[tuple[int, int], Pattern], dict[str, Any]]:
    matrix, config = read_duo(path, info, require_config=False)
    shape = validate_against_model(info)
    sinks = config.get("deploy_sink_size", config["sink_size"])
    recent = config.get("deploy_recent_size", config["recent_size"])
    out = {}
    for layer, row in enumerate(matrix):
        for kv, gate in enumerate(row):
            for h in range(kv * shape.group_size, (kv + 1) * shape.group_size):
                out[(layer, h)] = (Pattern("streaming", sinks=int(sinks), window=int(recent))
                                   if gate < DUO_THRESHOLD else Pattern("dense"))
    return out, {"sink_size": sinks, "recent_size": recent, "threshold": DUO_THRESHOLD,
                 "assumed": config.get("assumed", [])}


def _flex(path: Path, info: Mapping[str, Any]) -> tuple[dict[tuple[int, int], Pattern], dict[str, Any]]:
    p = path / "flex_plan.json" if path.is_dir() else path
    where = str(p)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{where}: cannot read a flex plan ({exc})") from None
    shape = validate_against_model(info)
    block = data.get("block_size")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ExportError(f"{where}: block_size must be a positive integer, got {block!r}")
    layers = data.get("layers")
    if not isinstance(layers, list) or len(layers) != shape.num_layers:
        got = len(layers) if isinstance(layers, list) else type(layers).__name__
        raise ExportError(f"{where}: {got} layers, but the model has {shape.num_layers}")
    want = {str(h) for h in range(shape.num_heads)}
    out = {}
    for layer, entry in enumerate(layers):
        if not isinstance(entry, dict) or set(entry) != want:
            raise ExportError(f"{where}: layer {layer} must map query heads '0'..'{shape.num_heads - 1}' "
                              f"(the model has {shape.num_heads})")
        for head, value in entry.items():
            kind = value.get("pattern") if isinstance(value, dict) else None
            if kind not in FLEX_BUDGETS:
                raise ExportError(f"{where}: layer {layer}, head {head}: unknown pattern {kind!r} "
                                  f"(known: {', '.join(FLEX_BUDGETS)})")
            for name in FLEX_BUDGETS[kind]:
                v = value.get(name)
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ExportError(f"{where}: layer {layer}, head {head}: {name} must be an integer >= 0, "
                                      f"got {v!r}")
            b = dict(value)
            out[(layer, int(head))] = {
                "dense": lambda: Pattern("dense"),
                "streaming": lambda: Pattern("streaming", sinks=b["sink_blocks"] * block,
                                             window=b["window_blocks"] * block),
                "block-topk": lambda: Pattern("block-topk", blocks=b["blocks"], block_size=block),
                "vertical-slash": lambda: Pattern("vertical-slash", vertical=b["vertical_size"],
                                                  slash=b["slash_size"]),
            }[kind]()
    return out, {"block_size": block}


def read_config(path: str | Path, info: Mapping[str, Any]) -> tuple[str, dict[tuple[int, int], Pattern],
                                                                     dict[str, Any]]:
    """(format, per (layer, query head) pattern, settings read) of a third-party config checked
    against the model ``info`` (``result.model`` or a Hugging Face config dict)."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "minference":
        target = p / "minference.json" if p.is_dir() else p
        return fmt, _minference(target, info), {}
    if fmt == "duo":
        return (fmt, *_duo(p, info))
    return (fmt, *_flex(p, info))
