"""verify.speed: per-layer timing of a pluggable plan attention against the dense kernel (layers
measured slower stay dense), and the FlexAttention stand-in against a masked reference."""

from __future__ import annotations

import time

import pytest
import torch

from attn_audit.predeploy.speed import (
    attention_speed,
    dense_attention,
    flex_window_attention,
)


def test_speed_sums_layers_and_keeps_slower_layers_dense():
    info = {"num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16}
    plan = [{"layer": 0, "head": 0, "k": 8}, {"layer": 2, "head": 1, "k": 8}, {"layer": 2, "head": 3, "k": 99}]
    seen = {}

    def factory(layer, budgets):
        seen[layer] = dict(budgets)
        if layer == 0:
            return lambda q, k, v: q  # far faster than attention
        return lambda q, k, v: (time.sleep(0.25), q)[1]  # far slower

    sp = attention_speed(info, plan, 64, factory, label="test", planned_flops_saving=0.5, reps=3)
    assert seen == {0: {0: 8}, 2: {1: 8, 3: 64}}  # budgets capped at n
    assert [x["layer"] for x in sp["layers"]] == [0, 2] and sp["layers_kept_dense"] == [2]
    l0, dense = sp["layers"][0], sp["dense_ms_per_layer"]
    assert not l0["kept_dense"] and l0["plan_ms"] < dense < sp["layers"][1]["plan_ms"]
    assert sp["attention_speedup"] == pytest.approx(4 * dense / (3 * dense + l0["plan_ms"]))
    assert sp["predicted_flops_speedup"] == pytest.approx(2.0)


@pytest.mark.slow
def test_flex_window_attention_equals_masked_sdpa():
    """The compiled FlexAttention stand-in keeps exactly sinks + a window of k - sinks keys on the
    planned heads (GQA without repeating K/V) and causal attention elsewhere."""
    n, heads, kv, d, sinks = 128, 4, 2, 16, 2
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, generator=g) for h in (heads, kv, kv))
    fn = flex_window_attention(n, heads, sinks, block=32)(0, {1: 10, 2: 40})
    i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    masks = []
    for h in range(heads):
        window = {1: 8, 2: 38}.get(h, n + 1)
        masks.append((j <= i) & ((j < sinks) | (i - j < window)))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=torch.stack(masks)[None])
    assert torch.allclose(fn(q, k, v), ref, atol=1e-5)
    assert torch.allclose(dense_attention(q, k, v)[:, 0], ref[:, 0], atol=1e-5)


def test_cli_refuses_measure_speed_without_verify_and_a_missing_config_before_loading(tmp_path, capsys):
    from attn_audit.cli import main

    assert main(["smollm2-135m-instruct", "--measure-speed", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("attn-audit: error: --measure-speed times the verified plan; "
                                               "add --verify")
    assert main(["smollm2-135m-instruct", "--check-config", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"attn-audit: error: --check-config {tmp_path / 'nope.json'}: no such file"
    assert main(["--load", str(tmp_path / "audit.json"), "--check-config", "x.json"]) == 2
    assert "cannot be combined with --load" in capsys.readouterr().err
