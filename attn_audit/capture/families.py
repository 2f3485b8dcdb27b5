"""Family coverage: a tiny random model of any transformers ``model_type``, and the check that
the audit's captured probabilities equal the model's own eager ``output_attentions``.

:func:`tiny_config` shrinks the family's default config (few layers, small hidden size) and
switches its attention options on where the config has them: a sliding window shorter than
the test sequence, hybrid local/global layer types, soft-capping, MoE routing, an explicit
``head_dim`` different from hidden / heads. :func:`check_type` builds the model, runs it once
under the capture and once in eager mode with ``output_attentions=True``, and compares every
attention site per query row over the allowed keys. ``scripts/family_sweep.py`` runs it over
the library's registry; the CI runs a fixed subset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from attn_audit.capture.family_sites import (
    geometry_check,
    site_count_reason,
    softmax_layers,
    want_geo,
)
from attn_audit.capture.interface import (
    AttentionCall,
    allowed_mask,
    attention_probs,
    capturing,
    scores,
    skipped_calls,
)
from attn_audit.errors import AttnAuditError

SEQ = 24  # test sequence length; windows are set shorter than this
WINDOW = 8
TOL = 1e-5
_SHAPES: list[tuple[int, int, int]] = []  # (heads, kv heads, d_qk) of each call of the last compare
_MODULES: list[Any] = []  # the module of each call of the last compare
_MAX_LOGIT = [0.0]  # the largest |logit| over the allowed keys of the last compare

# attribute -> tiny value, applied when the family's default config has the attribute
SHRINK: dict[str, Any] = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "embed_dim": 64,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "num_decoder_layers": 2,
    "encoder_layers": 2, "decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2,
    "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "d_ff": 128, "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128, "ffn_hidden_size": 128, "hidden_dim": 128,
    "vocab_size": 512, "max_position_embeddings": 128, "n_positions": 128, "max_seq_len": 128,
    "sliding_window": WINDOW, "attention_window": WINDOW,
    # MoE: a few small experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    # MLA (DeepSeek): d_qk = nope + rope differs from d_v
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12,
    "d_kv": 16,
}


# types whose calls the capture reproduces exactly, but whose kernel heads are not fixed heads
NOT_PER_HEAD: dict[str, str] = {
    "jetmoe": "mixture of attention heads: the kernel's query head h is each token's h-th routed expert (and its "
              "key heads are tiled copies), not a fixed head, so per-head figures would mix experts",
}

# options dropped, in this order, when the family cannot build or run with them
RELAX: tuple[tuple[str, ...], ...] = (
    (),
    ("num_key_value_heads", "num_kv_heads"),  # MLA and some others: as many KV heads as query heads
    ("head_dim", "layer_types", "attn_logit_softcapping", "v_head_dim"),
    ("core",),  # only the core sizes shrunk, every other option the family's default
)
CORE = {"hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer", "num_layers", "num_attention_heads",
        "n_head", "num_heads", "num_key_value_heads", "num_kv_heads", "intermediate_size", "vocab_size"}


def tiny_config(model_type: str, drop: tuple[str, ...] = ()) -> Any:
    """A tiny config of ``model_type`` with its attention options switched on (less the
    attributes in ``drop``).

    Raises whatever the family's config class raises for an impossible combination.
    """
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    have = set(default.to_dict())
    kw = {k: v for k, v in SHRINK.items() if k in have}
    if "head_dim" in have and default.to_dict().get("head_dim") is not None and "qk_nope_head_dim" not in have:
        kw["head_dim"] = 24  # explicit head_dim != hidden / heads (Gemma)
    if "attn_logit_softcapping" in have and default.to_dict().get("attn_logit_softcapping"):
        kw["attn_logit_softcapping"] = 2.0  # binds on random logits
    types = default.to_dict().get("layer_types")
    if isinstance(types, list) and types:
        from attn_audit.load import ATTENTION_LAYER_TYPES

        distinct = list(dict.fromkeys(types))  # e.g. sliding then full: a hybrid stack
        distinct.sort(key=lambda t: t not in ATTENTION_LAYER_TYPES)  # attention first (hybrid SSM stacks)
        layers = distinct + distinct[:1] if len(distinct) > 1 else distinct * 2
        kw["layer_types"] = layers
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in kw:
                kw[key] = len(layers)
    for key in ("num_key_value_heads", "num_kv_heads"):
        if key in drop and key in kw:  # as many KV heads as query heads, not the default's count
            kw[key] = SHRINK["num_attention_heads"]
    kw = {k: v for k, v in kw.items() if k not in drop or k in ("num_key_value_heads", "num_kv_heads")}
    if "core" in drop:
        kw = {k: v for k, v in kw.items() if k in CORE}
    config = AutoConfig.for_model(model_type, **kw)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        if isinstance(getattr(config, key, None), int) and getattr(config, key) >= 512:
            setattr(config, key, 0)
    return config


def model_class(config: Any) -> Any:
    """The auto class to build: seq2seq LM, causal LM, masked LM or the base model."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSeq2SeqLM,
    )
    from transformers.models.auto import modeling_auto as ma

    mt = config.model_type
    if getattr(config, "is_encoder_decoder", False) and mt in ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForSeq2SeqLM
    if mt in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    if mt in ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return AutoModelForMaskedLM
    return AutoModel


