"""Verification by simulation: masks, the no-op plan, and a real run on the bundled models."""

from __future__ import annotations

import math

import pytest
import torch

from attn_audit import AuditConfig, MeasureSpec, audit
from attn_audit.verify import keep_mask, verify_plan
from tests.conftest import tiny_model


def test_keep_mask_top_k_and_sink_window():
    s = torch.tensor([[0.0, -math.inf, -math.inf, -math.inf],
                      [1.0, 3.0, -math.inf, -math.inf],
                      [5.0, 0.0, 2.0, -math.inf],
                      [0.0, 4.0, 1.0, 3.0]])
    top = keep_mask(s, 2, "top-k", sinks=1)
    assert top.tolist() == [[True, False, False, False], [True, True, False, False],
                            [True, False, True, False], [False, True, False, True]]
    win = keep_mask(s, 2, "sink-window", sinks=1)
    assert win.tolist() == [[True, False, False, False], [True, True, False, False],
                            [True, False, True, False], [True, False, False, True]]
    assert keep_mask(s, 4, "top-k", sinks=1).equal(torch.isfinite(s))


class _Tok:
    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, batch, add_special_tokens=False):
        return {"input_ids": [[5 + (ord(c) % 200) for c in t] for t in batch]}


def test_full_budget_plan_changes_nothing():
    """Keeping every key must give ppl_ratio 1, agreement 1 and zero per-head error."""
    model = tiny_model("llama")
    texts = ["the quick brown fox jumps over the lazy dog " * 10] * 10
    cfg = AuditConfig(seq_lens=(32,), num_sequences=3, measure=MeasureSpec(min_keys=4), reservoir_size=32, verify=True,
                      verify_sequences=2)
    result = audit(model, _Tok(), texts, cfg, name="tiny")
    plan = result.data["plan"] = [
        {"layer": l, "head": h, "kv_head": h // 2, "k": 32, "kfrac": 1.0, "flops_saving_model": 0.0}
        for l in range(2) for h in range(4)
    ]
    held = [[5 + i % 50 for i in range(32)]] * 2
    verify_plan(model, result, held, cfg, pad_id=0)
    v = result.data["verify"]
    assert v["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert v["top1_agreement"] == 1.0
    assert len(v["heads"]) == len(plan)
    assert all(h["rel_error_mean"] < 1e-5 and h["tail_mass_mean"] < 1e-6 for h in v["heads"])
    assert v["largest_plan_heads"] == len(plan)


@pytest.mark.slow
def test_smollm2_verify_on_held_out_sequences(smollm2):
    cfg = AuditConfig(seq_lens=(96,), num_sequences=4, measure=MeasureSpec(rows_per_sequence=32), reservoir_size=64, verify=True,
                      verify_sequences=2, max_ppl_increase=0.01)
    result = audit(smollm2.model, smollm2.tokenizer, None, cfg, info=smollm2.info)
    v = result.data["verify"]
    assert v["held_out"] is True and v["sequences"] == 2
    assert v["ppl_ratio"] > 0 and 0.0 <= v["top1_agreement"] <= 1.0
    assert {"layer", "head", "rel_error_mean", "rel_error_p99", "tail_mass_mean"} <= set(v["heads"][0])
    # the dropped tail mass is what the plan's eps allows, within sampling noise
    assert max(h["tail_mass_mean"] for h in v["heads"]) < 0.2
    assert 0 <= v["largest_plan_heads"] <= len(result.data["plan"])
    if v["largest_plan_heads"] < len(result.data["plan"]):
        assert v["ppl_ratio"] - 1 > cfg.max_ppl_increase  # the full plan broke the budget
    assert v["largest_plan"] is None or v["largest_plan"]["ppl_ratio"] - 1 <= cfg.max_ppl_increase
    # the kernel plan itself ran in the model (FlexAttention), beside the oracle bound
    assert result.data["plan_summary"]["kind"] == "kernel"
    sparse = result.data["plan"]
    assert all(e["pattern"] in ("streaming", "block-topk", "vertical-slash") for e in sparse)
    assert sparse, "SmolLM2 at 96 tokens plans some heads onto a kernel pattern"
    k = v["kernel"]
    assert "FlexAttention" in k["label"] and k["heads"] == len(sparse) and "oracle" in v["label"]
    assert k["ppl_ratio"] > 0 and 0.0 <= k["top1_agreement"] <= 1.0


@pytest.mark.slow
def test_minilm_verify_reports_hidden_cosine(minilm):
    cfg = AuditConfig(seq_lens=(64,), num_sequences=3, reservoir_size=64, verify=True, verify_sequences=2)
    result = audit(minilm.model, minilm.tokenizer, None, cfg, info=minilm.info)
    v = result.data["verify"]
    assert 0.0 < v["hidden_cosine"] <= 1.0 + 1e-6
    assert "ppl_ratio" not in v
