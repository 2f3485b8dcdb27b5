"""Capture Q and K where the model's own attention kernel receives them, for any model whose
attention goes through transformers' ``ALL_ATTENTION_FUNCTIONS``.

A function registered in transformers' ``AttentionInterface`` under :data:`CAPTURE_IMPL` sees
``query`` (batch, head, pos, d_qk) after any QK-norm and RoPE, ``key`` (batch, kv_head, kv_pos,
d_qk) before GQA's ``repeat_kv`` and ``value`` (batch, kv_head, kv_pos, d_v) (``d_v`` may differ
from ``d_qk``, DeepSeek MLA), together with the mask the model built, its scaling and every
keyword the model passes: soft-cap, sliding window, learned sink logits (``s_aux``, gpt-oss), an
additive position bias (T5), ``is_causal``, dropout. Each keyword is either honoured in the
recomputed scores (:data:`HONOURED`), known to leave the eager probabilities unchanged
(:data:`IGNORED`), or refused with a one-line :class:`CaptureError` naming it, so that an
unknown option can never give silently wrong numbers.

The call hands an :class:`AttentionCall` to the active consumer, then delegates to ``sdpa``
(or computes eager attention itself when sdpa cannot honour an option: soft-cap, sinks) so the
model's outputs are unchanged. The same name is registered in ``AttentionMaskInterface`` with
the sdpa mask builder: for an unknown name transformers builds no mask at all, which would
silently drop padding.

Calls are numbered in the order they happen within one forward pass (``AttentionCall.layer``):
for a decoder-only model that is the layer index; an encoder-decoder model gives its encoder
self-attention, then per decoder layer self- and cross-attention, as separate sites; a model
that shares one attention module over several layers (ALBERT) gets one site per use.
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

HONOURED = frozenset({"sliding_window", "softcap", "s_aux", "sinks", "position_bias", "is_causal", "indices"})
"""Keywords that change the probabilities and that :func:`scores` / :func:`attention_probs`
apply exactly as the models' eager kernels do (``scaling`` and ``dropout`` are named arguments)."""

IGNORED = frozenset({
    "position_ids", "cache_position", "output_attentions", "output_hidden_states", "output_router_logits",
    "num_items_in_batch", "use_cache", "return_dict", "past_key_values", "past_key_value", "layer_idx",
    "deterministic",  # flash-attention's deterministic backward
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx",  # packing (flash only)
    "query_length", "target_dtype", "token_type_ids", "logits_to_keep",
})
"""Keywords the eager and sdpa kernels never read: they leave the probabilities unchanged."""

NOT_TOKEN_ATTENTION: dict[str, str] = {
    "Inkling2BlockAttentionResidual": "attention over the earlier blocks' outputs (depth), not over tokens",
    "Inkling2LoopBlockAttentionResidual": "attention over the earlier blocks' outputs (depth), not over tokens",
    "Inkling2LoopMessageAttentionResidual": "attention over the earlier blocks' outputs (depth), not over tokens",
}
"""Module classes that route attention over something other than the token sequence through the
interface (its axes reused: the tokens as the head axis, the blocks as keys). Their calls are no
sites: they run (exactly, :func:`_eager`) without being reported and are named in
``skipped_calls`` (:func:`skipped_calls`)."""


