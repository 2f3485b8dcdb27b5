"""apply_plan / remove_plan: FlexAttention running each planned head's pattern, against the model's
own attention (dense plans) and a masked eager reference keeping the same keys; flex_plan.json
round trip through a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attn_audit
from attn_audit.capture.interface import AttentionCall, allowed_mask, capturing
from attn_audit.errors import ConfigError
from attn_audit.export.flex import shape_hash
from attn_audit.rows.patterns import (
    VS_LAST_Q,
    block_estimate_order,
    rank_of,
    vertical_slash_order,
)
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _plan(model, layers: list[dict], block: int = 16) -> dict:
    cfg = model.config
    return {"format": "attn-audit/flex-plan", "version": 1, "block_size": block,
            "model": {"config_hash": shape_hash(cfg.to_dict()), "num_layers": len(layers),
                      "num_heads": cfg.num_attention_heads},
            "layers": layers}


MIXED = {"0": {"pattern": "streaming", "sink_blocks": 1, "window_blocks": 1},
         "1": {"pattern": "dense"},
         "2": {"pattern": "vertical-slash", "vertical_size": 20, "slash_size": 12},
         "3": {"pattern": "block-topk", "blocks": 2}}


def _reference_keep(call: AttentionCall, heads: dict, block: int) -> torch.Tensor:
    """Dense kept-key mask (B, H, n, n), key by key, from the same selection functions."""
    q, k = call.query, call.key
    B, H, n, _ = q.shape
    allowed = allowed_mask(call).expand(B, H, n, n)
    keep = torch.zeros(B, H, n, n, dtype=torch.bool)
    order = block_estimate_order(q, k, call.scaling, block, call.is_causal)
    last = torch.arange(max(n - VS_LAST_Q, 0), n)
    cols, diags = vertical_slash_order(q, k, call.scaling, allowed_mask(call, last))
    cr, dr = rank_of(cols), rank_of(diags)
    for h in range(H):
        p = heads.get(str(h), {"pattern": "dense"})
        for b in range(B):
            for i in range(n):
                qb = i // block
                for j in range(n):
                    kb = j // block
                    if p["pattern"] == "dense":
                        ok = True
                    elif p["pattern"] == "streaming":
                        ok = (0 <= qb - kb < p["window_blocks"]) or kb < p["sink_blocks"]
                    elif p["pattern"] == "block-topk":
                        ok = kb in order[b, h, qb, : p["blocks"]].tolist()
                    else:
                        ok = bool(cr[b, h, j] < p["vertical_size"]) or (j <= i and bool(dr[b, h, i - j] < p["slash_size"]))
                    keep[b, h, i, j] = ok
    return keep & allowed


def _eager_consumer(heads: dict, block: int):
    def consume(call: AttentionCall) -> torch.Tensor:
        keep = _reference_keep(call, heads, block)
        groups = call.query.shape[1] // call.key.shape[1]
        s = torch.matmul(call.query, call.key.repeat_interleave(groups, 1).transpose(-1, -2)) * call.scaling
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
        return torch.matmul(p, call.value.repeat_interleave(groups, 1)).transpose(1, 2).contiguous()
    return consume


def test_dense_plans_reproduce_logits() -> None:
    """All-dense plan: the model's own kernel; all tiles kept by block-topk: FlexAttention; both to 1e-4."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        dense = _plan(model, [{str(h): {"pattern": "dense"} for h in range(4)}] * 2)
        loaded = attn_audit.apply_plan(model, dense, compile=False)
        assert loaded.heads == {}
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=0)
        attn_audit.remove_plan(model)
        full = _plan(model, [{str(h): {"pattern": "block-topk", "blocks": 5} for h in range(4)}] * 2)
        attn_audit.apply_plan(model, full, compile=False)
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=0)
        attn_audit.remove_plan(model)
        assert model.config._attn_implementation == "sdpa"
        torch.testing.assert_close(model(ids).logits, ref, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_plan_matches_masked_eager_reference(family: str) -> None:
    """Streaming, vertical-slash and block-topk heads beside a dense head (GQA; mistral: sliding
    window 8 and padding) equal eager attention with the same kept keys, to 1e-4; the plan does
    change the output."""
    model = tiny_model(family)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 70, dtype=torch.long)
    if family == "mistral":
        mask[1, 60:] = 0
    layers = [MIXED, {str(h): {"pattern": "block-topk", "blocks": 1} for h in range(4)}]
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        with capturing(model, _eager_consumer({}, 16)):
            own = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(own, dense, atol=1e-4, rtol=0)  # the reference's dense path
        attn_audit.apply_plan(model, _plan(model, layers), compile=False)
        got = model(ids, attention_mask=mask).logits
        attn_audit.remove_plan(model)
        refs = {0: _eager_consumer(MIXED, 16), 1: _eager_consumer(layers[1], 16)}
        with capturing(model, lambda call: refs[call.layer](call)):
            want = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=0)
    assert (got[valid] - dense[valid]).abs().max() > 1e-2


