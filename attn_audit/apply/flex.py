"""The attention function that runs a plan with FlexAttention (see :mod:`attn_audit.apply`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from attn_audit.apply.plan import HeadPattern, LoadedPlan, load_plan
from attn_audit.capture.interface import AttentionCall, allowed_mask
from attn_audit.errors import ConfigError
from attn_audit.rows.patterns import (
    VS_LAST_Q,
    block_estimate_order,
    num_blocks,
    rank_of,
    vertical_slash_order,
)

FLEX_IMPL = "attn_audit_flex"
_STATE_ATTR = "_attn_audit_flex"
_REGISTERED = False
_COMPILED: dict[str, Any] = {}


@dataclass
class _LayerState:
    plan: LoadedPlan
    heads: dict[int, HeadPattern]  # planned (non-dense) heads of this layer
    previous: str  # the model's own attention implementation
    compile: bool


def _ensure_registered() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(FLEX_IMPL, _flex_attention)
    AttentionMaskInterface.register(FLEX_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _REGISTERED = True


def _text_config(model: Any) -> Any:
    return getattr(model.config, "text_config", None) or model.config


def apply_plan(model: Any, plan: Any, *, compile: bool = True) -> LoadedPlan:
    """Run ``plan`` inside ``model`` until :func:`remove_plan`.

    Args:
        model: a transformers model whose attention goes through the attention interface.
        plan: an :class:`~attn_audit.result.AuditResult`, a flex plan dict, or the path of a
            ``flex_plan.json``; checked against the model's shape first (:class:`ConfigError`).
        compile: run ``torch.compile(flex_attention)`` (a fused kernel; on CPU it builds with the
            system C++ compiler, the first call per shape takes tens of seconds); False runs the
            eager FlexAttention path (same results, materialises the scores).
    Returns the loaded plan.
    """
    cfg = _text_config(model)
    if getattr(cfg, "attn_logit_softcapping", None):
        raise ConfigError(f"{type(model).__name__} soft-caps its logits; apply_plan does not support soft-capping yet")
    info = cfg.to_dict()
    loaded = load_plan(plan, info)
    _ensure_registered()
    previous = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if previous == FLEX_IMPL:  # applied twice: keep the original kernel
        previous = getattr(model, "_attn_audit_previous", "sdpa")
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if isinstance(layer, int):
            setattr(module, _STATE_ATTR, _LayerState(loaded, loaded.layer(layer), previous, compile))
    model._attn_audit_previous = previous
    try:
        model.set_attn_implementation(FLEX_IMPL)
    except Exception as exc:  # noqa: BLE001 - transformers raises ValueError/KeyError here
        remove_plan(model)
        raise ConfigError(f"{type(model).__name__} does not accept a custom attention implementation ({exc})") from None
    return loaded


def remove_plan(model: Any) -> None:
    """Restore the model's own attention (no-op when no plan is applied)."""
    for module in model.modules():
        if hasattr(module, _STATE_ATTR):
            delattr(module, _STATE_ATTR)
    previous = getattr(model, "_attn_audit_previous", None)
    if previous is not None:
        model.set_attn_implementation(previous)
        del model._attn_audit_previous


def _model_kernel(name: str) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name] if name in ALL_ATTENTION_FUNCTIONS else ALL_ATTENTION_FUNCTIONS["sdpa"]