@dataclass
class TypeResult:
    """The outcome for one model_type.

    status: "pass", "fallback", "refused" or "cannot build".
    reason: one line (empty on pass).
    sites: attention sites compared; max_diff: the largest |p_capture - p_eager| over valid
    query rows and allowed keys; features: the options seen in the calls (sliding window,
    softcap, sinks, position bias, non-causal, d_v != d_qk, GQA).
    """

    model_type: str
    status: str
    reason: str = ""
    sites: int = 0
    max_diff: float | None = None
    features: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, "sites": self.sites,
                "max_diff": self.max_diff, "features": self.features}


def _inputs(config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two right-padded sequences (lengths SEQ and SEQ - 7) of random ids; decoder ids too."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(getattr(config, "vocab_size", 512) or 512)
    ids = torch.randint(5, min(vocab, 512), (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, SEQ - 7 :] = 0
    pad = getattr(config, "pad_token_id", None)
    ids[1, SEQ - 7 :] = pad if isinstance(pad, int) else 0
    out = {"input_ids": ids, "attention_mask": mask}
    if getattr(config, "is_encoder_decoder", False):
        out["decoder_input_ids"] = torch.randint(5, min(vocab, 512), (2, SEQ - 8), generator=g)
    return out


def _eager_attentions(out: Any) -> list[torch.Tensor]:
    """The eager output's probabilities in call order: encoder self-attention, then per decoder
    layer self- then cross-attention (each (batch, head, q, k))."""
    if getattr(out, "encoder_attentions", None) is not None:
        enc = list(out.encoder_attentions or [])
        dec = list(getattr(out, "decoder_attentions", None) or [])
        cross = list(getattr(out, "cross_attentions", None) or [])
        inter = [t for pair in zip(dec, cross) for t in pair] if cross else dec
        return enc + inter
    return [a for a in (out.attentions or []) if a is not None]


def _features(call: AttentionCall) -> set[str]:
    f = set()
    if call.sliding_window:
        f.add("sliding_window")
    if call.softcap:
        f.add("softcap")
    if call.s_aux is not None:
        f.add("sinks")
    if call.position_bias is not None or call.mask_bias:
        f.add("position_bias")
    if not call.is_causal:
        f.add("non_causal")
    if call.value.shape[-1] != call.query.shape[-1]:
        f.add("d_v!=d_qk")
    if call.key.shape[1] != call.query.shape[1]:
        f.add("gqa")
    if call.query.shape[2] != call.key.shape[2]:
        f.add("cross_attention")
    return f


def _eager_softmax(out: Any, config: Any) -> list[torch.Tensor]:
    """The eager output's probabilities of the softmax attention layers (see :func:`softmax_layers`)."""
    ref = _eager_attentions(out)
    keep = softmax_layers(config, len(ref))
    return ref if keep is None else [r for r, k in zip(ref, keep) if k]


def compare(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[int, float, list[str], int]:
    """Run ``model`` under the capture and in eager mode; return (sites compared, max abs
    difference over valid query rows and allowed keys, features seen, eager attention count).

    Raises:
        AttnAuditError: the capture refused a call (its message is the reason).
    """
    probs: list[torch.Tensor] = []
    allowed: list[torch.Tensor] = []
    feats: set[str] = set()

    def consumer(call: AttentionCall) -> None:
        probs.append(attention_probs(call))
        allowed.append(allowed_mask(call))
        feats.update(_features(call))
        _SHAPES.append((call.query.shape[1], call.key.shape[1], call.query.shape[-1]))
        _MODULES.append((call.module, call.query.shape[2], call.key.shape[2]))
        live = scores(call)
        _MAX_LOGIT[0] = max(_MAX_LOGIT[0], _amax(live[torch.isfinite(live)]))
        if _SHAPES[0] != _SHAPES[-1]:
            feats.add("heads_vary")
        return None

    _SHAPES.clear()
    _MODULES.clear()
    _MAX_LOGIT[0] = 0.0
    with torch.no_grad():
        with capturing(model, consumer):
            model(**inputs)
        model.set_attn_implementation("eager")
        ref = _eager_softmax(model(**inputs, output_attentions=True), model.config)
    if len(probs) != len(ref):
        return len(probs), float("nan"), sorted(feats), len(ref)
    mask = inputs["attention_mask"].bool()
    worst = 0.0
    if "sinks" in feats and all(torch.allclose(w.float().sum(-1)[mask[:, None, :].expand(w.shape[:-1])],
                                               torch.tensor(1.0), atol=1e-4) for w in ref):
        # the family's eager output_attentions are renormalised over the keys (the sink scales the
        # output instead, granite_swa): compare the captured keys' distribution with them
        probs = [p / p.sum(-1, keepdim=True).clamp_min(1e-30) for p in probs]
        feats.add("eager_weights_without_sink")
    for got, want, ok in zip(probs, ref, allowed):
        if got.shape != want.shape:
            return len(probs), float("inf"), sorted(feats), len(ref)
        rows = mask if got.shape[2] == mask.shape[1] else torch.ones(got.shape[0], got.shape[2], dtype=torch.bool)
        sel = rows[:, None, :, None] & ok.expand_as(got)
        diff = (got - want.float()).abs()[sel]
        # disallowed keys must carry no probability in either
        leak = max(_amax(got[~sel & rows[:, None, :, None]]),
                   _amax(want.float()[~ok.expand_as(want) & rows[:, None, :, None]]))
        worst = max(worst, _amax(diff), leak)
    return len(probs), worst, sorted(feats), len(ref)


def check_type(model_type: str, seed: int = 0) -> TypeResult:
    """Build a tiny ``model_type`` and compare the capture with eager ``output_attentions``."""
    from attn_audit.load import attention_geometry

    failure = ""
    for drop in RELAX:
        try:
            torch.manual_seed(seed)
            config = tiny_config(model_type, sum(RELAX[: RELAX.index(drop) + 1], ()))
            model = model_class(config).from_config(config, attn_implementation="eager").eval()
        except Exception as exc:  # noqa: BLE001 - any failure of the family's own code
            failure = failure or _line(exc)
            continue
        inputs = _inputs(config, seed)
        try:
            with torch.no_grad():
                ref = _eager_softmax(model(**inputs, output_attentions=True), config)
            break
        except Exception as exc:  # noqa: BLE001
            failure = failure or "eager forward fails: " + _line(exc)
    else:
        return TypeResult(model_type, "cannot build", failure)
    if not ref:
        return TypeResult(model_type, "cannot build", "eager forward returns no attention probabilities")
    if any(a.dim() != 4 for a in ref):
        return TypeResult(model_type, "cannot build", "eager output_attentions are not (batch, head, query, key) "
                          f"softmax probabilities (shape {tuple(ref[0].shape)}): no softmax attention to audit")
    try:
        sites, worst, feats, n_ref = compare(model, inputs)
        shapes = list(_SHAPES)
        skipped = skipped_calls()
    except AttnAuditError as exc:
        return TypeResult(model_type, "refused", str(exc))
    except Exception as exc:  # noqa: BLE001
        return TypeResult(model_type, "refused", "capture fails: " + _line(exc))
    if sites == 0:
        return _fallback(model_type, model, config, inputs, ref)
    if sites != n_ref:
        return TypeResult(model_type, "refused", site_count_reason(model, list(_MODULES), n_ref,
                                                                   inputs["input_ids"].shape[1]), sites, None, feats)
    note = "; ".join("not a site: " + line for line in skipped)
    why, within_own = "", False
    if not worst <= TOL and sites == n_ref:
        worst64, own = _float64_diff(model, inputs, ref)
        if worst64 is not None and worst64 <= max(TOL, own):  # float32 rounding, not the capture: say so
            bound = "" if worst64 <= TOL else (
                f", within the {own:.1e} by which the model's own float32 eager attention differs from float64 "
                f"(logits reach |s| = {_MAX_LOGIT[0]:.0f})")
            note += (f"{'; ' if note else ''}differs by {worst:.1e} in float32 (large logits), {worst64:.1e} with the "
                     f"model in float64{bound}")
            worst, within_own = worst64, True
        elif worst64 is not None:
            why = (f" ({worst64:.2e} with the model in float64, more than its own float32 eager attention's "
                   f"{own:.1e}; logits reach |s| = {_MAX_LOGIT[0]:.0f})")
    if not (worst <= TOL or within_own):
        return TypeResult(model_type, "refused", f"captured probabilities differ from eager by {worst:.2e}{why}",
                          sites, worst, feats)
    if getattr(config, "is_encoder_decoder", False):
        return TypeResult(model_type, "pass", "capture exact (encoder self-, decoder self- and cross-attention as "
                          "separate sites)", sites, worst, feats)
    geo = attention_geometry(config.get_text_config())
    if model_type in NOT_PER_HEAD:
        return TypeResult(model_type, "refused", NOT_PER_HEAD[model_type], sites, worst, feats)
    if "heads_vary" in feats or want_geo(geo) != (sites, *shapes[0]):
        ok, reason = geometry_check(model, model_type, geo, shapes)
        reason = "; ".join(r for r in (reason, note if ok else "") if r)
        return TypeResult(model_type, "pass" if ok else "refused", reason, sites, worst, feats)
    return TypeResult(model_type, "pass", note, sites, worst, feats)


def _float64_diff(model: Any, inputs: dict[str, torch.Tensor],
                  ref32: list[torch.Tensor]) -> tuple[float | None, float]:
    """The comparison again with the model in float64 (the capture still scores in float32), and
    by how much the model's own float32 eager probabilities ``ref32`` differ from its float64 ones
    (over valid query rows): separates float32 rounding of large logits (head_dim 512, scaling 1)
    from a capture error. (None, 0) when the family cannot run in float64."""
    try:
        model.double()
        sites, worst, _, n_ref = compare(model, inputs)
        with torch.no_grad():
            ref64 = _eager_softmax(model(**inputs, output_attentions=True), model.config)
    except Exception:  # noqa: BLE001 - a family whose code assumes float32
        return None, 0.0
    if sites != n_ref or len(ref64) != len(ref32):
        return None, 0.0
    mask = inputs["attention_mask"].bool()
    own = 0.0
    for a, b in zip(ref32, ref64):
        rows = mask if a.shape[2] == mask.shape[1] else torch.ones(a.shape[0], a.shape[2], dtype=torch.bool)
        own = max(own, _amax((a.double() - b.double())[rows[:, None, :, None].expand_as(a)]))
    return worst, own


def _fallback(model_type: str, model: Any, config: Any, inputs: dict[str, torch.Tensor],
              ref: list[torch.Tensor]) -> TypeResult:
    """Attention outside the interface: the audit's fallback reads the eager probabilities
    (:func:`attn_audit.capture.loop.fallback_calls`); check it sees every layer, as the model
    info states, with the same numbers as the reference."""
    from attn_audit.capture.loop import fallback_calls, probe_sites
    from attn_audit.load import model_info

    outside = "attention is computed outside the transformers attention interface"
    if getattr(config, "is_encoder_decoder", False):
        return TypeResult(model_type, "refused", outside + " (encoder-decoder: no fallback)")
    n = inputs["input_ids"].shape[1]
    pooled = [tuple(r.shape[2:]) for r in ref if tuple(r.shape[2:]) != (n, n)]
    if pooled:
        return TypeResult(model_type, "refused", f"{outside}, and {len(pooled)} of its {len(ref)} attention layers "
                          f"give weights that are not token to token (query x keys {pooled[0]} for {n} tokens: pooled "
                          "or latent positions, or a band with keys as window offsets)")
    info = model_info(model, model_type, "sweep")
    try:
        probe_sites(model, info)
        with torch.no_grad():
            calls = fallback_calls(model, info, inputs["input_ids"], inputs["attention_mask"])
    except Exception as exc:  # noqa: BLE001
        return TypeResult(model_type, "refused", f"{outside}; its eager fallback fails: {_line(exc)}")
    want = (info["num_layers"], info["num_heads"])
    got = (len(calls), calls[0].probs.shape[1] if calls else 0)
    if want != got or len(calls) != len(ref):
        return TypeResult(model_type, "refused", f"{outside}; the fallback sees (layers, heads) = {got}, the model info "
                          f"{want}")
    mask = inputs["attention_mask"].bool()[:, None, :, None]
    worst = max(_amax((c.probs.float() - r.float()).masked_fill(~mask, 0)) for c, r in zip(calls, ref))
    if not worst <= TOL:
        return TypeResult(model_type, "refused", f"{outside}; its eager fallback differs from eager by {worst:.2e}")
    heads = "" if "config_geometry" not in info else (
        f"; {info['num_heads']} attention heads per layer, as its probabilities carry (the config says "
        f"{info['config_geometry'][0]})")
    return TypeResult(model_type, "fallback", outside + ": audited from the model's own eager output_attentions "
                      "(no Q/K sites)" + heads, len(calls), worst, ["non_causal"] if not info["causal"] else [])


def _amax(t: torch.Tensor) -> float:
    """max |t| (0 for an empty tensor)."""
    return float(t.abs().max()) if t.numel() else 0.0


def _line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:200]
