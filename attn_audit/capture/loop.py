"""The batch loop of one length: run the model over the sequences with the capture installed,
fold every layer's attention call into an :class:`Accumulator`, save and resume checkpoints,
shard the sequences over torchrun ranks and gather the ranks' states."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from attn_audit.capture import distributed
from attn_audit.capture.accumulate import AccumulateConfig, Accumulator
from attn_audit.capture.hooks import projection_hooks
from attn_audit.capture.interface import AttentionCall, capturing, skipped_calls
from attn_audit.capture.seq2seq import (
    CAUSAL_KINDS,
    decoder_start_id,
    forward_kwargs,
    is_encoder_decoder,
    site_kinds,
)
from attn_audit.config import AuditConfig
from attn_audit.data import TokenData, batches
from attn_audit.errors import CaptureError, CheckpointError, UnsupportedFamilyError
from attn_audit.progress import NullProgress, Progress

FALLBACK = "eager-fallback"
"""``info["capture"]`` of a model whose attention is computed outside the interface: the audit
reads the model's own eager ``output_attentions`` probabilities instead of Q/K."""


def capture_length(
    model: Any,
    info: dict[str, Any],
    data: TokenData,
    config: AuditConfig,
    pad_id: int,
    progress: Progress,
    checkpoint: Any = None,
    last: bool = True,
) -> dict[str, Any]:
    """Run the model over one length's sequences and return the accumulator's summary.

    With a :class:`attn_audit.capture.checkpoint.Checkpointer`, the state is saved every ``every``
    sequences and, when resuming, restored so that finished batches are skipped.
    """

    acc_cfg = AccumulateConfig(measure=config.measure, seed=config.seed, reservoir_size=config.reservoir_size)
    acc = Accumulator(info, data.seq_len, len(data.sequences), acc_cfg)
    size, rank = distributed.world()
    lo, hi = distributed.shard(len(data.sequences), size, rank)
    if size > 1:
        checkpoint = None  # checkpoints are for single-process runs
        progress = progress if rank == 0 else NullProgress()
    _capture_shard(model, info, data, lo, hi, config, pad_id, acc, progress, checkpoint, last)
    if size > 1:
        states = distributed.gather_states(acc.state())
        if states is None:
            return {}
        with torch.inference_mode():  # the reservoir buffers were made in inference mode
            for other in states[1:]:
                acc.merge_state(other)
    summary = acc.summary()
    if len(summary["layers_seen"]) != info["num_layers"]:
        raise CaptureError(
            f"captured {len(summary['layers_seen'])} of {info['num_layers']} layers; this model does not "
            "route every attention layer through the attention interface (see --list-families)"
        )
    return summary


def _capture_shard(model: Any, info: dict[str, Any], data: TokenData, lo: int, hi: int, config: AuditConfig,
                   pad_id: int, acc: Any, progress: Progress, checkpoint: Any, last: bool) -> None:
    """Fold this rank's ``data.sequences[lo:hi]`` into ``acc`` in batches of (batch, pos) ids and masks, skipping
    those a resumed checkpoint holds; save every ``checkpoint.every`` sequences and at the length's end unless it
    ends the audit (``last``); progress in tokens; freed memory released after each batch."""
    device = next(model.parameters()).device
    base = getattr(model, "base_model", model)
    done = 0
    if checkpoint is not None:
        done = _restore(checkpoint, acc, data.seq_len, hi, config.batch_size)
    progress.start(f"seq-len {data.seq_len}", sum(len(s) for s in data.sequences[lo:hi]))
    progress.advance(sum(len(s) for s in data.sequences[lo:done]))
    since_save = 0
    fallback = info.get("capture") == FALLBACK
    capture = contextlib.nullcontext() if fallback else capturing(model, acc)
    with torch.inference_mode(), capture, projection_hooks(model, info, acc.on_projection):
        for local, ids, mask in batches(data.sequences[lo:hi], config.batch_size, pad_id):
            start = lo + local
            if start < done:
                continue
            acc.begin_batch(start, mask.to(device))
            if fallback:
                for call in fallback_calls(model, info, ids.to(device), mask.to(device)):
                    acc(call)
            else:
                base(**forward_kwargs(model, ids.to(device), mask.to(device)))
            progress.advance(int(mask.sum()))
            since_save += ids.shape[0]
            finished = start + ids.shape[0]
            release_freed_memory()
            at_end = finished == len(data.sequences)
            if checkpoint is not None and not (at_end and last) and (since_save >= checkpoint.every or at_end):
                checkpoint.save(data.seq_len, finished, acc.state())
                since_save = 0
    progress.finish()


