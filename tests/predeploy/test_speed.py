"""verify.speed: the applied kernel plan timed per layer and per head inside the model (heads
measured slower than dense stay dense, then layers whose mask building + kernel stay slower);
no timing assertions: a scripted clock drives the decisions, a real run checks the structure."""

from __future__ import annotations

import pytest
import torch

from attn_audit.export.flex import shape_hash
from attn_audit.predeploy import speed
from attn_audit.predeploy.speed import plan_speed
from tests.conftest import tiny_model

MIXED = {"0": {"pattern": "streaming", "sink_blocks": 1, "window_blocks": 1},
         "1": {"pattern": "dense"},
         "2": {"pattern": "vertical-slash", "vertical_size": 20, "slash_size": 12},
         "3": {"pattern": "block-topk", "blocks": 2}}


def _plan(model, layers, block=16, saving=0.5):
    cfg = model.config
    return {"format": "attn-audit/flex-plan", "version": 1, "block_size": block, "kernel_flops_saving": saving,
            "model": {"config_hash": shape_hash(cfg.to_dict()), "num_layers": len(layers),
                      "num_heads": cfg.num_attention_heads},
            "layers": layers}


def test_slower_heads_stay_dense_then_slower_layers(monkeypatch):
    """Per layer the clock is read in order: dense layer, one dense head, each planned head (sorted),
    mask building, the layer's kernel. Layer 0: head 2 slower than a dense head -> kept dense, the
    layer (mask + kernel) beats dense. Layer 1: every head fast, but mask + kernel lose -> layer dense."""
    script = iter([
        100.0, 10.0, 5.0, 50.0, 5.0, 20.0, 40.0,  # layer 0: heads 0, 2, 3; mask 20 + kernel 40 < 100
        100.0, 10.0, 1.0, 1.0, 1.0, 60.0, 60.0,  # layer 1: mask 60 + kernel 60 > 100
    ])
    calls = []

    def fake_time(fn, warmup, reps, sync):
        fn()  # the real call runs (shapes, masks and compilation are exercised)
        calls.append(fn)
        return next(script) / 1e3

    monkeypatch.setattr(speed, "_time", fake_time)
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    sp = plan_speed(model, _plan(model, [MIXED, MIXED]), ids, label="t", oracle_flops_saving=0.75)
    assert len(calls) == 14
    l0, l1 = sp["layers"]
    assert [h["head"] for h in l0["heads"]] == [0, 2, 3]
    assert [h["kept_dense"] for h in l0["heads"]] == [False, True, False]
    assert l0["heads_sparse"] == 2 and not l0["kept_dense"]
    assert l0["plan_ms"] == pytest.approx(60.0) and l0["speedup"] == pytest.approx(100 / 60)
    assert l1["heads_sparse"] == 3 and l1["kept_dense"] and l1["speedup"] == pytest.approx(1.0)
    assert sp["heads_kept_dense"] == [{"layer": 0, "head": 2, "pattern": "vertical-slash", "head_ms": 50.0,
                                       "dense_head_ms": 10.0}]
    assert sp["layers_kept_dense"] == [1]
    assert sp["attention_speedup"] == pytest.approx(200 / 160)
    assert sp["predicted_flops_speedup"] == pytest.approx(2.0) and sp["oracle_flops_speedup"] == pytest.approx(4.0)
    # block-topk keeps 2 key blocks of 16 per query block: fewer tiles than causal at 64 tokens
    heads = {h["head"]: h for h in l0["heads"]}
    assert heads[3]["tiles"] == 1 + 2 + 2 + 2 < 10
    assert l0["predicted_tile_speedup"] > 1.0


def test_real_timing_structure():
    """Unscripted: the compiled kernel runs, every planned layer is timed, the totals add up."""
    model = tiny_model("qwen2")
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(1))
    dense_layer = {str(h): {"pattern": "dense"} for h in range(4)}
    sp = plan_speed(model, _plan(model, [MIXED, dense_layer]), ids, label="t", reps=1)
    assert [x["layer"] for x in sp["layers"]] == [0]  # layer 1 has no planned heads
    x = sp["layers"][0]
    assert x["dense_ms"] > 0 and all(h["head_ms"] > 0 for h in x["heads"]) and sp["compile_s"] > 0
    kept = [h["head"] for h in x["heads"] if h["kept_dense"]]
    assert x["heads_sparse"] == 3 - len(kept)
    assert sp["dense_ms"] == pytest.approx(x["dense_ms"] + sp["dense_ms_per_layer"])
    assert sp["attention_speedup"] == pytest.approx(sp["dense_ms"] / sp["plan_ms"])
    assert sp["plan_ms"] <= sp["dense_ms"] + 1e-9  # a layer never counts slower than dense


