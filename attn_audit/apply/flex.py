"""The attention function that runs a plan with FlexAttention (see :mod:`attn_audit.apply`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from attn_audit.apply.plan import HeadPattern, LoadedPlan, load_plan
from attn_audit.capture.interface import AttentionCall, allowed_mask
from attn_audit.errors import ConfigError
from attn_audit.export.base import ENCODER_DECODER, ExportError
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
    if getattr(cfg, "is_encoder_decoder", False) or getattr(model.config, "is_encoder_decoder", False):
        raise ExportError(ENCODER_DECODER)
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


def model_kernel(name: str) -> Any:
    """The model's own attention function registered under ``name`` (``sdpa`` when unknown)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name] if name in ALL_ATTENTION_FUNCTIONS else ALL_ATTENTION_FUNCTIONS["sdpa"]


def _flex_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query (B, H, n, d), key/value (B, Hkv, n, d) -> output (B, n, H, d)."""
    state: _LayerState | None = getattr(module, _STATE_ATTR, None)
    own = model_kernel(state.previous if state else "sdpa")
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


EAGER_CHUNK_ELEMENTS = 1 << 25
"""Eager FlexAttention evaluates the mask and the scores over the whole (batch, head, query, key)
grid: queries run in chunks of whole blocks holding at most this many grid cells (≈ 128 MB of
float32 per intermediate), so memory stays bounded at long lengths."""


@dataclass
class LayerMask:
    """One layer call's kept keys as FlexAttention block masks (see :func:`layer_mask`).

    ``tiles`` bool (B, H, nqb, nkb): the key blocks holding a kept key, per query block;
    ``full`` bool (B, H, nqb, nkb): the tiles whose every key is kept (no mask evaluation needed).
    ``allowed`` bool (B, n, n): the model's mask; ``allowed_tiles`` bool (B, nqb, nkb): the tiles
    holding an allowed key (what a dense kernel computes). ``keep``: :func:`head_keep`'s structure.
    """

    block: int
    n: int
    allowed: torch.Tensor
    keep: dict[str, torch.Tensor]
    tiles: torch.Tensor
    full: torch.Tensor
    allowed_tiles: torch.Tensor

    def mask_mod(self, q_offset: int = 0, heads: torch.Tensor | None = None) -> Any:
        """The key-level rule: query ``q_idx + q_offset`` of (local) head ``h`` (global head
        ``heads[h]`` when given) keeps key ``kv_idx``."""
        allowed, block = self.allowed, self.block
        blocks, columns, diagonals, is_vs = (self.keep[k] for k in ("blocks", "columns", "diagonals", "is_vs"))

        def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            hh = h if heads is None else heads[h]
            qq = q_idx + q_offset
            vs = is_vs[hh] & (columns[b, hh, kv_idx] | diagonals[b, hh, torch.clamp(qq - kv_idx, min=0)])
            return allowed[b, qq, kv_idx] & (blocks[b, hh, qq // block, kv_idx // block] | vs)

        return mask_mod

    def block_mask(self, heads: list[int] | None = None, q_blocks: tuple[int, int] | None = None) -> Any:
        """The ``BlockMask`` over query heads ``heads`` (default all, in order) and query blocks
        ``q_blocks`` = [first, last) (default all), built from the tiles (no (n, n) grid per head)."""
        from torch.nn.attention.flex_attention import BlockMask

        nqb = self.tiles.shape[2]
        first, last = q_blocks or (0, nqb)
        idx = None if heads is None else torch.tensor(heads, device=self.tiles.device, dtype=torch.long)
        tiles, full = self.tiles[:, :, first:last], self.full[:, :, first:last]
        if idx is not None:
            tiles, full = tiles[:, idx], full[:, idx]
        partial = tiles & ~full

        def kv(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            order = torch.argsort(t.to(torch.int8), dim=-1, descending=True, stable=True)
            return t.sum(-1).to(torch.int32), order.to(torch.int32)

        num, ind = kv(partial)
        fnum, find = kv(full)
        q_len = min(self.n, last * self.block) - first * self.block
        return BlockMask.from_kv_blocks(num, ind, fnum, find, BLOCK_SIZE=self.block,
                                        mask_mod=self.mask_mod(first * self.block, idx),
                                        seq_lengths=(q_len, self.n))


def layer_mask(call: AttentionCall, heads: dict[int, HeadPattern], block: int) -> LayerMask:
    """The kept keys of one layer call's planned ``heads`` (:func:`head_keep`) as tiles of
    ``block`` x ``block``: a tile is computed when it holds an allowed kept key, and is *full*
    (computed without evaluating the mask) when every key in it is allowed and kept.

    Streaming and block-topk heads keep whole tiles, so their tiles are exact; a vertical-slash
    head's tiles are those its kept columns cross or its kept diagonals pass near (a superset:
    the mask decides inside them). Cost O(B·H·nb²) for the tiles plus the model's (B, n, n) mask,
    never an (n, n) grid per head.
    """
    q = call.query
    B, H, n, _ = q.shape
    nb = num_blocks(n, block)
    pad = nb * block - n
    allowed = allowed_mask(call).expand(B, 1, n, n)[:, 0]  # (B, n, n)
    keep = head_keep(call, heads, block)
    grid = torch.nn.functional.pad(allowed, (0, pad, 0, pad)).view(B, nb, block, nb, block)
    any_t = grid.any(4).any(2)  # (B, nb, nb): tiles with an allowed key
    all_t = grid.all(4).all(2)
    is_vs = keep["is_vs"].view(1, H, 1, 1)
    block_tiles = keep["blocks"] & any_t[:, None]
    full = block_tiles & all_t[:, None] & ~is_vs
    # vertical-slash: key blocks holding a kept column; query-key block offsets d = qb - kb whose
    # diagonals i - j (in (d-1)·block+1 .. (d+1)·block-1) include a kept one
    cols = torch.nn.functional.pad(keep["columns"], (0, pad)).view(B, H, nb, block).any(-1)  # (B, H, nkb)
    dg = torch.nn.functional.pad(keep["diagonals"], (0, pad)).view(B, H, nb, block).any(-1)  # (B, H, nb)
    near = dg.clone()
    near[..., 1:] |= dg[..., :-1]
    qb = torch.arange(nb, device=q.device)[:, None]
    kb = torch.arange(nb, device=q.device)[None, :]
    delta = (qb - kb).clamp_min(0)  # key after the query: the rule reads diagonal 0
    below = torch.where(qb >= kb, near[..., delta], keep["diagonals"][..., :1, None].expand(B, H, nb, nb))
    vs_tiles = (cols[:, :, None, :] | below) & any_t[:, None] & is_vs
    return LayerMask(block, n, allowed, keep, block_tiles | vs_tiles, full, any_t)


def planned_attention(call: AttentionCall, heads: dict[int, HeadPattern], block: int,
                      compile: bool = True, mask: LayerMask | None = None) -> torch.Tensor:
    """Output (B, H, n, d) of one layer: planned heads by FlexAttention with their pattern's block
    mask (:func:`layer_mask`, or ``mask`` when already built for this call), the other heads by
    ``scaled_dot_product_attention`` under the model's mask.

    Compiled FlexAttention runs the whole layer in one call (a fused kernel that skips the
    uncomputed tiles); eager FlexAttention materialises the scores and the mask, so it runs in
    query chunks of whole blocks (:data:`EAGER_CHUNK_ELEMENTS`)."""
    q, k, v = call.query, call.key, call.value
    B, H, n, d = q.shape
    groups = H // k.shape[1]
    lm = mask if mask is not None else layer_mask(call, heads, block)
    nb = lm.tiles.shape[2]
    step = nb if compile else max(1, EAGER_CHUNK_ELEMENTS // (B * H * n * block))
    fn = flex_kernel(compile)
    out = torch.empty_like(q)
    rest = [h for h in range(H) if h not in heads]
    plain = call.attention_mask is None and call.is_causal and not call.sliding_window
    idx = torch.tensor(rest, device=q.device) if rest else None
    for first in range(0, nb, step):
        last = min(nb, first + step)
        rows = slice(first * block, min(n, last * block))
        bm = lm.block_mask(q_blocks=(first, last))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out[:, :, rows] = fn(q[:, :, rows], k, v, block_mask=bm, scale=call.scaling, enable_gqa=groups > 1)
        if idx is None:
            continue
        # unplanned heads of this layer: dense attention under the model's mask
        qs, ks, vs = q[:, idx, rows], k[:, idx // groups], v[:, idx // groups]
        if plain and rows.start == 0 and rows.stop == n:
            o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=call.scaling)
        else:
            a = lm.allowed[:, rows]
            safe = a | ~a.any(-1, keepdim=True)  # fully masked (padding) rows: finite output
            o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=safe[:, None],
                                                                 scale=call.scaling)
        out[:, idx, rows] = o.to(out.dtype)
    return out


def flex_kernel(compile: bool) -> Any:
    """``flex_attention``, compiled once per process (``dynamic=False``) when ``compile``."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compile:
        return flex_attention
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]
