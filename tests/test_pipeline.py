"""End to end on the real bundled models: audit.json figures equal a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attn_audit import AuditConfig, MeasureSpec, audit
from attn_audit.data import DataSpec, build_sequences
from attn_audit.result import AuditResult

pytestmark = pytest.mark.slow


def allowed_keys(seq_len, causal, window=None):
    """Number of keys each query row may attend to, (seq_len,): all, the causal prefix, or the
    last ``window`` keys of it (a sliding-window layer)."""
    n_i = np.arange(1, seq_len + 1) if causal else np.full(seq_len, seq_len)
    return np.minimum(n_i, window) if window else n_i


def brute_force_k(model, sequences, eps_list, min_keys, causal, windows=None):
    """k_eps of every counted row from eager output_attentions, in float64.

    ``windows``: per layer, its sliding window or None; a row's k_eps is capped at the number
    of keys it may attend to.

    Returns (per (layer, head, eps) list of k values, per (layer, head, eps) count of rows whose
    boundary is ambiguous at float32 precision (|cumsum - (1 - eps)| < 1e-6)).
    """
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = getattr(model, "base_model", model)(input_ids=torch.tensor(sequences), output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    ks, ambiguous = {}, {}
    for layer, att in enumerate(out.attentions):
        p = att.double().numpy()  # (b, H, S, S)
        s = p.shape[-1]
        n_i = allowed_keys(s, causal, windows[layer] if windows else None)
        rows = np.arange(s) >= (min_keys - 1 if causal else 0)
        srt = -np.sort(-p, axis=-1)
        cs = np.cumsum(srt, axis=-1)
        for e_idx, eps in enumerate(eps_list):
            k = (cs < 1 - eps).sum(-1) + 1
            k = np.minimum(k, n_i)
            near = np.abs(cs - (1 - eps)).min(-1) < 1e-6
            for h in range(p.shape[1]):
                ks[(layer, h, e_idx)] = k[:, h, rows].ravel()
                ambiguous[(layer, h, e_idx)] = int(near[:, h, rows].sum())
    return ks, ambiguous


def check_against_brute_force(loaded, seq_len, n_seq, causal, windows=None):
    cfg = AuditConfig(seq_lens=(seq_len,), num_sequences=n_seq, batch_size=n_seq, measure=MeasureSpec(rows_per_sequence=None),
                      reservoir_size=64)
    spec = cfg.measure
    result = audit(loaded.model, loaded.tokenizer, DataSpec(), cfg, info=loaded.info)
    result = AuditResult.from_dict(result.to_dict())  # what audit.json holds
    (td,) = build_sequences(DataSpec(), loaded.tokenizer, [seq_len], n_seq, 0, encoder=not causal)
    ks, amb = brute_force_k(loaded.model, td.sequences, spec.eps, spec.min_keys, causal, windows)
    assert result.run["rows"] == "all"
    total_amb = 0
    for rec in result.heads:
        for e_idx, key in enumerate(spec.eps_keys):
            ref = ks[(rec["layer"], rec["head"], e_idx)]
            got = rec["sparsity"][key]
            a = amb[(rec["layer"], rec["head"], e_idx)]
            total_amb += a
            assert got["rows"] == len(ref)
            assert abs(got["k_mean"] * got["rows"] - ref.sum()) <= a + 1e-6, (rec["layer"], rec["head"], key, got["k_mean"] * got["rows"], ref.sum(), got["rows"])
            if a == 0:
                assert got["k_median"] == int(np.quantile(ref, 0.5, method="inverted_cdf"))
                assert got["k_p90"] == int(np.quantile(ref, 0.9, method="inverted_cdf"))
                n_i = allowed_keys(seq_len, causal, windows[rec["layer"]] if windows else None)[
                    np.arange(seq_len) >= (spec.min_keys - 1 if causal else 0)]
                kfrac = (ref.reshape(n_seq, -1) / n_i).mean()
                assert got["kfrac_mean"] == pytest.approx(kfrac, rel=1e-9)
    # rows ambiguous at float32 precision are rare (under 1%); every other head matched exactly
    assert total_amb <= 0.01 * sum(len(v) for v in ks.values())
    return result


def test_smollm2_exact_k_eps_equals_brute_force(smollm2):
    result = check_against_brute_force(smollm2, seq_len=96, n_seq=2, causal=True)
    assert result.model["num_heads"] == 9 and result.model["num_kv_heads"] == 3
    assert {h["kv_head"] for h in result.heads if h["layer"] == 0} == {0, 1, 2}
    assert len(result.ranking) == 30 * 9


def test_minilm_exact_k_eps_equals_brute_force(minilm):
    result = check_against_brute_force(minilm, seq_len=64, n_seq=3, causal=False)
    assert result.model["causal"] is False


def test_gemma3_exact_k_eps_equals_brute_force(gemma3):
    """Gemma 3: QK-norm, 4 query heads on 1 KV head, head_dim 256, and 640 tokens, so the
    sliding-window layers (512 keys) and the global layers see different key sets."""
    cfg = gemma3.model.config
    windows = [cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types]
    assert windows.count(512) == 15 and windows.count(None) == 3
    result = check_against_brute_force(gemma3, seq_len=640, n_seq=2, causal=True, windows=windows)
    assert result.model["family"] == "gemma3_text" and result.model["head_dim"] == 256
    assert result.model["num_heads"] == 4 and result.model["num_kv_heads"] == 1
    assert len(result.ranking) == 18 * 4
    # (check_against_brute_force compares kfrac_mean = mean k_eps / n_i with n_i capped at 512 on
    # the local layers: counting their rows against all i + 1 earlier keys would fail it)
