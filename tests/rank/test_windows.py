"""Local (sliding-window) layers in the FLOP model: a windowed row sees at most ``window`` keys,
so neither the dense cost nor a budget's saving may count keys the model never computes."""

from __future__ import annotations

import pytest
import torch

from attn_audit.rank import PlanConfig, flops_saving, kept_pairs, rank_and_plan
from attn_audit.rank.kernel import tiles
from tests.synthetic import make_result


@pytest.mark.parametrize("n,k,window", [(768, 12, 512), (768, 600, 512), (300, 7, 1), (64, 64, 16), (50, 3, None)])
def test_kept_pairs_equal_the_row_by_row_count(n: int, k: int, window: int | None) -> None:
    assert kept_pairs(n, k, True, window) == sum(min(k, i, window or n) for i in range(1, n + 1))


def test_window_caps_the_saving_of_a_head() -> None:
    # 768 tokens, k = 12: a global head saves 1 - sum min(12, i) / sum i; a local head of window
    # 512 saves less, because its dense cost is only sum min(i, 512)
    dense_local = sum(min(i, 512) for i in range(1, 769))
    want = 1 - sum(min(12, i) for i in range(1, 769)) / dense_local
    assert flops_saving(768, 12, True, 512) == pytest.approx(want, rel=1e-12)
    assert flops_saving(768, 12, True, 512) < flops_saving(768, 12, True)


@pytest.mark.parametrize("n,block,window", [(768, 64, 512), (700, 96, 512), (300, 64, 100), (129, 16, 7)])
def test_dense_tiles_of_a_window_equal_the_tiles_it_touches(n: int, block: int, window: int) -> None:
    touched = 0
    for qb in range(-(-n // block)):
        keys = {j // block for i in range(qb * block, min(n, (qb + 1) * block)) for j in range(max(0, i - window + 1), i + 1)}
        touched += len(keys)
    assert tiles(n, block, True, "dense", 0, window=window) == touched


def test_plan_weights_local_heads_by_their_smaller_dense_cost() -> None:
    r = make_result(num_layers=2, num_heads=2, num_kv_heads=1, seq_len=768)
    rank_and_plan(r, PlanConfig())
    before = r.data["plan_summary"]["planned_flops_saving"]
    for rec in r.heads:
        if rec["layer"] == 0:
            rec["sliding_window"] = 128
    rank_and_plan(r, PlanConfig())
    plan = r.data["plan"]
    summary = r.data["plan_summary"]
    dense = {l: sum(min(i, 128 if l == 0 else 768) for i in range(1, 769)) for l in (0, 1)}
    total = 2 * dense[0] + 2 * dense[1]
    assert summary["dense_attention_flops"] == 4 * r.model["head_dim"] * total
    for p in plan:
        assert p["flops_saving"] == pytest.approx(flops_saving(768, p["k"], True, 128 if p["layer"] == 0 else None))
        assert p["flops_saving_model"] == pytest.approx(p["flops_saving"] * dense[p["layer"]] / total)
    assert summary["planned_flops_saving"] == pytest.approx(sum(p["flops_saving_model"] for p in plan))
    assert summary["planned_flops_saving"] != pytest.approx(before)


def test_probe_records_each_sites_window() -> None:
    """A model whose local layers pass a sliding window (tiny Gemma 3: local, then global) gets
    ``layer_windows`` in its model block; the records of its heads carry it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from attn_audit.capture.loop import probe_sites
    from attn_audit.load import model_info

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gemma3_text", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=256,
                               max_position_embeddings=256, sliding_window=16,
                               layer_types=["sliding_attention", "full_attention"])
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    info = model_info(model, "tiny-gemma3", "test")
    probe_sites(model, info)
    assert info["layer_windows"] == [16, None]