def _restore(checkpoint: Any, acc: Any, seq_len: int, total: int, batch_size: int) -> int:
    """Load a resumed checkpoint's state of ``seq_len`` into ``acc``; the sequences it holds.

    The state is checked against a fresh accumulator's (names, dtypes, shapes) and its progress
    must end on a batch boundary within the length's ``total`` sequences; else one-line refusal."""
    state = checkpoint.load(seq_len, template=acc.state())
    if state is None:
        return 0
    done = checkpoint.done(seq_len)
    if not (0 < done <= total and (done % batch_size == 0 or done == total)):
        raise CheckpointError(f"the checkpoint in {checkpoint.dir.parent} is inconsistent ({done} sequences of "
                              f"{total} at batch size {batch_size}); drop --resume and pass --force to start over")
    try:
        acc.load_state(state)
    except Exception as exc:  # noqa: BLE001 - a state that does not fit this accumulator
        raise CheckpointError(f"the checkpoint in {checkpoint.dir.parent} does not fit this run "
                              f"({type(exc).__name__}); drop --resume and pass --force to start over") from None
    return done


def probe_sites(model: Any, info: dict[str, Any], tokens: int = 8) -> None:
    """One short forward pass under the capture: every attention site must reach the interface
    with the heads and head size the model info states (before any long run starts). Where a
    causal model passes sliding windows, ``info["layer_windows"]`` records each site's window
    (None for a global layer): the plan's FLOPs count only the keys a windowed row can see.

    The geometry is read from the calls. Where the heads or the head size vary between layers
    (Gemma 4's wider global layers, MiMo's local layers with more KV heads),
    ``info["layer_heads"]`` records each site's [heads, kv heads, d_qk] and ``num_heads``,
    ``num_kv_heads`` and ``head_dim`` become the largest over the sites (``heads_per_layer``
    in the report: the records hold only the heads a layer has). Where every site agrees but
    the config's fields say otherwise, the calls' geometry replaces them (the config's is kept
    as ``config_geometry``). An encoder-decoder model is probed with a shorter decoder input
    (teacher-forced, :mod:`attn_audit.capture.seq2seq`): ``info["site_kinds"]`` labels each site
    encoder-self, decoder-self or cross by its (query, key) lengths and ``info["layer_causal"]``
    says which sites are causal (decoder self-attention).

    Raises:
        UnsupportedFamilyError: no call reaches the interface (attention computed in the model's
            own code), or fewer sites than attention layers.
        CaptureError: a call's keywords are refused, or its shapes disagree with the info.
    """
    device = next(model.parameters()).device
    seen: list[tuple[int, int, int]] = []
    lengths: list[tuple[int, int]] = []
    windows: list[int | None] = []

    def consumer(call: Any) -> None:
        seen.append((call.query.shape[1], call.key.shape[1], call.query.shape[-1]))
        lengths.append((call.query.shape[2], call.key.shape[2]))
        w = call.sliding_window
        windows.append(int(w) if isinstance(w, int) and not isinstance(w, bool) and w > 0 else None)

    ids = torch.arange(1, tokens + 1, device=device).view(1, -1)
    kwargs = forward_kwargs(model, ids)
    seq2seq = is_encoder_decoder(model)
    if seq2seq:  # a shorter decoder input tells the three kinds of site apart by their lengths
        dec = kwargs["decoder_input_ids"][:, : tokens - 3]
        kwargs.update(decoder_input_ids=dec, decoder_attention_mask=torch.ones_like(dec))
    with torch.inference_mode(), capturing(model, consumer):
        getattr(model, "base_model", model)(**kwargs)
    name = info.get("family", "?")
    info["capture"] = "interface"
    if skipped_calls():  # e.g. Inkling 2's attention over depth: run, but not a site
        info["skipped_calls"] = skipped_calls()
    if seq2seq:
        if not seen:
            raise UnsupportedFamilyError(f"model_type '{name}' is an encoder-decoder model that computes attention "
                                         "outside transformers' attention interface (no fallback; see --list-families)")
        _label_sites(model, info, lengths, tokens, tokens - 3)
    if not seen:
        try:
            probs = eager_attentions(model, ids, torch.ones_like(ids))
        except Exception:  # noqa: BLE001 - the model's eager path cannot return its probabilities
            probs = []
        heads = {p.shape[1] for p in probs}
        if len(probs) == info["num_layers"] and len(heads) == 1 and all(p.shape[2:] == (tokens, tokens) for p in probs):
            h = heads.pop()
            if h != info["num_heads"]:  # ConvBERT: half its heads are convolutions, the rest attention
                info["config_geometry"] = [info["num_heads"], info["num_kv_heads"], info["head_dim"]]
                info["num_heads"] = info["num_kv_heads"] = h
            info["capture"] = FALLBACK
            return
        raise UnsupportedFamilyError(
            f"model_type '{name}' computes attention in its own code, outside transformers' attention interface; "
            "its Q/K cannot be captured (see --list-families)")
    if len(seen) != info["num_layers"]:
        raise UnsupportedFamilyError(
            f"model_type '{name}': {len(seen)} attention calls per forward pass but {info['num_layers']} attention "
            "layers in its config; some layers compute attention outside the interface (see --list-families)")
    if any(w is not None for w in windows) and info["causal"]:
        info["layer_windows"] = windows  # what each site's kernel receives (local / global layers)
    odd = [i for i, (h, kv, _) in enumerate(seen) if h <= 0 or kv <= 0 or h % kv]
    if odd:
        raise CaptureError(
            f"attention site {odd[0]} has {seen[odd[0]][0]} query heads on {seen[odd[0]][1]} key heads "
            "(not equal groups)")
    if len(set(seen)) > 1:  # heads or head size vary between layers: each site's own geometry
        info["layer_heads"] = [list(g) for g in seen]
        info["num_heads"] = max(h for h, _, _ in seen)
        info["num_kv_heads"] = max(kv for _, kv, _ in seen)
        info["head_dim"] = max(d for _, _, d in seen)
        return
    want = (info["num_heads"], info["num_kv_heads"], info["head_dim"])
    if seen[0] != want:  # the config's fields do not describe the kernel's tensors (DeepSeek-V4: one
        # K=V head whatever num_key_value_heads says): the calls are what the audit measures
        info["config_geometry"] = list(want)
        info["num_heads"], info["num_kv_heads"], info["head_dim"] = seen[0]


