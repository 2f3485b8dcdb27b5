"""Optional extras: pre-RoPE Q/K and the attention block's input, where the projections are known.

The attention interface (:mod:`attn_audit.capture.interface`) sees Q and K as the kernel does
(post-RoPE, post QK-norm); the core audit needs nothing else. The theory also asks about them
before the rotation (the ``q_pre_rope`` / ``k_pre_rope`` sites) and about the norm of the
block's input x after the pre-norm (the B of R_F = c_s·B²·‖W_Q W_Kᵀ‖_F). Forward hooks on
separate ``q_proj`` / ``k_proj`` linears give both: their input is x, their output the pre-RoPE
projections (batch, pos, head·d_head). They are installed only where that reading is right:
decoder layers ``model.layers[i].self_attn`` with ``q_proj`` / ``k_proj`` linears of
heads·head_dim outputs and RoPE. With QK-norm (Qwen3, OLMo 2, Gemma 3: ``q_norm`` / ``k_norm``
after the projection, before the rotation) the projections' outputs are the **pre-norm**,
pre-RoPE Q/K: the extra sites are kept and labelled so (``run.extras.pre_norm``), while the
weight-based R bound is absent (the norm sits between W and the kernel, so ‖W_Q W_Kᵀ‖ no longer
bounds the logits). :func:`extras_reason` says why the sites are absent,
:func:`weight_bound_reason` why the weight bound is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

Sink = Callable[[int, str, torch.Tensor], None]


def decoder_layers(model: Any) -> list[Any]:
    """The list of decoder layers of a llama-like model (``model.model.layers``)."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    return list(layers) if layers is not None else []


QK_NORM_REASON = ("QK-norm between the projections and the kernel: the captured Q/K are post-norm; the extra sites "
                  "are the pre-norm, pre-RoPE q_proj / k_proj outputs, and there is no weight-based R bound (the "
                  "norm sits between W and the kernel)")


def weight_bound_reason(model: Any, info: dict[str, Any]) -> str | None:
    """None when the weight-based R bounds (R_F, R_op from W_Q, W_K) apply to ``model``, else why not:
    they need the pre-RoPE sites (:func:`extras_reason`) and no QK-norm."""
    reason = extras_reason(model, info)
    if reason is None and info.get("qk_norm"):
        return QK_NORM_REASON
    return reason


def extras_reason(model: Any, info: dict[str, Any]) -> str | None:
    """None when the pre-RoPE projection sites apply to ``model`` (pre-norm too with QK-norm),
    else why not."""
    if info.get("capture") == "eager-fallback":
        return "attention computed outside the interface: only its probabilities are read"
    if info.get("encoder_decoder"):
        return "encoder-decoder model: the projection hooks read a decoder-only stack (model.layers[i])"
    if not info.get("rope"):
        return "no RoPE: the kernel input is already the projection"
    if info.get("layer_heads"):
        return "the heads or the head size vary between layers: no single projection layout"
    layers = decoder_layers(model)
    if len(layers) != info.get("num_layers"):
        return "the attention layers are not model.layers[i] (one per site)"
    width_q = info["num_heads"] * info["head_dim"]
    width_k = info["num_kv_heads"] * info["head_dim"]
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        q, k = getattr(attn, "q_proj", None), getattr(attn, "k_proj", None)
        if not (isinstance(q, torch.nn.Linear) and isinstance(k, torch.nn.Linear)):
            return "no separate q_proj / k_proj linears (fused or low-rank projections)"
        if q.out_features != width_q or k.out_features != width_k:
            return "q_proj / k_proj widths differ from heads x head_dim"
    return None


def projection_weights(model: Any, info: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer (W_Q, W_K) as (out, in) weight matrices, or None where the weight bounds do not apply."""
    if weight_bound_reason(model, info) is not None:
        return None
    return [(layer.self_attn.q_proj.weight.detach(), layer.self_attn.k_proj.weight.detach())
            for layer in decoder_layers(model)]


@contextmanager
def projection_hooks(model: Any, info: dict[str, Any], sink: Sink) -> Iterator[bool]:
    """Call ``sink(layer, site, tensor)`` for "x" (batch, pos, hidden), "q_pre" and "k_pre"
    (batch, pos, heads·d_head) during forward passes. Yields whether hooks were installed."""
    if extras_reason(model, info) is not None:
        yield False
        return
    handles = []
    try:
        for idx, layer in enumerate(decoder_layers(model)):
            attn = layer.self_attn

            def q_hook(mod: Any, inputs: tuple[Any, ...], output: torch.Tensor, idx: int = idx) -> None:
                sink(idx, "x", inputs[0])
                sink(idx, "q_pre", output)

            def k_hook(mod: Any, inputs: tuple[Any, ...], output: torch.Tensor, idx: int = idx) -> None:
                sink(idx, "k_pre", output)

            handles.append(attn.q_proj.register_forward_hook(q_hook))
            handles.append(attn.k_proj.register_forward_hook(k_hook))
        yield True
    finally:
        for h in handles:
            h.remove()
