"""--check-config: third-party configs validated against the model (one-line errors naming the
entry), their kernel patterns' keep-masks against brute force, the kept mass on a real forward,
and a valid config verified end to end."""

from __future__ import annotations

import json

import pytest
import torch

from attn_audit.export import ExportError
from attn_audit.predeploy import Pattern, keep_mask, kept_mass, read_config
from tests.conftest import tiny_model
from tests.helpers import assert_one_line_error, run_cli

SMOL = {"num_layers": 30, "num_heads": 9, "num_kv_heads": 3}


def _minference(layers: int, heads: int) -> list[dict]:
    return [{str(h): ["vertical_and_slash", 100, 200, 0.9] for h in range(heads)} for _ in range(layers)]


def test_minference_score_out_of_range_is_refused_naming_the_entry(tmp_path):
    data = _minference(30, 9)
    data[7]["4"] = ["vertical_and_slash", 1000, 6096, 20481024]  # a raw count where a recall belongs
    path = tmp_path / "Llama_best_pattern.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ExportError) as err:
        read_config(path, SMOL)
    msg = str(err.value)
    assert "\n" not in msg and "layer 7, head 4" in msg and "score 20481024 is outside [0, 1]" in msg


def test_minference_with_another_models_layers_is_refused(tmp_path):
    path = tmp_path / "pattern.json"
    path.write_text(json.dumps(_minference(32, 32)))
    with pytest.raises(ExportError, match="expected a list of 30 layers, got 32"):
        read_config(path, SMOL)


@pytest.mark.parametrize("rows, cols, message", [
    (30, 4, "row 0 has 4 columns, the model has 3 KV heads"),
    (32, 3, "32 rows, but the model has 30 layers"),
])
def test_duo_tsv_with_the_wrong_shape_is_refused(tmp_path, rows, cols, message):
    tsv = tmp_path / "full_attention_heads.tsv"
    tsv.write_text("\n".join("\t".join(["1.0"] * cols) for _ in range(rows)) + "\n")
    with pytest.raises(ExportError) as err:
        read_config(tsv, SMOL)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_duo_value_out_of_range_names_layer_and_kv_head(tmp_path):
    lines = ["1.0\t0.2\t0.7"] * 30
    lines[12] = "1.0\t0.2\t3.5"
    (tmp_path / "full_attention_heads.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ExportError, match="layer 12, KV head 2: value 3.5 is outside"):
        read_config(tmp_path / "full_attention_heads.tsv", SMOL)


def test_valid_configs_become_patterns(tmp_path):
    (tmp_path / "full_attention_heads.tsv").write_text("\n".join(["1.0\t0.2\t0.7"] * 30) + "\n")
    fmt, patterns, settings = read_config(tmp_path / "full_attention_heads.tsv", SMOL)
    assert fmt == "duo" and settings["assumed"] == ["recent_size", "sink_size"]
    assert [patterns[(0, h)].kind for h in range(9)] == ["dense"] * 3 + ["streaming"] * 3 + ["dense"] * 3
    (tmp_path / "config.json").write_text(json.dumps({"sink_size": 16, "recent_size": 128}))
    _, patterns, settings = read_config(tmp_path, SMOL)
    assert patterns[(5, 4)] == Pattern("streaming", sinks=16, window=128) and not settings["assumed"]
    data = _minference(30, 9)
    data[0]["0"] = ["stream_llm", 4, 256, 0.97]
    data[0]["1"] = ["vertical_and_slash", 10, 10, 1]  # sizes below the runtime minimums are clamped
    (tmp_path / "m.json").write_text(json.dumps(data))
    fmt, patterns, _ = read_config(tmp_path / "m.json", SMOL)
    assert fmt == "minference" and patterns[(0, 0)] == Pattern("streaming", sinks=4, window=256)
    assert (patterns[(0, 1)].vertical, patterns[(0, 1)].slash) == (30, 50)
    flex = {"format": "attn-audit/flex-plan", "version": 1, "block_size": 64,
            "layers": [{str(h): {"pattern": "dense"} for h in range(9)} for _ in range(30)]}
    flex["layers"][3]["2"] = {"pattern": "block-topk", "blocks": -1}
    (tmp_path / "flex_plan.json").write_text(json.dumps(flex))
    with pytest.raises(ExportError, match="layer 3, head 2: blocks must be an integer >= 0"):
        read_config(tmp_path / "flex_plan.json", SMOL)


def _brute(p: Pattern, q: torch.Tensor, k: torch.Tensor, scale: float, allowed: torch.Tensor) -> torch.Tensor:
    """The kept keys by explicit loops over rows, columns and diagonals."""
    n = q.shape[0]
    keep = torch.zeros(n, n, dtype=torch.bool)
    if p.kind == "streaming":
        for i in range(n):
            for j in range(n):
                keep[i, j] = bool(allowed[i, j]) and (j < p.sinks or abs(i - j) < p.window)
        return keep
    if p.kind == "vertical-slash":
        last = min(64, n)
        a = torch.softmax(((q[-last:] @ k.T) * scale).masked_fill(~allowed[-last:], float("-inf")), -1)
        col = {j: float(a[:, j].sum()) for j in range(n)}
        diag: dict[int, float] = {}  # signed diagonal i - j -> attention of the last queries on it
        for r in range(last):
            for j in range(n):
                if allowed[n - last + r, j]:
                    diag[n - last + r - j] = diag.get(n - last + r - j, 0.0) + float(a[r, j])
        for j in range(p.forced_vertical):
            col[j] = 1e6 + p.forced_vertical - j
        for o in range(min(p.forced_slash, n)):
            diag[o] = 1e6 + p.forced_slash - o
        cols = set(sorted(col, key=lambda j: -col[j])[: p.vertical])
        diags = set(sorted(diag, key=lambda o: -diag[o])[: p.slash])
        for i in range(n):
            for j in range(n):
                keep[i, j] = bool(allowed[i, j]) and (j in cols or (i - j) in diags)
        return keep
    b = p.block_size
    nb = (n + b - 1) // b
    pool = lambda x, r: x[r * b:(r + 1) * b].mean(0)  # noqa: E731
    for qb in range(nb):
        ok = [kb for kb in range(nb) if bool(allowed[qb * b:(qb + 1) * b, kb * b:(kb + 1) * b].any())]
        ranked = sorted(ok, key=lambda kb: (kb != qb, -float(pool(q, qb) @ pool(k, kb))))
        for kb in ranked[: p.blocks]:
            keep[qb * b:(qb + 1) * b, kb * b:(kb + 1) * b] = allowed[qb * b:(qb + 1) * b, kb * b:(kb + 1) * b]
    return keep


@pytest.mark.parametrize("pattern", [
    Pattern("streaming", sinks=3, window=20),
    Pattern("vertical-slash", vertical=12, slash=9),
    Pattern("vertical-slash", vertical=40, slash=10, forced_vertical=30, forced_slash=20),
    Pattern("block-topk", blocks=2, block_size=16),
])
@pytest.mark.parametrize("causal", [True, False])
def test_keep_mask_equals_brute_force(pattern, causal):
    g = torch.Generator().manual_seed(1)
    n = 90  # the last block is partial
    q, k = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g) * 2
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        allowed = torch.tril(allowed)
    got = keep_mask(pattern, q, k, 8 ** -0.5, allowed)
    assert torch.equal(got, _brute(pattern, q, k, 8 ** -0.5, allowed))
    if pattern.kind != "vertical-slash" or pattern.forced_slash:  # a diagonal budget may skip early rows
        assert bool(got.any(-1).all())  # every row keeps a key


