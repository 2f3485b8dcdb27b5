"""Encoder-decoder models (T5, BART, ...): what the model is fed, and what each attention site is.

Fed: the dataset's token sequence as the encoder's ``input_ids`` and, as ``decoder_input_ids``,
the same sequence shifted right by one with the model's ``decoder_start_token_id`` in front
(teacher forcing, as ``T5._shift_right`` / BART's ``shift_tokens_right`` build them from labels);
the decoder's padding mask is the encoder's (a right-padded sequence of m tokens gives m decoder
positions: the start token and its first m - 1 tokens).

Sites: the capture numbers calls in the order of one forward pass: the encoder's self-attention
layers, then per decoder layer its self-attention and its cross-attention
(:mod:`attn_audit.capture.interface`). :func:`site_kinds` labels them from one probe pass with
different encoder and decoder lengths: (enc, enc) keys is ``encoder-self`` (bidirectional),
(dec, dec) ``decoder-self`` (causal), (dec, enc) ``cross`` (decoder queries over the encoder's
keys, bidirectional).
"""

from __future__ import annotations

from typing import Any

import torch

ENCODER_SELF, DECODER_SELF, CROSS = "encoder-self", "decoder-self", "cross"
SITE_KINDS = (ENCODER_SELF, DECODER_SELF, CROSS)
CAUSAL_KINDS = frozenset({DECODER_SELF})  # a causal row i sees keys 0..i; the others see every key


def is_encoder_decoder(model: Any) -> bool:
    """Whether ``model`` (or its config) is an encoder-decoder model."""
    cfg = getattr(model, "config", model)
    return bool(getattr(cfg, "is_encoder_decoder", False))


def decoder_start_id(model: Any) -> int:
    """The id the decoder starts from: ``decoder_start_token_id`` of the config (or generation
    config), else the pad id (T5's convention), else 0."""
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        for name in ("decoder_start_token_id", "pad_token_id"):
            tid = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(tid, int) and tid >= 0:
                return tid
    return 0


def shift_right(ids: torch.Tensor, start: int) -> torch.Tensor:
    """(batch, pos) ids shifted right by one position with ``start`` in front (the last id drops)."""
    out = ids.new_full(ids.shape, start)
    out[:, 1:] = ids[:, :-1]
    return out


def forward_kwargs(model: Any, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The keywords of one forward pass over (batch, pos) ``ids`` with padding ``mask``: just the
    ids and mask for an encoder or decoder; for an encoder-decoder also the teacher-forced
    decoder ids (``ids`` shifted right after the decoder start id) and the same mask."""
    mask = torch.ones_like(ids) if mask is None else mask
    out = {"input_ids": ids, "attention_mask": mask}
    if is_encoder_decoder(model):
        out["decoder_input_ids"] = shift_right(ids, decoder_start_id(model))
        out["decoder_attention_mask"] = mask
    return out


def site_kinds(lengths: list[tuple[int, int]], enc_len: int, dec_len: int) -> list[dict[str, Any]]:
    """Each site's kind and its index within its stack, from the (query, key) lengths of a probe
    pass with ``enc_len`` encoder and ``dec_len`` decoder tokens (``enc_len != dec_len``).

    Returns:
        one {"site", "kind", "stack_layer"} per site, in site order.

    Raises:
        ValueError: a site whose lengths match no kind.
    """
    table = {(enc_len, enc_len): ENCODER_SELF, (dec_len, dec_len): DECODER_SELF, (dec_len, enc_len): CROSS}
    counts = dict.fromkeys(SITE_KINDS, 0)
    out = []
    for site, qk in enumerate(lengths):
        kind = table.get(tuple(qk))
        if kind is None:
            raise ValueError(f"attention site {site} has {qk[0]} queries over {qk[1]} keys, neither the encoder's "
                             f"{enc_len} nor the decoder's {dec_len} tokens")
        out.append({"site": site, "kind": kind, "stack_layer": counts[kind]})
        counts[kind] += 1
    return out
