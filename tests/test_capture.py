"""Capture equivalence: probabilities recomputed from captured Q/K equal eager output_attentions."""

from __future__ import annotations

import pytest
import torch

from attn_audit.capture.interface import CAPTURE_IMPL, attention_probs, capturing
from tests.conftest import tiny_model


def _padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(5, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


def _base(model):
    return getattr(model, "base_model", model)


def check_equivalence(model, ids: torch.Tensor, mask: torch.Tensor, atol: float = 1e-5) -> int:
    """Compare per layer on non-padded query rows; return the number of layers compared."""
    probs: dict[int, torch.Tensor] = {}

    def consumer(call):
        probs[call.layer] = attention_probs(call)
        return None

    with torch.no_grad():
        with capturing(model, consumer):
            assert model.config._attn_implementation == CAPTURE_IMPL
            out_capture = _base(model)(input_ids=ids, attention_mask=mask).last_hidden_state
        assert model.config._attn_implementation == "sdpa"
        model.set_attn_implementation("eager")
        try:
            eager = _base(model)(input_ids=ids, attention_mask=mask, output_attentions=True)
        finally:
            model.set_attn_implementation("sdpa")
    assert len(eager.attentions) == len(probs) > 0
    q_valid = mask.bool()
    for layer, ref in enumerate(eager.attentions):
        got = probs[layer]
        assert got.shape == ref.shape, (got.shape, ref.shape)
        sel = q_valid[:, None, :, None].expand_as(ref)
        torch.testing.assert_close(got[sel], ref.float()[sel], atol=atol, rtol=0)
    # the capture path must not change the model's outputs
    torch.testing.assert_close(out_capture[q_valid], eager.last_hidden_state[q_valid], atol=1e-4, rtol=1e-4)
    return len(probs)


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "mistral", "gpt_neox", "llama", "bert"])
def test_tiny_families_match_eager(family):
    model = tiny_model(family)
    ids, mask = _padded_batch(256, [24, 17, 9])
    assert check_equivalence(model, ids, mask) == 2


def test_mistral_sliding_window_is_honoured():
    """With a window of 8, keys more than 8 positions back get zero probability."""
    model = tiny_model("mistral")
    ids, mask = _padded_batch(256, [30, 30])
    seen = {}

    def consumer(call):
        seen[call.layer] = attention_probs(call)

    with torch.no_grad(), capturing(model, consumer):
        model(input_ids=ids, attention_mask=mask)
    p = seen[0]
    i = torch.arange(30)
    far = i[None, :] <= i[:, None] - 8
    assert torch.all(p[..., far] == 0)
    assert torch.all(p[..., ~far & (i[None, :] <= i[:, None])] > 0)


@pytest.mark.slow
def test_smollm2_real_weights_match_eager(smollm2):
    tok = smollm2.tokenizer
    enc = tok(["The capital of France is Paris, a city of light.", "Hello"], return_tensors="pt", padding=True)
    assert enc["attention_mask"].sum() < enc["attention_mask"].numel()  # padding present
    assert check_equivalence(smollm2.model, enc["input_ids"], enc["attention_mask"]) == 30


@pytest.mark.slow
def test_minilm_real_weights_match_eager(minilm):
    tok = minilm.tokenizer
    enc = tok(["Attention is naturally sparse with Gaussian input.", "Short one"], return_tensors="pt", padding=True)
    assert enc["attention_mask"].sum() < enc["attention_mask"].numel()
    assert check_equivalence(minilm.model, enc["input_ids"], enc["attention_mask"]) == 6


def test_capture_restores_implementation_on_error():
    model = tiny_model("llama")
    ids, mask = _padded_batch(256, [8])

    def boom(call):
        raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError):
        with torch.no_grad(), capturing(model, boom):
            model(input_ids=ids, attention_mask=mask)
    assert model.config._attn_implementation == "sdpa"