@dataclass
class AttentionCall:
    """One call of an attention kernel.

    Attributes:
        layer: the call's site: its order within the forward pass (the layer index for a
            decoder-only model; see the module docstring for encoder-decoder models).
        query: (batch, head, pos, d_qk), as the kernel receives it (post-RoPE, post QK-norm).
        key: (batch, kv_head, kv_pos, d_qk), not repeated for GQA.
        value: (batch, kv_head, kv_pos, d_v).
        attention_mask: what the model passed to its kernel: None, bool (True = attend) or an
            additive float mask (0 / very negative, or carrying a bias such as ALiBi),
            broadcastable to (batch, head, pos, kv_pos).
        scaling: the softmax scale the model uses (usually d_qk ** -0.5).
        softcap: tanh soft-capping of the logits, if the layer sets one.
        sliding_window: the layer's window, if any (the mask encodes it whenever one is given).
        is_causal: whether the call is causal (used when the mask is None).
        s_aux: sink logits broadcastable to (batch, head, pos, 1), or None: one extra logit
            column in the softmax denominator that takes mass but is not a key (learned per head
            as gpt-oss's ``s_aux``, or per token as a ``sinks`` keyword).
        position_bias: additive logit bias broadcastable to (batch, head, pos, kv_pos) (T5
            relative positions), or None.
        mask_bias: whether a float ``attention_mask`` carries finite non-zero values (a bias to
            add to the logits, not only a mask).
        probs: the fallback for attention computed outside the interface: the model's own eager
            probabilities (batch, head, pos, kv_pos); ``query`` / ``key`` / ``value`` are then
            empty (last dim 0) and the scores are log-probabilities (the same softmax).
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
    s_aux: torch.Tensor | None = None
    position_bias: torch.Tensor | None = None
    mask_bias: bool = False
    probs: torch.Tensor | None = None

    @property
    def plain(self) -> bool:
        """True when the probabilities are a softmax over the keys alone (no sink column)."""
        return self.s_aux is None


Consumer = Callable[[AttentionCall], "torch.Tensor | None"]
_CONSUMERS: list[Consumer] = []
_REGISTERED = False
_SITE = [0]  # the next call's site number (reset before each forward pass of a captured model)
_OWN_OUTPUT = [False]  # compute the output ourselves (the model does not support sdpa)
_SKIPPED: set[str] = set()  # classes of NOT_TOKEN_ATTENTION calls run since the capture began


def skipped_calls() -> list[str]:
    """One line per module class whose calls the current (or last) capture ran without reporting
    them as sites (:data:`NOT_TOKEN_ATTENTION`)."""
    return [f"{name}: {NOT_TOKEN_ATTENTION[name]}" for name in sorted(_SKIPPED)]


def check_kwargs(kwargs: dict[str, Any], module: Any = None) -> None:
    """Refuse a keyword that is set, not understood, and could change the probabilities.

    Raises:
        CaptureError: one line naming the keyword and the module class.
    """
    for name, value in kwargs.items():
        if name in HONOURED or name in IGNORED or value is None or value is False:
            continue
        owner = type(module).__name__ if module is not None else "the model"
        raise CaptureError(
            f"{owner} passes '{name}' to its attention kernel, which the capture does not understand and "
            "which could change the attention probabilities; refusing rather than measuring wrong numbers"
        )


def _has_bias(mask: torch.Tensor | None) -> bool:
    """Whether a float mask holds finite non-zero entries (an additive bias, e.g. ALiBi)."""
    if mask is None or mask.dtype == torch.bool:
        return False
    live = mask > torch.finfo(mask.dtype).min / 2
    return bool((mask[live] != 0).any())


def _select_keys(mask: torch.Tensor | None, indices: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Fold a sparse-attention indexer's choice (``indices``: (batch, pos, top-k) key positions,
    DeepSeek-V3.2 DSA) into the mask, as the models do for their eager and sdpa kernels."""
    b, n, _ = indices.shape
    chosen = torch.zeros(b, n, n_keys, dtype=torch.bool, device=indices.device)
    chosen = chosen.scatter(-1, indices.long().clamp(0, n_keys - 1), indices.ge(0)).unsqueeze(1)
    if mask is None:
        return chosen
    if mask.dtype == torch.bool:
        return mask & chosen
    return mask.masked_fill(~chosen, torch.finfo(mask.dtype).min)


def make_call(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None, dropout: float,
              kwargs: dict[str, Any], layer: int) -> AttentionCall:
    """Check the keywords and build the :class:`AttentionCall` of one kernel call."""
    check_kwargs(kwargs, module)
    if kwargs.get("indices") is not None:
        attention_mask = _select_keys(attention_mask, kwargs["indices"], key.shape[2])
    if dropout and getattr(module, "training", False):
        raise CaptureError(f"{type(module).__name__} runs attention dropout ({dropout}); call model.eval() first")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    s_aux = kwargs.get("s_aux")
    if s_aux is not None:  # one learned logit per head (gpt-oss)
        if s_aux.numel() != query.shape[1]:
            raise CaptureError(f"{type(module).__name__}: {s_aux.numel()} sink logits for {query.shape[1]} heads")
        s_aux = s_aux.reshape(1, -1, 1, 1)
    elif kwargs.get("sinks") is not None:  # one logit per head and query token (batch, head, pos, 1)
        s_aux = kwargs["sinks"]
        if s_aux.dim() != 4 or s_aux.shape[-1] != 1:
            raise CaptureError(f"{type(module).__name__}: sink logits of shape {tuple(s_aux.shape)} are not understood")
    return AttentionCall(
        layer=layer,
        query=query,
        key=key,
        value=value,
        attention_mask=attention_mask,
        scaling=float(scaling),
        softcap=float(softcap) if softcap else None,
        sliding_window=kwargs.get("sliding_window"),
        is_causal=bool(is_causal),
        module=module,
        s_aux=s_aux,
        position_bias=kwargs.get("position_bias"),
        mask_bias=_has_bias(attention_mask),
    )


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

    if type(module).__name__ in NOT_TOKEN_ATTENTION:  # no site: run it, report nothing
        _SKIPPED.add(type(module).__name__)
        return _eager(module, make_call(module, query, key, value, attention_mask, scaling, dropout, kwargs, -1), 0.0)
    call = make_call(module, query, key, value, attention_mask, scaling, dropout, kwargs, _SITE[0])
    _SITE[0] += 1
    replaced = None
    if _CONSUMERS:
        replaced = _CONSUMERS[-1](call)
    if replaced is not None:  # a consumer (verification) computed the output itself
        return replaced, None
    if call.softcap or call.s_aux is not None or call.mask_bias or call.position_bias is not None or _OWN_OUTPUT[0]:
        # sdpa cannot apply these (or the model does not support it): eager from our own probabilities
        return _eager(module, call, 0.0)
    fn = ALL_ATTENTION_FUNCTIONS["sdpa"]
    kwargs.pop("indices", None)  # folded into call.attention_mask
    return fn(module, query, key, value, call.attention_mask, dropout=0.0, scaling=call.scaling, **kwargs)