def _flex_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query (B, H, n, d), key/value (B, Hkv, n, d) -> output (B, n, H, d)."""
    state: _LayerState | None = getattr(module, _STATE_ATTR, None)
    own = _model_kernel(state.previous if state else "sdpa")
    n = query.shape[2]
    if state is None or not state.heads or key.shape[2] != n or n < 2:
        return own(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    is_causal = kwargs.get("is_causal")
    is_causal = bool(getattr(module, "is_causal", True)) if is_causal is None else bool(is_causal)
    call = AttentionCall(int(module.layer_idx), query, key, value, attention_mask, float(scaling), None,
                         kwargs.get("sliding_window"), is_causal, module)
    out = planned_attention(call, state.heads, state.plan.block_size, compile=state.compile)
    return out.transpose(1, 2).contiguous(), None


def head_keep(call: AttentionCall, heads: dict[int, HeadPattern], block: int) -> dict[str, torch.Tensor]:
    """The kept-key structure of one layer call (prefill: query i is key i).

    Returns ``blocks`` bool (B, H, nb, nb) (tiles kept by block patterns), ``columns`` and
    ``diagonals`` bool (B, H, n) (vertical-slash), ``is_vs`` bool (H,). Unplanned heads keep nothing
    here (they run the model's kernel). A key is kept for row i of head h iff the model allows it and
    ``blocks[b, h, i // block, j // block]`` or (``is_vs[h]`` and (``columns[b, h, j]`` or
    ``diagonals[b, h, i - j]``)).
    """
    q, k = call.query, call.key
    B, H, n, _ = q.shape
    dev = q.device
    nb = num_blocks(n, block)
    blocks = torch.zeros(B, H, nb, nb, dtype=torch.bool, device=dev)
    columns = torch.zeros(B, H, n, dtype=torch.bool, device=dev)
    diagonals = torch.zeros(B, H, n, dtype=torch.bool, device=dev)
    is_vs = torch.zeros(H, dtype=torch.bool, device=dev)
    qb = torch.arange(nb, device=dev)[:, None]
    kb = torch.arange(nb, device=dev)[None, :]
    order = cols = diags = None
    for h, p in heads.items():
        if p.pattern == "streaming":
            win = (qb - kb >= 0) & (qb - kb < p.window_blocks) if call.is_causal else (qb - kb).abs() < p.window_blocks
            if p.sink_blocks > 0:
                win = win | (kb < p.sink_blocks)
            blocks[:, h] = win
        elif p.pattern == "block-topk":
            if order is None:
                order = block_estimate_order(q, k, call.scaling, block, call.is_causal)  # (B, H, nb, nb)
            take = order[:, h, :, : max(p.blocks, 0)]
            blocks[:, h].scatter_(-1, take, True)
        elif p.pattern == "vertical-slash":
            if cols is None:
                last = torch.arange(max(n - VS_LAST_Q, 0), n, device=dev)
                cols, diags = vertical_slash_order(q, k, call.scaling, allowed_mask(call, last))
                cols, diags = rank_of(cols), rank_of(diags)
            columns[:, h] = cols[:, h] < p.vertical_size
            diagonals[:, h] = diags[:, h] < p.slash_size
            is_vs[h] = True
        else:
            raise ConfigError(f"L{call.layer}.H{h}: pattern {p.pattern!r} cannot run as a kernel")
    return {"blocks": blocks, "columns": columns, "diagonals": diagonals, "is_vs": is_vs}


def planned_attention(call: AttentionCall, heads: dict[int, HeadPattern], block: int,
                      compile: bool = True) -> torch.Tensor:
    """Output (B, H, n, d) of one layer: planned heads by FlexAttention with their pattern's block
    mask, the other heads by ``scaled_dot_product_attention`` under the model's mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    q, k, v = call.query, call.key, call.value
    B, H, n, d = q.shape
    groups = H // k.shape[1]
    allowed = allowed_mask(call).expand(B, 1, n, n)[:, 0]  # (B, n, n)
    keep = head_keep(call, heads, block)
    blocks, columns, diagonals, is_vs = keep["blocks"], keep["columns"], keep["diagonals"], keep["is_vs"]

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        vs = is_vs[h] & (columns[b, h, kv_idx] | diagonals[b, h, torch.clamp(q_idx - kv_idx, min=0)])
        return allowed[b, q_idx, kv_idx] & (blocks[b, h, q_idx // block, kv_idx // block] | vs)

    bm = create_block_mask(mask_mod, B, H, n, n, device=q.device, BLOCK_SIZE=block)
    fn = _flex_fn(compile)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = fn(q, k, v, block_mask=bm, scale=call.scaling, enable_gqa=groups > 1)
    rest = [h for h in range(H) if h not in heads]
    if rest:  # unplanned heads of this layer: dense attention under the model's mask
        idx = torch.tensor(rest, device=q.device)
        safe = allowed | ~allowed.any(-1, keepdim=True)  # fully masked (padding) rows: finite output
        o = torch.nn.functional.scaled_dot_product_attention(
            q[:, idx], k[:, idx // groups], v[:, idx // groups], attn_mask=safe[:, None], scale=call.scaling)
        out = out.clone()
        out[:, idx] = o.to(out.dtype)
    return out


def _flex_fn(compile: bool) -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    if not compile:
        return flex_attention
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]
