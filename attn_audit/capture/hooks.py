"""Projection hooks: pre-RoPE Q/K and the attention block's input, for RoPE families.

The attention interface (:mod:`capture`) sees Q and K after RoPE. The theory also asks about
them before the rotation (the ``q_pre_rope`` / ``k_pre_rope`` sites) and about the norm of the
block's input x after the pre-norm (the B of R_F = c_s·B²·‖W_Q W_Kᵀ‖_F). Forward hooks on the
``q_proj`` / ``k_proj`` linears give both: their input is x, their output the pre-RoPE
projections (batch, pos, head·d_head).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

# model_type -> (attention module attribute on a decoder layer, q linear, k linear)
PROJECTIONS: dict[str, tuple[str, str, str]] = {
    "llama": ("self_attn", "q_proj", "k_proj"),
    "mistral": ("self_attn", "q_proj", "k_proj"),
    "qwen2": ("self_attn", "q_proj", "k_proj"),
}

Sink = Callable[[int, str, torch.Tensor], None]


def decoder_layers(model: Any) -> list[Any]:
    """The list of decoder layers of a llama-like model (``model.model.layers``)."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    return list(layers) if layers is not None else []


def projection_weights(model: Any, family: str) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer (W_Q, W_K) as (out, in) weight matrices, or None for other families."""
    if family not in PROJECTIONS:
        return None
    attn_name, q_name, k_name = PROJECTIONS[family]
    out = []
    for layer in decoder_layers(model):
        attn = getattr(layer, attn_name)
        out.append((getattr(attn, q_name).weight.detach(), getattr(attn, k_name).weight.detach()))
    return out


@contextmanager
def projection_hooks(model: Any, family: str, sink: Sink) -> Iterator[bool]:
    """Call ``sink(layer, site, tensor)`` for "x" (batch, pos, hidden), "q_pre" and "k_pre"
    (batch, pos, heads·d_head) during forward passes. Yields whether hooks were installed."""
    if family not in PROJECTIONS:
        yield False
        return
    attn_name, q_name, k_name = PROJECTIONS[family]
    handles = []
    try:
        for idx, layer in enumerate(decoder_layers(model)):
            attn = getattr(layer, attn_name)

            def q_hook(mod: Any, inputs: tuple[Any, ...], output: torch.Tensor, idx: int = idx) -> None:
                sink(idx, "x", inputs[0])
                sink(idx, "q_pre", output)

            def k_hook(mod: Any, inputs: tuple[Any, ...], output: torch.Tensor, idx: int = idx) -> None:
                sink(idx, "k_pre", output)

            handles.append(getattr(attn, q_name).register_forward_hook(q_hook))
            handles.append(getattr(attn, k_name).register_forward_hook(k_hook))
        yield True
    finally:
        for h in handles:
            h.remove()
