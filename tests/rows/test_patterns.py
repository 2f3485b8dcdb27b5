"""Kernel-pattern coverage (heads[].patterns): the accumulator's totals against a brute force over
the full probability matrices, key by key, on synthetic calls (GQA, sliding window, padding,
bidirectional, partial last block) and on real SmolLM2 layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attn_audit.capture.accumulate import AccumulateConfig, Accumulator
from attn_audit.capture.interface import AttentionCall, allowed_mask, capturing, scores
from attn_audit.config import MeasureSpec
from attn_audit.rows.patterns import VS_FORCED_COLUMNS, VS_FORCED_DIAGONALS, VS_LAST_Q


def _ranked(score: np.ndarray, forced: int) -> list[int]:
    """Indices: the first ``forced`` in order, then by descending score (ties: lower index)."""
    rest = sorted(range(forced, len(score)), key=lambda j: (-score[j], j))
    return list(range(min(forced, len(score)))) + rest


def brute_force(call: AttentionCall, pad: torch.Tensor, spec: MeasureSpec) -> dict:
    """Per-pattern need histograms (H, E, nb + 2) and kept-mass sums (H, nb + 1) over all valid
    rows, from explicit key sets on the full float64 probability matrices."""
    q, k = call.query, call.key
    B, H, n, _ = q.shape
    groups = H // k.shape[1]
    bs, sinks = spec.block_size, spec.sinks
    nb = -(-n // bs)
    allowed = (allowed_mask(call) & pad[:, None, None, :]).expand(B, H, n, n)
    s = scores(call).double().masked_fill(~allowed, float("-inf"))
    P = torch.softmax(s, -1).nan_to_num(0.0).numpy()
    allowed = allowed.numpy()
    thr = [1 - e for e in spec.eps]
    names = spec.patterns
    hist = {p: np.zeros((H, len(thr), nb + 2), dtype=np.int64) for p in names}
    kept = {p: np.zeros((H, nb + 1)) for p in names}
    qf, kf = q.float(), k.float()
    for b in range(B):
        for h in range(H):
            g = h // groups
            # block-topk order per query block: pooled float32 scores, diagonal first
            qp = [qf[b, h, i * bs:(i + 1) * bs].mean(0) for i in range(nb)]
            kp = [kf[b, g, j * bs:(j + 1) * bs].mean(0) for j in range(nb)]
            est = np.array([[float(qp[i] @ kp[j]) * call.scaling for j in range(nb)] for i in range(nb)])
            # vertical-slash ranks from the last queries' attention (the model's own mask)
            last = list(range(max(n - VS_LAST_Q, 0), n))
            s_last = qf[b, h, last] @ kf[b, g].T * call.scaling
            ok = torch.from_numpy(allowed[b, h, last])
            p_last = torch.softmax(s_last.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0).double()
            vert = p_last.sum(0).numpy()
            slash = np.zeros(n)
            for a, i in enumerate(last):
                for j in range(i + 1):
                    slash[i - j] += float(p_last[a, j])
            col_rank = {j: r for r, j in enumerate(_ranked(vert, VS_FORCED_COLUMNS))}
            diag_rank = {o: r for r, o in enumerate(_ranked(slash, VS_FORCED_DIAGONALS))}
            for i in range(n):
                row = P[b, h, i]
                n_keys = int(allowed[b, h, i].sum())
                if not pad[b, i] or n_keys < spec.min_keys:
                    continue
                qb = i // bs
                bm = np.array([row[j * bs:(j + 1) * bs].sum() for j in range(nb)])
                curves = {}
                srt = np.sort(np.concatenate([row, np.zeros(nb * bs - n)]))[::-1]
                curves["row-topk"] = [sum(srt[: lv * bs]) for lv in range(nb + 1)]
                curves["block-oracle"] = [sum(sorted(bm)[::-1][:lv]) for lv in range(nb + 1)]
                causal = call.is_causal
                order = sorted(range(nb), key=lambda j: (j != qb, causal and j > qb, -est[qb, j], j))
                curves["block-topk"] = [sum(bm[order[:lv]]) for lv in range(nb + 1)]
                stream = []
                for lv in range(nb + 1):
                    keep = {j for j in range(nb) if (0 <= qb - j < lv if causal else abs(qb - j) < lv)}
                    if sinks > 0:
                        keep.add(0)
                    stream.append(sum(bm[j] for j in keep))
                curves["streaming"] = stream
                if causal:
                    curves["vertical-slash"] = [
                        sum(row[j] for j in range(i + 1) if col_rank[j] < lv * bs or diag_rank[i - j] < lv * bs)
                        for lv in range(nb + 1)]
                for name in names:
                    if name not in curves:
                        continue
                    c = np.array(curves[name])
                    kept[name][h] += c
                    for e, t in enumerate(thr):
                        hist[name][h, e, int((c < t).sum())] += 1
    return {"need_hist": hist, "kept_sum": kept}


def _accumulate(call: AttentionCall, pad: torch.Tensor, spec: MeasureSpec, causal: bool) -> dict:
    B, H, n, d = call.query.shape
    info = dict(num_layers=call.layer + 1, num_heads=H, num_kv_heads=call.key.shape[1], causal=causal, head_dim=d)
    acc = Accumulator(info, n, B, AccumulateConfig(measure=spec))
    acc.begin_batch(0, pad)
    acc(call)
    return acc.summary()["patterns"]


def _compare(got: dict, want: dict, layer: int = 0) -> None:
    for name, hist in want["need_hist"].items():
        if hist.sum() == 0:
            continue
        np.testing.assert_array_equal(got["need_hist"][name][layer], hist, err_msg=name)
        np.testing.assert_allclose(got["kept_sum"][name][layer], want["kept_sum"][name], rtol=1e-9,
                                   atol=1e-9, err_msg=name)


def _call(seed: int, B: int, H: int, Hkv: int, n: int, d: int, causal: bool = True, window: int | None = None,
          pad: torch.Tensor | None = None) -> AttentionCall:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n, d, generator=gen) * 1.5
    k = torch.randn(B, Hkv, n, d, generator=gen) * 1.5
    v = torch.randn(B, Hkv, n, d, generator=gen)
    mask = None
    if window is not None or pad is not None or not causal:
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        m = (j <= i) if causal else torch.ones(n, n, dtype=torch.bool)
        if window is not None:
            m = m & (j > i - window)
        m = m[None, None].expand(B, 1, n, n)
        if pad is not None:
            m = m & pad[:, None, None, :]
        mask = m.contiguous()
    return AttentionCall(0, q, k, v, mask, d ** -0.5, None, window, causal)


@pytest.mark.parametrize("case", ["gqa", "window-pad", "bidirectional", "no-sinks"])
def test_patterns_match_brute_force(case: str, monkeypatch) -> None:
    """Every pattern's need histogram equals the brute force's exactly, kept mass to 1e-9."""
    B, H, Hkv, n, d = 2, 4, 2, 90, 8
    pad = torch.ones(B, n, dtype=torch.bool)
    sinks = 1
    if case == "window-pad":
        pad[1, 70:] = False  # right padding in the second sequence
        call = _call(1, B, H, Hkv, n, d, window=24, pad=pad)
    elif case == "bidirectional":
        call = _call(2, B, H, H, n, d, causal=False)
    else:
        call = _call(3, B, H, Hkv, n, d)
        sinks = 0 if case == "no-sinks" else 1
    spec = MeasureSpec(rows_per_sequence=None, block_size=16, min_keys=4, sinks=sinks, eps=(0.02, 0.1))
    if case == "gqa":  # several row chunks per block of rows (the float64 work is cut in pieces)
        monkeypatch.setattr("attn_audit.capture.accumulate.PATTERN_CHUNK_ELEMS", 2 * 4 * 90 * 7)
    got = _accumulate(call, pad, spec, causal=call.is_causal)
    want = brute_force(call, pad, spec)
    assert want["need_hist"]["streaming"].sum() > 0
    _compare(got, want)
    # the pattern totals count the rows the sparsity totals count
    assert got["rows"][0].tolist() == [int(want["need_hist"]["block-oracle"][h, 0].sum()) for h in range(H)]


def test_pattern_order_and_rowtopk_consistency() -> None:
    """Oracle >= estimate in kept mass; row-topk level = ceil(k_eps / block) for every row."""
    call = _call(5, 1, 2, 1, 80, 8)
    spec = MeasureSpec(rows_per_sequence=None, block_size=16, min_keys=4, eps=(0.05,))
    pad = torch.ones(1, 80, dtype=torch.bool)
    info = dict(num_layers=1, num_heads=2, num_kv_heads=1, causal=True, head_dim=8)
    acc = Accumulator(info, 80, 1, AccumulateConfig(measure=spec))
    acc.begin_batch(0, pad)
    acc(call)
    s = acc.summary()
    k_hist = s["k_hist"][0, :, 0]  # (H, n + 1): exact k_eps per row
    want = np.zeros((2, s["patterns"]["nb"] + 2), dtype=np.int64)
    for h in range(2):
        for kk, c in enumerate(k_hist[h]):
            want[h, math.ceil(kk / 16)] += c
    np.testing.assert_array_equal(s["patterns"]["need_hist"]["row-topk"][0, :, 0], want)
    kept = s["patterns"]["kept_sum"]
    assert np.all(kept["row-topk"][0] >= kept["block-oracle"][0] - 1e-9)
    assert np.all(kept["block-oracle"][0] >= kept["block-topk"][0] - 1e-9)


def test_pattern_state_merges() -> None:
    """Two halves of the sequences merged equal one pass (checkpoint / distributed state)."""
    spec = MeasureSpec(rows_per_sequence=None, block_size=16, min_keys=4)
    calls = [_call(7 + i, 1, 2, 1, 64, 8) for i in range(2)]
    info = dict(num_layers=1, num_heads=2, num_kv_heads=1, causal=True, head_dim=8)
    pad = torch.ones(1, 64, dtype=torch.bool)
    accs = []
    for i, c in enumerate(calls):
        acc = Accumulator(info, 64, 2, AccumulateConfig(measure=spec))
        acc.begin_batch(i, pad)
        acc(c)
        accs.append(acc)
    both = Accumulator(info, 64, 2, AccumulateConfig(measure=spec))
    both.begin_batch(0, torch.ones(2, 64, dtype=torch.bool))
    both(AttentionCall(0, torch.cat([c.query for c in calls]), torch.cat([c.key for c in calls]),
                       torch.cat([c.value for c in calls]), None, 8 ** -0.5, None, None, True))
    accs[0].merge_state(accs[1].state())
    a, b = accs[0].summary()["patterns"], both.summary()["patterns"]
    for name in a["need_hist"]:
        np.testing.assert_array_equal(a["need_hist"][name], b["need_hist"][name])
        np.testing.assert_allclose(a["kept_sum"][name], b["kept_sum"][name], rtol=1e-12)


def test_patterns_on_smollm2_layers(smollm2) -> None:
    """Real post-RoPE Q/K of SmolLM2 (GQA 9/3): two layers' pattern totals equal the brute force."""
    model, tok = smollm2.model, smollm2.tokenizer
    ids = tok("The quick brown fox jumps over the lazy dog. " * 12, return_tensors="pt").input_ids[:, :96]
    calls: dict[int, AttentionCall] = {}

    def record(call: AttentionCall) -> None:
        if call.layer in (0, 7):
            calls[call.layer] = AttentionCall(0, call.query.detach().clone(), call.key.detach().clone(),
                                              call.value.detach().clone(), None, call.scaling, None, None, True)

    with torch.no_grad(), capturing(model, record):
        model(ids)
    spec = MeasureSpec(rows_per_sequence=None, block_size=32, min_keys=16, eps=(0.05,),
                       patterns=("block-oracle", "block-topk", "streaming", "vertical-slash"))
    pad = torch.ones(1, ids.shape[1], dtype=torch.bool)
    assert len(calls) == 2
    for call in calls.values():
        _compare(_accumulate(call, pad, spec, True), brute_force(call, pad, spec))