def _exact_accumulator_outputs(model, ids: torch.Tensor, mask: torch.Tensor):
    """Last hidden states of a forward whose attention outputs come from the exact accumulator
    (weights written by the row kernel, then weights @ V), and how many layers it replaced."""
    from attn_audit.capture.accumulate import AccumulateConfig, Accumulator
    from attn_audit.config import MeasureSpec
    from attn_audit.load import model_info

    info = model_info(model, "tiny", "test")
    acc = Accumulator(info, ids.shape[1], ids.shape[0],
                      AccumulateConfig(measure=MeasureSpec(rows_per_sequence=None, min_keys=1), reservoir_size=64))
    replaced = []

    def consumer(call):
        out = acc(call)
        replaced.append(out is not None)
        return out

    with torch.inference_mode():
        acc.begin_batch(0, mask)
        with capturing(model, consumer):
            got = _base(model)(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = _base(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    return got, ref, replaced


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "bert"])
def test_exact_audit_outputs_equal_the_models_own(family):
    """With every row measured, the accumulator returns the layer outputs itself (from the
    kernel's weights); the model's hidden states must not change beyond float rounding."""
    model = tiny_model(family)
    ids, mask = _padded_batch(256, [24, 17, 9])
    got, ref, replaced = _exact_accumulator_outputs(model, ids, mask)
    assert replaced and all(replaced)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_exact_audit_outputs_equal_smollm2s_own(smollm2):
    enc = smollm2.tokenizer(["The capital of France is Paris, a city of light.", "Hello"],
                            return_tensors="pt", padding=True)
    got, ref, replaced = _exact_accumulator_outputs(smollm2.model, enc["input_ids"], enc["attention_mask"])
    assert len(replaced) == 30 and all(replaced)
    valid = enc["attention_mask"].bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scaling", [0.125, 0.1])  # power of two (q scaled first) and not (after)
def test_scores_into_a_reused_buffer_are_the_same_bits(scaling):
    """The accumulator writes each block's scores into one reused buffer: the values must be
    those of a fresh product, in that buffer, and a buffer of the wrong shape is refused."""
    from attn_audit.capture.interface import AttentionCall, scores

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 6, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    call = AttentionCall(layer=0, query=q, key=k, value=k.clone(), attention_mask=None,
                         scaling=scaling, softcap=None, sliding_window=None, is_causal=True)
    rows = torch.arange(8, 24)
    fresh = scores(call, rows, 24)
    buf = torch.full((2, 6, 16, 24), float("nan"))
    got = scores(call, rows, 24, out=buf)
    assert got.data_ptr() == buf.data_ptr()
    assert torch.equal(got, fresh) and torch.equal(buf, fresh)
    assert torch.isinf(fresh[..., 0, 9:]).all() and torch.isfinite(fresh[..., 0, :9]).all()  # row 8
    with pytest.raises(ValueError, match="out must be"):
        scores(call, rows, 24, out=torch.empty(2, 6, 16, 23))


def test_softcapped_logits_and_eager_output():
    """With a soft-cap (Gemma-2 style), the scores are cap * tanh(s / cap) and the capture
    computes the layer output itself (eager): check both against the formula."""
    from attn_audit.capture.interface import AttentionCall, _eager, scores

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 12, 8, generator=g) * 3 for h in (4, 2, 2))
    call = AttentionCall(layer=0, query=q, key=k, value=v, attention_mask=None, scaling=0.3,
                         softcap=2.0, sliding_window=None, is_causal=True)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    raw = q @ kk.transpose(-1, -2) * 0.3
    want = (torch.tanh(raw / 2.0) * 2.0).masked_fill(torch.ones(12, 12).triu(1).bool(), float("-inf"))
    got = scores(call)
    assert got.max() <= 2.0 and raw.max() > 2.0  # the cap binds
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    out, probs = _eager(None, call, 0.0)
    torch.testing.assert_close(out, (torch.softmax(want, -1) @ vv).transpose(1, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 4, 12))
