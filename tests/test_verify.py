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
        {"layer": l, "head": h, "kv_head": h // 2, "pattern": "top-k", "k": 32, "kfrac": 1.0, "flops_saving_model": 0.0}
        for l in range(2) for h in range(4)
    ]
    result.data["plan_summary"]["kind"] = "oracle-top-k"  # the oracle simulation at full budget
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
                      verify_sequences=2, max_ppl_increase=0.01, retrieval_samples=1, retrieval_lens=(480,))
    result = audit(smollm2.model, smollm2.tokenizer, None, cfg, info=smollm2.info)
    v = result.data["verify"]
    assert v["held_out"] is True and v["sequences"] == 2
    assert v["ppl_ratio"] > 0 and 0.0 <= v["top1_agreement"] <= 1.0
    assert {"layer", "head", "rel_error_mean", "rel_error_p99", "tail_mass_mean"} <= set(v["heads"][0])
    # the dropped tail mass is what the plan's eps allows, within sampling noise
    assert max(h["tail_mass_mean"] for h in v["heads"]) < 0.2
    # the largest prefix of the kernel plan within both budgets, by the applied plan's quality and passkeys
    plan, best = result.data["plan"], v["largest_plan_heads"]
    probes = {p["heads"]: p for p in v["search"]}
    assert 0 <= best <= len(plan) and probes[len(plan)]["ppl_ratio"] == pytest.approx(v["kernel"]["ppl_ratio"])
    assert "kernel plan applied with FlexAttention" in v["method"] and "passkeys" in v["method"]

    def within(p: dict) -> bool:
        return p["ppl_ratio"] - 1 <= cfg.max_ppl_increase and (p["retrieval_drop"] is None or p["retrieval_drop"] <= 0)

    assert all("retrieval_drop" in p for p in probes.values())
    assert best == len(plan) or not within(probes[best + 1])  # bisection: the next prefix broke a budget
    assert best == 0 or (within(probes[best]) and v["largest_plan"] == {k: x for k, x in probes[best].items()
                                                                        if k != "heads"})
    assert v["largest_plan_flops_saving"] == pytest.approx(sum(e["flops_saving_model"] for e in plan[:best]))
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


def test_largest_prefix_stops_where_a_budget_breaks():
    """Bisection finds the largest prefix whose metrics pass, with the retrieval budget counted as
    strictly as the quality one."""
    from attn_audit.verify import _largest_prefix

    def probe(m: int) -> dict:
        return {"ppl_ratio": 1.0 + 0.001 * m, "retrieval_drop": 0.0 if m <= 6 else 0.25}

    def ok(p: dict) -> bool:
        return p["ppl_ratio"] - 1 <= 0.01 and p["retrieval_drop"] <= 0.0

    best, probes = _largest_prefix(probe, probe(20), 20, ok)
    assert best == 6 and not ok(probes[7]) and ok(probes[6])
    best, _ = _largest_prefix(probe, probe(5), 5, ok)
    assert best == 5  # the whole plan passes: nothing probed


def test_prefix_flex_plan_keeps_only_the_first_heads():
    from attn_audit.export.flex import flex_plan_of
    from tests.rank.test_pattern_plan import _result

    r = _result()
    for m in range(len(r.data["plan"]) + 1):
        data = flex_plan_of(r, m)
        sparse = {(la, int(h)) for la, layer in enumerate(data["layers"]) for h, v in layer.items()
                  if v["pattern"] != "dense"}
        assert sparse == {(e["layer"], e["head"]) for e in r.data["plan"][:m]}