def tiny_gemma3():
    """A random 2-layer Gemma 3 text model: layer 0 local (sliding window 16), layer 1 global."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gemma3_text", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=256,
                               max_position_embeddings=256, sliding_window=16,
                               layer_types=["sliding_attention", "full_attention"])
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def test_patterns_on_gemma3_local_and_global_layers() -> None:
    """Gemma 3's local (sliding-window mask from the model) and global layers, GQA 4/2."""
    model = tiny_gemma3()
    calls: dict[int, AttentionCall] = {}
    with torch.no_grad(), capturing(model, lambda call: calls.__setitem__(call.layer, call)):
        model(torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(4)))
    assert calls[0].sliding_window == 16 and calls[1].sliding_window is None
    spec = MeasureSpec(rows_per_sequence=None, block_size=16, min_keys=4, eps=(0.05, 0.2))
    pad = torch.ones(1, 80, dtype=torch.bool)
    for layer, call in calls.items():
        call.layer = 0
        want = brute_force(call, pad, spec)
        _compare(_accumulate(call, pad, spec, True), want)
        if layer == 0:  # a 16-key window: streaming with 2 blocks covers every row
            assert want["need_hist"]["streaming"][:, :, 3:].sum() == 0


def test_patterns_on_bundled_gemma3_local_and_global_layers(gemma3) -> None:
    """The real Gemma 3 270M (QK-norm, MQA 4/1, head_dim 256) past its 512-token window: a local
    layer (sliding-window mask as the model builds it) and a global layer equal the brute force."""
    model, tok = gemma3.model, gemma3.tokenizer
    text = "A lighthouse keeper wrote down every ship that passed, its flag and the hour. " * 60
    ids = tok(text, return_tensors="pt").input_ids[:, :576]
    assert ids.shape[1] == 576
    calls: dict[int, AttentionCall] = {}

    def record(call: AttentionCall) -> None:
        if call.layer in (0, 5):
            calls[call.layer] = call

    with torch.no_grad(), capturing(model, record):
        model(ids)
    assert calls[0].sliding_window == 512 and calls[5].sliding_window is None
    spec = MeasureSpec(rows_per_sequence=None, block_size=96, min_keys=16, eps=(0.05,))
    pad = torch.ones(1, ids.shape[1], dtype=torch.bool)
    for call in calls.values():
        call.layer = 0
        want = brute_force(call, pad, spec)
        _compare(_accumulate(call, pad, spec, True), want)


