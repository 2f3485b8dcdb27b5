"""Capture post-RoPE Q and K where the model's own attention kernel receives them.

A function registered in transformers' ``AttentionInterface`` under :data:`CAPTURE_IMPL` sees
``query`` (batch, head, pos, d_head) after RoPE and ``key`` (batch, kv_head, kv_pos, d_head)
before GQA's ``repeat_kv``, together with the mask the model built, its scaling, soft-cap and
sliding window. It hands them to the active consumer, then delegates to ``sdpa`` (or ``eager``
when a soft-cap is set) so the model's outputs are unchanged. The same name is registered in
``AttentionMaskInterface`` with the sdpa mask builder: for an unknown name transformers builds
no mask at all, which would silently drop padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from attn_audit.errors import CaptureError

CAPTURE_IMPL = "attn_audit_capture"


@dataclass
class AttentionCall:
    """One call of a layer's attention kernel.

    Attributes:
        layer: the attention module's ``layer_idx``.
        query: (batch, head, pos, d_head), post-RoPE.
        key: (batch, kv_head, kv_pos, d_head), post-RoPE, not repeated for GQA.
        value: (batch, kv_head, kv_pos, d_head).
        attention_mask: what the model passed to its kernel: None, bool (True = attend) or an
            additive float mask, broadcastable to (batch, 1, pos, kv_pos).
        scaling: the softmax scale the model uses (usually d_head ** -0.5).
        softcap: tanh soft-capping of the logits, if the config sets one.
        sliding_window: the layer's window, if any.
        is_causal: whether the module is causal (used when the mask is None).
    """

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float
    softcap: float | None
    sliding_window: int | None
    is_causal: bool
    module: Any = None


Consumer = Callable[[AttentionCall], "torch.Tensor | None"]
_CONSUMERS: list[Consumer] = []
_REGISTERED = False


def _capture_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registered attention function: report to the consumer, then run the real kernel."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", True))
    call = AttentionCall(
        layer=int(getattr(module, "layer_idx", -1) if getattr(module, "layer_idx", None) is not None else -1),
        query=query,
        key=key,
        value=value,
        attention_mask=attention_mask,
        scaling=float(scaling),
        softcap=float(softcap) if softcap else None,
        sliding_window=kwargs.get("sliding_window"),
        is_causal=bool(is_causal),
        module=module,
    )
    replaced = None
    if _CONSUMERS:
        replaced = _CONSUMERS[-1](call)
    if replaced is not None:  # a consumer (verification) computed the output itself
        return replaced, None
    if softcap:
        return _eager(module, call, dropout)
    fn = ALL_ATTENTION_FUNCTIONS["sdpa"]
    return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _eager(module: torch.nn.Module, call: AttentionCall, dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention with our own score computation (used when a soft-cap is set)."""
    probs = attention_probs(call)
    groups = call.query.shape[1] // call.key.shape[1]
    v = call.value.repeat_interleave(groups, dim=1)
    out = torch.matmul(probs.to(v.dtype), v).transpose(1, 2).contiguous()
    return out, probs


def ensure_registered() -> None:
    """Register the capture function and its mask builder with transformers (once)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(CAPTURE_IMPL, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _REGISTERED = True


@contextmanager
def capturing(model: Any, consumer: Consumer) -> Iterator[None]:
    """Route every attention call of ``model`` through ``consumer`` while the block runs.

    The consumer may return a tensor (batch, pos, head, d_head) to replace the layer's output
    (used by verification); returning None keeps the model's own kernel.
    """
    ensure_registered()
    previous = getattr(model.config, "_attn_implementation", None) or "sdpa"
    try:
        model.set_attn_implementation(CAPTURE_IMPL)
    except Exception as exc:  # noqa: BLE001 - transformers raises ValueError/KeyError here
        raise CaptureError(
            f"{type(model).__name__} does not accept a custom attention implementation ({exc}); "
            "see --list-families"
        ) from None
    _CONSUMERS.append(consumer)
    try:
        yield
    finally:
        _CONSUMERS.pop()
        model.set_attn_implementation(previous)


def allowed_mask(
    call: AttentionCall, rows: slice | torch.Tensor | None = None, keys: int | None = None
) -> torch.Tensor:
    """Boolean mask of allowed keys, broadcastable to (batch, head, rows, keys).

    Args:
        call: the attention call.
        rows: query rows to build the mask for: a slice or an int64 index tensor (default all).
        keys: number of leading keys to include (default all).
    """
    q_len = call.query.shape[2]
    k_len = call.key.shape[2] if keys is None else keys
    if rows is None:
        rows = slice(0, q_len)
    m = call.attention_mask
    if m is None:
        qi = torch.arange(q_len, device=call.query.device)[rows].unsqueeze(-1)
        kj = torch.arange(k_len, device=call.query.device).unsqueeze(0)
        offset = call.key.shape[2] - q_len  # keys already in a cache (0 in a plain forward)
        allowed = torch.ones(qi.shape[0], k_len, dtype=torch.bool, device=qi.device)
        if call.is_causal and q_len > 1:
            allowed = kj <= qi + offset
            if call.sliding_window:
                allowed = allowed & (kj > qi + offset - int(call.sliding_window))
        return allowed.view(1, 1, *allowed.shape)
    m = m[..., :k_len] if m.shape[-2] == 1 else m[..., rows, :k_len]
    if m.dtype == torch.bool:
        return m
    return m > torch.finfo(m.dtype).min / 2


def scores(
    call: AttentionCall, rows: slice | torch.Tensor | None = None, keys: int | None = None,
    masked: bool = True, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pre-softmax logits in float32, disallowed keys set to -inf (``masked=False``: left as
    computed, for callers that apply a known causal mask themselves).

    ``out``: a contiguous float32 (batch, head, rows, keys) tensor to write them into (the same
    bits). Reusing one saves the page faults of a fresh allocation of that size, which at
    256 x 4096 x 9 scores (38 MB) made the product ~2.4x slower on a 2-core host.

    Returns:
        (batch, head, rows, keys) float32; query head h reads KV head h // (H_q / H_kv).
    """
    q = call.query if rows is None else call.query[:, :, rows]
    k = call.key if keys is None else call.key[:, :, :keys]
    b, hq, r, d = q.shape
    hkv = k.shape[1]
    groups = hq // hkv
    q = q.float().reshape(b, hkv, groups * r, d)
    shape = (b, hq, r, k.shape[2])
    if out is not None and (tuple(out.shape) != shape or out.dtype != torch.float32
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 tensor of shape {shape}")
    grouped = None if out is None else out.view(b, hkv, groups * r, k.shape[2])
    mant, _ = math.frexp(call.scaling)
    if mant == 0.5:  # a power of two (d_head ** -0.5 for d_head = 4^j) scales q exactly: same bits,
        s = torch.matmul(q * call.scaling, k.float().transpose(-1, -2), out=grouped).view(shape)
    else:  # and a pass over the (much larger) scores saved; else scale after, as eager does
        s = torch.matmul(q, k.float().transpose(-1, -2), out=grouped).view(shape)
        s.mul_(call.scaling)
    if call.softcap:
        s = torch.tanh(s / call.softcap) * call.softcap
    if not masked:
        return s
    return s.masked_fill_(~allowed_mask(call, rows, k.shape[2]), float("-inf"))


def attention_probs(call: AttentionCall) -> torch.Tensor:
    """Attention probabilities recomputed from the captured Q/K, (batch, head, pos, kv_pos) float32.

    Rows with no allowed key (fully padded) are all zeros.
    """
    probs = torch.softmax(scores(call), dim=-1)
    return torch.nan_to_num(probs, nan=0.0)