def _label_sites(model: Any, info: dict[str, Any], lengths: list[tuple[int, int]], enc_len: int, dec_len: int) -> None:
    """Record each site's kind in ``info["site_kinds"]`` and its causality in ``info["layer_causal"]``
    (an encoder-decoder model, probed with ``enc_len`` encoder and ``dec_len`` decoder tokens)."""
    try:
        kinds = site_kinds(lengths, enc_len, dec_len)
    except ValueError as exc:
        raise UnsupportedFamilyError(f"model_type '{info.get('family', '?')}': {exc}") from None
    info["site_kinds"] = kinds
    info["decoder_start_token_id"] = decoder_start_id(model)
    info["layer_causal"] = [k["kind"] in CAUSAL_KINDS for k in kinds]


def eager_attentions(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The model's own eager attention probabilities, one (batch, head, pos, pos) per layer.

    A model outside the interface ignores ``set_attn_implementation`` (transformers only warns),
    yet reads ``config._attn_implementation`` in its forward pass (Falcon: an sdpa-style boolean
    mask added to eager scores gives wrong probabilities): the configs are switched directly.
    """
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if c is not None}
    configs[id(model.config)] = model.config
    previous = {k: c._attn_implementation_internal for k, c in configs.items()}
    for c in configs.values():
        c._attn_implementation_internal = "eager"
    try:
        out = getattr(model, "base_model", model)(input_ids=ids, attention_mask=mask, output_attentions=True)
    finally:
        for k, c in configs.items():
            c._attn_implementation_internal = previous[k]
    return [a for a in (getattr(out, "attentions", None) or []) if a is not None]


def fallback_calls(model: Any, info: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor) -> list[AttentionCall]:
    """The fallback for attention computed outside the interface: one call per layer carrying
    the eager probabilities (batch, head, pos, pos) and empty Q/K (no Q/K sites)."""
    out = []
    for layer, p in enumerate(eager_attentions(model, ids, mask)):
        b, h, n, _ = p.shape
        empty_q = p.new_empty(b, h, n, 0)
        empty_k = p.new_empty(b, info["num_kv_heads"], n, 0)
        out.append(AttentionCall(layer=layer, query=empty_q, key=empty_k, value=empty_k, attention_mask=None,
                                 scaling=1.0, softcap=None, sliding_window=None, is_causal=bool(info["causal"]),
                                 probs=p))
    return out


def release_freed_memory() -> None:
    """Return freed heap pages to the OS after each batch (glibc only).

    The per-block score tensors have many sizes; glibc's allocator otherwise keeps the freed
    space as fragments and the resident size creeps up with the number of batches.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - probe for glibc
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None