@pytest.mark.parametrize("causal,mask_after,sinks,dtype", [
    (True, False, 1, torch.float32), (True, True, 0, torch.float32), (False, False, 1, torch.float64),
    (True, False, 2, torch.bfloat16)])
def test_compiled_pattern_kernel_equals_torch_path(causal: bool, mask_after: bool, sinks: int,
                                                   dtype: torch.dtype) -> None:
    """The CPU kernel (rows/patterns_cpu.py) gives the torch formulation's curves to float64
    rounding and the same needed levels, on rows with masked keys, rows with no allowed key, a
    partial last block and a row block cut short of the keys."""
    from attn_audit.rows.patterns import PATTERNS, layer_estimates, pattern_rows

    gen = torch.Generator().manual_seed(11)
    B, H, Hkv, n, d, block = 2, 4, 2, 150, 16, 32
    q = torch.randn(B, H, n, d, generator=gen) * 2
    k = torch.randn(B, Hkv, n, d, generator=gen) * 2
    est = layer_estimates(q, k, d ** -0.5, block, causal, PATTERNS)
    rows = torch.tensor([0, 3, 31, 32, 77, 120, 121])
    n_cut = 122 if causal else n  # a causal row block stops at its last row
    s = (q[:, :, rows] @ k.repeat_interleave(H // Hkv, 1).transpose(-1, -2) * d ** -0.5)[..., :n_cut]
    if causal and not mask_after:
        s = s.masked_fill(torch.arange(n_cut)[None, :] > rows[:, None], float("-inf"))
    s = s.masked_fill(torch.rand(s.shape, generator=gen) < 0.1, float("-inf"))  # scattered masked keys
    s[0, 1, 2] = float("-inf")  # a row without any allowed key
    g = s.reshape(B * H, len(rows), n_cut).to(dtype)
    args = (g, rows, (0.01, 0.1, 0.5), block, sinks, causal, PATTERNS, est, B)
    ref = pattern_rows(*args, keys_total=n, mask_after=mask_after, use_kernel=False)
    got = pattern_rows(*args, keys_total=n, mask_after=mask_after)
    assert set(got.kept) == set(ref.kept) == set(PATTERNS)
    for name in ref.kept:
        assert got.kept[name].shape == ref.kept[name].shape == (B * H, len(rows), 6)
        torch.testing.assert_close(got.kept[name], ref.kept[name], rtol=0, atol=1e-12, msg=name)
        assert torch.equal(got.need[name], ref.need[name]), name
    assert float(got.kept["row-topk"][1, 2, -1]) == 0.0  # the empty row (batch 0, head 1) keeps nothing
