"""Shared pieces of the runtime exporters: the model shape and its validation (stdlib only)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from attn_audit.errors import ConfigError

# Key aliases: attn-audit's own result.model names first, then Hugging Face config names.
_ALIASES = {
    "num_layers": ("num_layers", "num_hidden_layers", "n_layer"),
    "num_heads": ("num_heads", "num_attention_heads", "n_head"),
    "num_kv_heads": ("num_kv_heads", "num_key_value_heads", "n_head_kv"),
}


ENCODER_DECODER = ("encoder-decoder model: its sites mix encoder self-, decoder self- and cross-attention "
                   "(model.site_kinds), while the export formats and apply_plan describe one stack's self-attention "
                   "layers; no export is written")


class ExportError(ConfigError):
    """An export does not match the model (layers, heads, GQA) or a written file is malformed."""


@dataclass(frozen=True)
class ModelShape:
    """The attention layout an export must match: L layers of H query heads sharing KV heads."""

    num_layers: int
    num_heads: int
    num_kv_heads: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (g(h) = h // group_size)."""
        return self.num_heads // self.num_kv_heads

    def kv_head(self, head: int) -> int:
        return head // self.group_size


def _field(info: Mapping[str, Any], name: str) -> Any:
    for key in _ALIASES[name]:
        if key in info and info[key] is not None:
            return info[key]
    return None


def validate_against_model(
    model_info: Mapping[str, Any],
    heads: Iterable[Mapping[str, Any]] | None = None,
    tp: int | None = None,
) -> ModelShape:
    """Check the model config and, if given, that ``heads`` hold every (layer, head) exactly once.

    ``model_info`` is ``result.model`` or a Hugging Face config dict (``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads``; KV heads default to the query heads).
    Checks: layers > 0, heads > 0, KV heads > 0, ``num_heads % num_kv_heads == 0``; with ``tp``,
    query heads split evenly over the ranks and KV heads split or replicate evenly. Raises
    :class:`ExportError` naming the first problem.
    """
    if model_info.get("encoder_decoder") or model_info.get("is_encoder_decoder"):
        raise ExportError(ENCODER_DECODER)
    if model_info.get("layer_heads"):
        raise ExportError("model config: the number of heads or the head size varies between layers "
                          "(model.layer_heads); the export formats assume one head count per layer")
    values = {}
    for name in _ALIASES:
        value = _field(model_info, name)
        if name == "num_kv_heads" and value is None:
            value = _field(model_info, "num_heads")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ExportError(f"model config: {name} must be a positive integer, got {value!r}")
        values[name] = value
    shape = ModelShape(**values)
    if shape.num_heads % shape.num_kv_heads:
        raise ExportError(
            f"model config: {shape.num_heads} query heads are not divisible by "
            f"{shape.num_kv_heads} KV heads (GQA needs equal groups)"
        )
    if tp is not None:
        if tp <= 0 or shape.num_heads % tp:
            raise ExportError(
                f"tensor parallel degree {tp} does not divide {shape.num_heads} query heads"
            )
        if shape.num_kv_heads % tp and tp % shape.num_kv_heads:
            raise ExportError(
                f"tensor parallel degree {tp} cannot split or replicate "
                f"{shape.num_kv_heads} KV heads"
            )
    if heads is not None:
        _check_heads(shape, heads)
    return shape


def _check_heads(shape: ModelShape, heads: Iterable[Mapping[str, Any]]) -> None:
    seen: set[tuple[int, int]] = set()
    for rec in heads:
        layer, head = rec.get("layer"), rec.get("head")
        if not isinstance(layer, int) or not 0 <= layer < shape.num_layers:
            raise ExportError(
                f"head record has layer {layer!r}; the model has layers 0..{shape.num_layers - 1}"
            )
        if not isinstance(head, int) or not 0 <= head < shape.num_heads:
            raise ExportError(
                f"L{layer} has head {head!r}; the model has query heads 0..{shape.num_heads - 1}"
            )
        if (layer, head) in seen:
            raise ExportError(f"L{layer}.H{head} appears more than once in the audit")
        seen.add((layer, head))
        kv = rec.get("kv_head")
        if kv is not None and kv != shape.kv_head(head):
            raise ExportError(
                f"L{layer}.H{head} has kv_head {kv}, but {shape.num_heads} query heads over "
                f"{shape.num_kv_heads} KV heads put it in KV head {shape.kv_head(head)}"
            )
    total = shape.num_layers * shape.num_heads
    if len(seen) != total:
        missing = [
            f"L{la}.H{h}"
            for la in range(shape.num_layers)
            for h in range(shape.num_heads)
            if (la, h) not in seen
        ]
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ExportError(
            f"the audit lacks {len(missing)} of {total} heads ({shown}); every head must be present"
        )


def index_heads(heads: Iterable[Mapping[str, Any]]) -> dict[tuple[int, int], Mapping[str, Any]]:
    """Head records keyed by (layer, head)."""
    return {(int(h["layer"]), int(h["head"])): h for h in heads}
