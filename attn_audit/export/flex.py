"""``--export flex``: ``flex_plan.json``, the plan :func:`attn_audit.apply_plan` runs (stdlib only).

Self-describing: the model (name, a hash of its attention shape, layers, heads, KV heads, head
size, causal), the block size, target length and eps, and per layer a dict keyed by the query-head
index (``"0"`` .. ``"H-1"``, every head present) of ``{"pattern": ..., budgets}``:

- ``{"pattern": "dense"}``: the model's own attention;
- ``{"pattern": "streaming", "sink_blocks": 0|1, "window_blocks": w}``;
- ``{"pattern": "block-topk", "blocks": b}``: per query block the diagonal block and the ``b − 1``
  next key blocks by mean-pooled Q·K score, chosen from the current input;
- ``{"pattern": "vertical-slash", "vertical_size": v, "slash_size": s}``: the top ``v`` key
  columns and ``s`` diagonals ranked by the attention of the last 64 queries.

The budgets are the measured p90 levels of ``heads[].patterns`` taken to the target length
(:mod:`attn_audit.rank.kernel`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attn_audit.export.base import ENCODER_DECODER, ExportError, validate_against_model
from attn_audit.result import AuditResult

FILENAME = "flex_plan.json"
FORMAT = "attn-audit/flex-plan"
VERSION = 1
BUDGETS = {
    "dense": (),
    "streaming": ("sink_blocks", "window_blocks"),
    "block-topk": ("blocks",),
    "vertical-slash": ("vertical_size", "slash_size"),
}


def shape_hash(info: Mapping[str, Any]) -> str:
    """A short hash of the attention shape (layers, heads, KV heads, head size): the
    ``config_hash`` a plan file is checked against before it is applied. ``info``: ``result.model``
    or a Hugging Face config dict."""
    shape = validate_against_model(info)
    head_dim = info.get("head_dim") or (int(info.get("hidden_size") or 0) // shape.num_heads)
    key = {"num_layers": shape.num_layers, "num_heads": shape.num_heads,
           "num_kv_heads": shape.num_kv_heads, "head_dim": int(head_dim)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def export_flex(result: AuditResult, model_info: Mapping[str, Any] | None = None,
                heads: int | None = None) -> dict[str, Any]:
    """The ``flex_plan.json`` content for ``result`` (needs ``heads[].patterns``); with ``heads``,
    only the plan's first ``heads`` entries (a prefix of the ranking) run their pattern."""
    summary = result.data.get("plan_summary") or {}
    if summary.get("kind") != "kernel":
        raise ExportError("the audit has no heads[].patterns (audited with --patterns none or an "
                          "older version); re-run the audit to export a flex plan")
    if result.model.get("encoder_decoder"):
        raise ExportError(ENCODER_DECODER)
    info = model_info or result.model
    shape = validate_against_model(info, result.heads)
    by_head = {(e["layer"], e["head"]): e for e in (result.data.get("plan") or [])[:heads]}
    layers = []
    for layer in range(shape.num_layers):
        entry = {}
        for head in range(shape.num_heads):
            e = by_head.get((layer, head), {"pattern": "dense"})
            entry[str(head)] = {"pattern": e["pattern"], **{k: int(e[k]) for k in BUDGETS[e["pattern"]]}}
        layers.append(entry)
    model = result.model
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": {"name": model.get("name"), "config_hash": shape_hash(model),
                  "family": model.get("family"), "num_layers": shape.num_layers,
                  "num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads,
                  "head_dim": model.get("head_dim"), "causal": model.get("causal")},
        "block_size": int(summary["block_size"] or _measured_block(result)),
        "target_len": int(summary["target_len"]),
        "eps": summary["eps_key"],
        "kernel_flops_saving": summary["planned_flops_saving"],
        "layers": layers,
    }


def _measured_block(result: AuditResult) -> int:
    """The block size the patterns were measured with (a plan with no planned head has none)."""
    return int(next(h["patterns"]["block_size"] for h in result.heads if h.get("patterns")))


def render(result: AuditResult, model_info: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The files of this export: ``{relative path: text}``."""
    return {FILENAME: json.dumps(export_flex(result, model_info), indent=1) + "\n"}


def check_flex_plan(data: Any, where: str = FILENAME, model_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate a flex plan dict (and, with ``model_info``, its model shape); :class:`ExportError`."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ExportError(f"{where}: not an attn-audit flex plan (format {FORMAT!r} expected)")
    if data.get("version") != VERSION:
        raise ExportError(f"{where}: flex plan version {data.get('version')!r}, this attn-audit reads {VERSION}")
    block = data.get("block_size")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ExportError(f"{where}: block_size must be a positive integer, got {block!r}")
    m = data.get("model") or {}
    if model_info is not None:
        want = shape_hash(model_info)
        if m.get("config_hash") != want:
            raise ExportError(f"{where}: made for another model shape (config_hash {m.get('config_hash')}, "
                              f"this model {want}: {m.get('num_layers')} layers x {m.get('num_heads')} heads "
                              f"in the file)")
    layers = data.get("layers")
    nl, nh = m.get("num_layers"), m.get("num_heads")
    if not isinstance(layers, list) or len(layers) != nl:
        raise ExportError(f"{where}: expected {nl} layers, got {len(layers) if isinstance(layers, list) else layers!r}")
    want_heads = {str(h) for h in range(int(nh or 0))}
    for layer, entry in enumerate(layers):
        if not isinstance(entry, dict) or set(entry) != want_heads:
            raise ExportError(f"{where}: layer {layer} must map query heads '0'..'{int(nh or 0) - 1}'")
        for head, value in entry.items():
            pattern = value.get("pattern") if isinstance(value, dict) else None
            if pattern not in BUDGETS:
                raise ExportError(f"{where}: layer {layer}, head {head}: unknown pattern {pattern!r} "
                                  f"(known: {', '.join(BUDGETS)})")
            for k in BUDGETS[pattern]:
                v = value.get(k)
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ExportError(f"{where}: layer {layer}, head {head}: {k} must be an integer >= 0, got {v!r}")
    return data


def read_flex(path: str | Path, model_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load and validate ``flex_plan.json`` (a file or the folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / FILENAME
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{p}: cannot read a flex plan ({exc})") from None
    return check_flex_plan(data, str(p), model_info)


def flex_plan_of(result: AuditResult, heads: int | None = None) -> dict[str, Any]:
    """The flex plan of ``result`` as a dict (what ``--export flex`` writes); ``heads``: only the
    plan's first ``heads`` entries."""
    return export_flex(result, heads=heads)