def test_cli_refuses_measure_speed_without_verify_and_a_missing_config_before_loading(tmp_path, capsys):
    from attn_audit.cli import main

    assert main(["smollm2-135m-instruct", "--measure-speed", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("attn-audit: error: --measure-speed times the verified plan; "
                                               "add --verify")
    assert main(["smollm2-135m-instruct", "--check-config", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"attn-audit: error: --check-config {tmp_path / 'nope.json'}: no such file"
    assert main(["--load", str(tmp_path / "audit.json"), "--check-config", "x.json"]) == 2
    assert "cannot be combined with --load" in capsys.readouterr().err


@pytest.mark.slow
def test_audit_measures_the_kernel_plan_and_the_gate_reads_it(minilm):
    """--verify --measure-speed on a real encoder: verify.speed times the audit's kernel plan per
    planned layer and head, and the gate's measured_attention_speedup reads it."""
    from attn_audit import AuditConfig, MeasureSpec, audit
    from attn_audit.apply import load_plan
    from attn_audit.gate import decide, parse
    from attn_audit.report.predeploy import speed_lines

    cfg = AuditConfig(seq_lens=(64,), num_sequences=2, reservoir_size=64, verify=True, verify_sequences=1,
                      measure_speed=True, measure=MeasureSpec(block_size=16, rows_per_sequence=None))
    result = audit(minilm.model, minilm.tokenizer, ["a few words of text here, " * 40] * 4, cfg, name="mini")
    sp = result.data["verify"]["speed"]
    planned = load_plan(result)
    assert sp["seq_len"] == 64 and sp["block_size"] == planned.block_size == 16
    assert {x["layer"] for x in sp["layers"]} == {la for la, _ in planned.heads}
    assert sum(x["heads_planned"] for x in sp["layers"]) == len(planned.heads)
    assert sp["predicted_flops_speedup"] == pytest.approx(1 / (1 - planned.source["kernel_flops_saving"]))
    value = sp["attention_speedup"]
    outcome = decide(result, [parse(f"measured_attention_speedup < {value + 1}")])  # a fail-if condition
    gate = outcome.to_dict()
    assert gate["metrics"]["measured_attention_speedup"] == value and gate["passed"] is False
    assert speed_lines(result)[0].startswith("Measured attention speedup at 64 tokens on cpu")


def test_speed_lines_name_the_heads_and_layers_kept_dense():
    from types import SimpleNamespace

    from attn_audit.report.predeploy import speed_lines

    sp = {"seq_len": 4096, "device": "cpu", "attention_speedup": 1.0, "predicted_flops_speedup": 1.63,
          "oracle_flops_speedup": 4.19, "plan_attention": "kernel plan", "compile_s": 260.0,
          "heads_kept_dense": [{"layer": 0, "head": h} for h in range(14)], "layers_kept_dense": [0, 3]}
    lines = speed_lines(SimpleNamespace(data={"verify": {"speed": sp}}))
    assert lines[0] == ("Measured attention speedup at 4096 tokens on cpu: 1.00x (kernel FLOPs predict 1.63x, "
                        "oracle top-k bound 4.19x); plan attention: kernel plan; compilation 260.0 s apart.")
    assert lines[1].startswith("Heads measured slower than dense and kept dense (14): L0.H0, L0.H1")
    assert lines[1].endswith("L0.H11 and 2 more.") and lines[2].endswith(": 0, 3.")
    skipped = speed_lines(SimpleNamespace(data={"verify": {"speed": {"skipped_reason": "no kernel plan"}}}))
    assert skipped == ["Attention speed not measured: no kernel plan."]


def test_measured_plan_sets_slow_heads_and_layers_dense():
    from attn_audit.apply import load_plan
    from attn_audit.predeploy import measured_plan

    model = tiny_model("llama")
    plan = _plan(model, [MIXED, MIXED])
    sp = {"heads_kept_dense": [{"layer": 0, "head": 2}], "layers_kept_dense": [1], "rule": "r"}
    out = measured_plan(plan, sp)
    loaded = load_plan(out, model.config.to_dict())
    assert set(loaded.heads) == {(0, 0), (0, 3)}
    assert plan["layers"][1]["0"]["pattern"] == "streaming"  # the input is not changed
    assert out["speed_fallback"] == {"heads_kept_dense": 1, "layers_kept_dense": [1], "rule": "r"}