def test_compiled_flex_matches_eager_flex() -> None:
    """torch.compile(flex_attention) builds on this machine's CPU and gives the eager path's output."""
    model = tiny_model("qwen2")
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(2))
    plan = _plan(model, [MIXED, MIXED])
    with torch.no_grad():
        attn_audit.apply_plan(model, plan, compile=False)
        eager = model(ids).logits
        attn_audit.apply_plan(model, plan, compile=True)
        compiled = model(ids).logits
        attn_audit.remove_plan(model)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)


def test_plan_for_another_model_is_refused() -> None:
    model = tiny_model("llama")
    plan = _plan(model, [MIXED, MIXED])
    plan["model"]["config_hash"] = "0" * 16
    with pytest.raises(ConfigError, match="another model shape"):
        attn_audit.apply_plan(model, plan)
    bad = _plan(model, [MIXED, {"0": {"pattern": "row-topk"}}])
    with pytest.raises(ConfigError, match="layer 1 must map"):
        attn_audit.apply_plan(model, bad)


def test_flex_export_round_trips_in_a_fresh_process(tmp_path, minilm) -> None:
    """An audit's --export flex file, applied in a new process, gives the in-process outputs."""
    from attn_audit import AuditConfig, MeasureSpec, audit
    from attn_audit.export import write_exports

    cfg = AuditConfig(seq_lens=(64,), num_sequences=2, reservoir_size=64,
                      measure=MeasureSpec(block_size=16, rows_per_sequence=None))
    result = audit(minilm.model, minilm.tokenizer, ["a few words of text here, " * 40] * 3, cfg, name="mini")
    heads = result.heads[0]["patterns"]["by_pattern"]
    assert set(heads) == {"row-topk", "block-oracle", "block-topk", "streaming"}  # no VS: bidirectional
    assert heads["block-topk"]["estimate_flops"] > 0 and "estimate_flops" not in heads["streaming"]
    assert len(heads["streaming"]["kept_mass"]) == 64 // 16 + 1
    write_exports(result, ["flex"], tmp_path)
    data = json.loads((tmp_path / "flex_plan.json").read_text())
    patterns = {v["pattern"] for layer in data["layers"] for v in layer.values()}
    kp = {(e["layer"], e["head"]): e["pattern"] for e in result.data["plan"]}
    assert all(data["layers"][la][str(h)]["pattern"] == kp.get((la, h), "dense")
               for la in range(len(data["layers"])) for h in range(len(data["layers"][la])))
    assert patterns - {"dense"}, "the plan should run some head sparse"
    tok = minilm.tokenizer("the tests of a plan file, run twice " * 6, return_tensors="pt")
    np.save(tmp_path / "ids.npy", tok.input_ids[:, :64].numpy())
    with torch.no_grad():
        attn_audit.apply_plan(minilm.model, tmp_path / "flex_plan.json", compile=False)
        here = minilm.model(input_ids=tok.input_ids[:, :64]).last_hidden_state.numpy()
        attn_audit.apply_plan(minilm.model, result, compile=False)
        from_result = minilm.model(input_ids=tok.input_ids[:, :64]).last_hidden_state.numpy()
        attn_audit.remove_plan(minilm.model)
        dense = minilm.model(input_ids=tok.input_ids[:, :64]).last_hidden_state.numpy()
    np.testing.assert_array_equal(here, from_result)
    assert np.abs(here - dense).max() > 1e-4
    code = (
        "import sys, numpy as np, torch, attn_audit\n"
        "from attn_audit.load import load_model\n"
        "lm = load_model('all-minilm-l6-v2')\n"
        "attn_audit.apply_plan(lm.model, sys.argv[1], compile=False)\n"
        "ids = torch.from_numpy(np.load(sys.argv[2]))\n"
        "with torch.no_grad():\n"
        "    np.save(sys.argv[3], lm.model(input_ids=ids).last_hidden_state.numpy())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "flex_plan.json"), str(tmp_path / "ids.npy"),
                           str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), here, atol=1e-5, rtol=0)