def test_kept_mass_equals_the_eager_attention_of_each_head_with_padding():
    """Kept mass from the capture equals the pattern mask summed over the model's own eager
    attention probabilities, per head (GQA: query head h reads KV head h // 2) and padded sequence."""
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    seqs = [[5 + (7 * i) % 200 for i in range(70)], [9 + (3 * i) % 200 for i in range(50)]]
    patterns = {(0, 1): Pattern("streaming", sinks=2, window=8), (1, 3): Pattern("block-topk", blocks=1, block_size=16),
                (1, 0): Pattern("vertical-slash", vertical=5, slash=4)}
    lost = kept_mass(model, seqs, patterns, batch_size=2, pad_id=0)
    qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    from attn_audit.capture.interface import capturing

    def grab(call):
        qk[call.layer] = (call.query.detach().clone(), call.key.detach().clone())
        return None

    ids = torch.zeros(2, 70, dtype=torch.long)
    mask = torch.zeros(2, 70, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    with torch.inference_mode():
        with capturing(model, grab):
            model(input_ids=ids, attention_mask=mask)
        probs = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    for (layer, head), p in patterns.items():
        want = []
        for b, s in enumerate(seqs):
            n = len(s)
            q, k = qk[layer]
            keep = _brute(p, q[b, head, :n].float(), k[b, head // 2, :n].float(), q.shape[-1] ** -0.5,
                          torch.tril(torch.ones(n, n, dtype=torch.bool)))
            want.append(1 - (probs[layer][b, head, :n, :n] * keep).sum(-1))
        assert torch.allclose(torch.from_numpy(lost[(layer, head)]).float(), torch.cat(want), atol=1e-5)
    assert max(float(v.max()) for v in lost.values()) > 0.01  # the patterns do drop mass here


@pytest.mark.slow
def test_cli_refuses_out_of_range_minference_with_exit_2(tmp_path):
    data = _minference(30, 9)
    data[2]["8"] = ["vertical_and_slash", 30, 800, 1.5e7]
    path = tmp_path / "pattern.json"
    path.write_text(json.dumps(data))
    res = run_cli("smollm2-135m-instruct", "--check-config", str(path), "--seq-len", "64", "--num-sequences", "1",
                  "--out", str(tmp_path / "out"), "--quiet")
    assert_one_line_error(res, 2, f"{path}: layer 2, head 8: score 15000000.0 is outside [0, 1]")
    assert not (tmp_path / "out" / "audit.json").exists()


@pytest.mark.slow
def test_smollm2_valid_duo_config_verified_end_to_end(smollm2, tmp_path):
    """A valid DuoAttention config (KV head 1 of every layer streaming, sinks 4 + window 32) is
    measured on held-out fortunes and verified: kept mass per head, quality, retrieval, gate, reports."""
    from attn_audit import AuditConfig, MeasureSpec, audit
    from attn_audit.gate import decide, parse
    from attn_audit.predeploy import pattern_installer
    from attn_audit.report import get_renderer
    from attn_audit.verify import quality_under

    (tmp_path / "full_attention_heads.tsv").write_text("\n".join(["1.0\t0.1\t0.9"] * 30) + "\n")
    (tmp_path / "config.json").write_text(json.dumps({"sink_size": 4, "recent_size": 32}))
    cfg = AuditConfig(seq_lens=(128,), num_sequences=1, measure=MeasureSpec(rows_per_sequence=16), reservoir_size=64,
                      verify_sequences=1, check_config=str(tmp_path), retrieval_samples=1, retrieval_lens=(480,))
    result = audit(smollm2.model, smollm2.tokenizer, None, cfg, info=smollm2.info)
    c = result.data["check_config"]
    assert c["format"] == "duo" and c["heads_sparse"] == 90 and c["heads_total"] == 270
    assert {(h["layer"], h["head"]) for h in c["heads"]} == {(layer, h) for layer in range(30) for h in (3, 4, 5)}
    assert all(h["rows"] == 128 and 0.0 <= h["lost_mass_mean"] <= h["kept_mass_mean"] + 1 for h in c["heads"])
    losing = [(h["layer"], h["head"]) for h in c["heads"] if h["lost_mass_p90"] > c["eps"]]
    assert [(h["layer"], h["head"]) for h in c["heads_losing"]] == losing and losing  # 32 keys lose mass at 128
    assert c["quality"]["ppl_ratio"] > 0 and 0 <= c["quality"]["top1_agreement"] <= 1
    r = c["retrieval"]
    assert r["lengths"] == [480] and len(r["cells"]) == 5 and r["dense_accuracy"] is not None
    gate = decide(result, [parse("config_heads_losing > 0"), parse("config_ppl_increase > 100")]).to_dict()
    assert [x["status"] for x in gate["checks"]] == ["failed", "passed"]
    for fmt in ("md", "terminal", "html"):
        assert "Third-party config check" in get_renderer(fmt).render(result)

    # a window covering every key keeps all mass: no loss, and the model's own outputs
    from attn_audit.predeploy import Pattern, kept_mass

    wide = {(layer, h): Pattern("streaming", sinks=0, window=128) for layer in range(30) for h in (3, 4, 5)}
    held = [[int(t) for t in range(1000, 1128)]]
    assert max(float(v.max()) for v in kept_mass(smollm2.model, held, wide, 1, 0).values()) < 1e-5
    q = quality_under(pattern_installer(wide), smollm2.model, held, 1, 0, True)
    assert q["ppl_ratio"] == pytest.approx(1.0, abs=1e-3) and q["top1_agreement"] > 0.99


def test_encoder_patterns_with_padding_keep_all_mass_when_the_window_covers_everything():
    """Bidirectional BERT with right padding: a window wider than the sequence keeps every key (no
    loss, the model's own hidden states); a narrow one loses mass and moves them."""
    from attn_audit.predeploy import pattern_installer
    from attn_audit.verify import quality_under

    model = tiny_model("bert")
    seqs = [[5 + (7 * i) % 200 for i in range(40)], [9 + (3 * i) % 200 for i in range(25)]]
    wide = {(layer, h): Pattern("streaming", sinks=0, window=64) for layer in range(2) for h in range(4)}
    narrow = {hk: Pattern("streaming", sinks=1, window=3) for hk in wide}
    lost = kept_mass(model, seqs, wide, batch_size=2, pad_id=0)
    assert all(v.shape == (65,) and float(v.max()) < 1e-5 for v in lost.values())  # 40 + 25 valid rows
    cosine = quality_under(pattern_installer(wide), model, seqs, 2, 0, False)["hidden_cosine"]
    assert cosine == pytest.approx(1.0, abs=1e-5)
    assert float(kept_mass(model, seqs, narrow, 2, 0)[(0, 2)].mean()) > 0.1
    # (a random tiny BERT's residual stream dominates its hidden states: the change is small but real)
    assert quality_under(pattern_installer(narrow), model, seqs, 2, 0, False)["hidden_cosine"] < 1 - 2e-5