def _eager(module: torch.nn.Module | None, call: AttentionCall, dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention from our own probabilities (soft-cap, sinks, biased masks): output
    (batch, pos, head, d_v) and probabilities (batch, head, pos, kv_pos)."""
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

    sdpa_mask, eager_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"], ALL_MASK_ATTENTION_FUNCTIONS["eager"]

    def capture_mask(*args: Any, **kwargs: Any) -> Any:
        """The sdpa mask; the eager one (additive float) for a model without sdpa support, whose
        own code may combine the mask with float biases (DeepSeek-V4 appends its compressor's
        block bias cast to the mask's dtype: a bool mask would invert it)."""
        return (eager_mask if _OWN_OUTPUT[0] else sdpa_mask)(*args, **kwargs)

    AttentionInterface.register(CAPTURE_IMPL, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_IMPL, capture_mask)
    _REGISTERED = True


def _reset_site(*_: Any) -> None:
    _SITE[0] = 0


@contextmanager
def capturing(model: Any, consumer: Consumer) -> Iterator[None]:
    """Route every attention call of ``model`` through ``consumer`` while the block runs.

    The consumer may return a tensor (batch, pos, head, d_v) to replace the call's output
    (used by verification); returning None keeps the model's own kernel. Site numbers restart
    at 0 whenever the model (or its base model) starts a forward pass.
    """
    ensure_registered()
    previous = getattr(model.config, "_attn_implementation", None) or "sdpa"
    try:
        model.set_attn_implementation(CAPTURE_IMPL)
    except Exception as exc:  # noqa: BLE001 - transformers raises ValueError/KeyError here
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CaptureError(
            f"{type(model).__name__} does not accept a custom attention implementation ({msg}); "
            "see --list-families"
        ) from None
    own_before = _OWN_OUTPUT[0]
    _OWN_OUTPUT[0] = not getattr(model, "_supports_sdpa", True)
    _SKIPPED.clear()
    tops = {id(m): m for m in (model, getattr(model, "base_model", model))}
    handles = [m.register_forward_pre_hook(_reset_site) for m in tops.values()]
    _reset_site()
    _CONSUMERS.append(consumer)
    try:
        yield
    finally:
        _CONSUMERS.pop()
        _OWN_OUTPUT[0] = own_before
        for h in handles:
            h.remove()
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
    if call.probs is not None:
        return _log_probs(call.probs, rows, keys, out)
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
    n_keys = k.shape[2]
    for bias in (call.position_bias, call.attention_mask if call.mask_bias else None):
        if bias is not None:  # additive logits, as eager adds them (after scaling and soft-cap)
            b_rows = bias[..., :n_keys] if bias.shape[-2] == 1 or rows is None else bias[..., rows, :n_keys]
            live = b_rows > torch.finfo(b_rows.dtype).min / 2
            s = s.add_(torch.where(live, b_rows, 0).float())
    if not masked:
        return s
    return s.masked_fill_(~allowed_mask(call, rows, n_keys), float("-inf"))


def sink_column(call: AttentionCall, s: torch.Tensor, rows: slice | torch.Tensor | None = None) -> torch.Tensor:
    """The sink logits as one float32 column (batch, head, rows, 1) next to scores ``s`` of
    query rows ``rows`` (default all)."""
    sink = call.s_aux.float()
    if sink.shape[-2] > 1 and rows is not None:
        sink = sink[..., rows, :]
    return sink.expand(*s.shape[:-1], 1)


def _log_probs(probs: torch.Tensor, rows: slice | torch.Tensor | None, keys: int | None,
               out: torch.Tensor | None) -> torch.Tensor:
    """Fallback scores: log of the eager probabilities (batch, head, rows, keys), float32; keys
    with probability 0 (masked, or underflowed to 0 in the model itself) get -inf."""
    p = probs if rows is None else probs[:, :, rows]
    p = p if keys is None else p[..., :keys]
    if out is None:
        return torch.log(p.float())
    return torch.log(p.float(), out=out) if p.dtype == torch.float32 else torch.log(out.copy_(p), out=out)


def attention_probs(call: AttentionCall) -> torch.Tensor:
    """Attention probabilities recomputed from the captured Q/K, (batch, head, pos, kv_pos) float32.

    With learned sink logits (``s_aux``) the softmax runs over the keys and one sink column per
    head, which is then dropped: the rows sum to 1 minus the sink's mass, as the model computes.
    Rows with no allowed key (fully padded) are all zeros.
    """
    if call.probs is not None:
        return call.probs.float()
    s = scores(call)
    if call.s_aux is None:
        probs = torch.softmax(s, dim=-1)
    else:
        probs = torch.softmax(torch.cat([s, sink_column(call, s)], dim=-1), dim=-1)[..., :-1]
    return torch.nan_to_num(probs, nan=0.0)
