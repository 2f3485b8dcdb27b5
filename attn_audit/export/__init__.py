"""Runtime exports: write a sparse-attention configuration that a runtime reads (stdlib only).

Registry :data:`EXPORTERS` (``--export NAME``, repeatable or comma-separated):

- ``minference``: ``<out>/minference.json``, per-layer dicts of per-global-query-head
  ``[pattern, vertical_size, slash_size, score]`` for MInference and the vLLM/SGLang dual-chunk
  backends (:mod:`attn_audit.export.minference`);
- ``flex``: ``<out>/flex_plan.json``, each head's kernel pattern and budgets for
  :func:`attn_audit.apply_plan` (:mod:`attn_audit.export.flex`);
- ``duo``: ``<out>/duo/full_attention_heads.tsv`` (layers x KV heads, higher = keep full attention)
  and ``<out>/duo/config.json`` with ``sink_size`` / ``recent_size`` (:mod:`attn_audit.export.duo`).

Every export is checked against the model config (layer count, query and KV head counts, GQA
divisibility, every head present once) before anything is written, written atomically, then read
back through its validator. Adding a runtime: one module with ``render`` and ``read_*``, one
registry entry, one test that round-trips the files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attn_audit.errors import ConfigError
from attn_audit.export import duo, flex, minference
from attn_audit.export.base import ExportError, ModelShape, validate_against_model
from attn_audit.export.duo import export_duo, read_duo
from attn_audit.export.minference import export_minference, read_minference
from attn_audit.result import AuditResult, atomic_write_text

__all__ = [
    "EXPORTERS",
    "ExportError",
    "Exporter",
    "ModelShape",
    "export_duo",
    "export_minference",
    "parse_export_names",
    "read_duo",
    "read_minference",
    "validate_against_model",
    "write_exports",
]


@dataclass(frozen=True)
class Exporter:
    """One runtime format: the files it writes, how to render them and how to validate them."""

    name: str
    description: str
    files: tuple[str, ...]
    render: Callable[[AuditResult, Mapping[str, Any] | None], dict[str, str]]
    read: Callable[[Path, Mapping[str, Any]], Any]


EXPORTERS: dict[str, Exporter] = {
    "minference": Exporter(
        "minference",
        "MInference / vLLM / SGLang dual-chunk per-head pattern JSON",
        (minference.FILENAME,),
        minference.render,
        lambda out, info: read_minference(out / minference.FILENAME, info),
    ),
    "duo": Exporter(
        "duo",
        "DuoAttention full_attention_heads.tsv + config.json",
        (duo.TSV, duo.CONFIG),
        duo.render,
        lambda out, info: read_duo(out / "duo", info),
    ),
    "flex": Exporter(
        "flex",
        "attn-audit flex_plan.json: per-head kernel patterns for attn_audit.apply_plan (FlexAttention)",
        (flex.FILENAME,),
        flex.render,
        lambda out, info: flex.read_flex(out / flex.FILENAME, info),
    ),
}


def parse_export_names(values: Iterable[str]) -> list[str]:
    """``["minference,duo", "duo"]`` -> ``["minference", "duo"]``; unknown names raise ConfigError.

    Call it while parsing options, before any model is loaded."""
    names: list[str] = []
    for value in values:
        if not str(value).strip(" ,"):
            raise ConfigError("--export is empty; give minference and/or duo")
        for name in str(value).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in EXPORTERS:
                raise ConfigError(f"unknown export {name!r} (known: {', '.join(EXPORTERS)})")
            if name not in names:
                names.append(name)
    return names


def write_exports(
    result: AuditResult,
    names: Iterable[str],
    out_dir: str | Path,
    model_info: Mapping[str, Any] | None = None,
    tp: int | None = None,
) -> list[Path]:
    """Render, validate and atomically write the named exports under ``out_dir``.

    ``model_info`` defaults to ``result.model``; pass the live Hugging Face config to check against
    it instead. All exports are rendered and checked before the first file is written; each file
    set is read back through its validator afterwards. Records ``result.data["exports"]``.
    """
    selected = parse_export_names(names)
    if not selected:
        return []
    info = model_info or result.model
    validate_against_model(info, result.heads, tp=tp)
    rendered = {name: EXPORTERS[name].render(result, info) for name in selected}
    out = Path(out_dir)
    written: list[Path] = []
    record = result.data.setdefault("exports", {})
    for name, files in rendered.items():
        for rel, text in files.items():
            written.append(atomic_write_text(out / rel, text))
        EXPORTERS[name].read(out, info)
        record[name] = {
            "files": sorted(files),
            "target_len": result.data["plan_summary"]["target_len"],
            "eps_key": result.data["plan_summary"]["eps_key"],
        }
    return written