def _calls(model, ids, mask):
    got = []

    def record(call: AttentionCall):
        got.append(call)

    with torch.no_grad(), capturing(model, record):
        model(ids, attention_mask=mask)
    return got


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_layer_tiles_cover_the_kept_keys(family: str) -> None:
    """The block masks are built from tiles, not an (n, n) grid per head: a tile is computed iff it
    holds a kept key (streaming, block-topk: exactly; vertical-slash: a superset), and full iff
    every key in it is kept (then the mask is not evaluated there)."""
    from attn_audit.apply.flex import layer_mask
    from attn_audit.apply.plan import HeadPattern

    model = tiny_model(family)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 70, dtype=torch.long)
    if family == "mistral":
        mask[1, 60:] = 0
    call = _calls(model, ids, mask)[0]
    heads = {int(h): HeadPattern(p["pattern"], **{k: v for k, v in p.items() if k != "pattern"})
             for h, p in MIXED.items() if p["pattern"] != "dense"}
    lm = layer_mask(call, heads, 16)
    ref = _reference_keep(call, MIXED, 16)  # (B, H, n, n)
    nb = lm.tiles.shape[-1]
    grid = torch.nn.functional.pad(ref, (0, nb * 16 - 70, 0, nb * 16 - 70)).view(2, 4, nb, 16, nb, 16)
    has = grid.any(5).any(3)
    allowed = torch.nn.functional.pad(allowed_mask(call).expand(2, 1, 70, 70)[:, 0], (0, nb * 16 - 70, 0, nb * 16 - 70))
    every = (grid | ~allowed.view(2, 1, nb, 16, nb, 16)).all(5).all(3) & allowed.view(2, 1, nb, 16, nb, 16).all(5).all(3)
    for h in (0, 3):
        assert torch.equal(lm.tiles[:, h], has[:, h])
        assert torch.equal(lm.full[:, h], every[:, h] & has[:, h])
    assert bool((lm.tiles[:, 2] | ~has[:, 2]).all()) and not lm.full[:, 2].any()
    assert not lm.tiles[:, 1].any()  # the dense head runs sdpa
    assert lm.tiles[:, 3].sum() < lm.allowed_tiles.sum()  # block-topk skips tiles


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_eager_query_chunks_give_the_unchunked_output(family: str, monkeypatch) -> None:
    """Eager FlexAttention runs in query chunks of whole blocks to bound memory; one block per chunk
    gives the single-chunk output (padding and a sliding window included)."""
    from attn_audit.apply import flex

    model = tiny_model(family)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 70, dtype=torch.long)
    if family == "mistral":
        mask[1, 60:] = 0
    plan = _plan(model, [MIXED, MIXED])
    with torch.no_grad():
        attn_audit.apply_plan(model, plan, compile=False)
        whole = model(ids, attention_mask=mask).logits
        monkeypatch.setattr(flex, "EAGER_CHUNK_ELEMENTS", 1)
        chunked = model(ids, attention_mask=mask).logits
        attn_audit.remove_plan(model)
    valid = mask.bool()
    torch.testing.assert_close(chunked[valid], whole[valid], atol=1e-5, rtol=0)
