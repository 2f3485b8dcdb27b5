"""Time FlexAttention block masks against causal sdpa at SmolLM2's attention shapes (CPU or GPU).

What a sparse plan buys is decided by the kernel, not by the FLOPs it skips: this times one
layer's attention (9 query heads, 3 KV heads, head_dim 64, batch 1 by default; GQA without
repeating K/V) for

- ``sdpa-causal``: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``, the
  model's own dense kernel (K/V repeated to the query heads, as transformers' sdpa path does);
- ``flex-causal``: compiled FlexAttention with the dense causal block mask;
- ``flex-streaming``: sinks (the first 64-key block) + a window of ``--window`` keys;
- ``flex-block-topk``: per query block the diagonal block and ``--topk - 1`` other key blocks of 64
  (a fixed random choice per head and query block, as a dynamic selection would produce);
- ``flex-mixed``: a third of the heads on the streaming window, the rest causal (one mask, per head).

Per case: the block sparsity (share of the causal key blocks skipped), the kernel FLOPs saving
predicted by counting whole 64 x 64 tiles, the median time over ``--reps`` after ``--warmup``
calls, and the speedup against sdpa. Compile time (the first call per shape) and mask creation are
reported apart. FlexAttention on CPU needs ``torch.compile`` (the system C++ compiler builds it).

    python benchmarks/bench_attention.py --lens 1024,4096 --reps 5

``--plan`` times a real kernel plan instead (:func:`attn_audit.predeploy.plan_speed`, what
``--verify --measure-speed`` records): the model runs one sequence of the bundled corpus at
``--n`` tokens and every layer's attention, on its real Q/K/V, is timed as ``apply_plan`` runs it
against the model's own kernel, heads measured slower than dense kept dense. Printed side by side:
the oracle top-k FLOPs saving, the kernel FLOPs saving and the measured attention speedup.
``--plan make`` first audits the model on a small sample (``--plan-sequences`` sequences of
``--plan-len`` tokens, target length ``--n``) and writes the audit to ``--plan-out``:

    python benchmarks/bench_attention.py --plan make --model smollm2-135m-instruct --n 4096
    python benchmarks/bench_attention.py --plan out/audit.json --n 4096   # or a flex_plan.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch.nn.attention.flex_attention import (
    BlockMask,
    create_block_mask,
    flex_attention,
)

BLOCK = 64


def _time(fn, warmup: int, reps: int) -> tuple[float, list[float]]:
    """(first call in s, the ``reps`` timed calls in s) after ``warmup`` untimed calls."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, times


def _causal(b, h, q, k):
    return q >= k


def _streaming(window: int, sinks: int):
    def mask(b, h, q, k):
        return (q >= k) & ((k < sinks) | (q - k < window))
    return mask


def _block_topk_mask(heads: int, n: int, topk: int, seed: int) -> BlockMask:
    """Per head and query block: the diagonal block plus ``topk - 1`` random earlier key blocks.

    Shapes: kv_num_blocks (1, heads, nb) int32, kv_indices (1, heads, nb, nb) int32."""
    nb = n // BLOCK
    g = torch.Generator().manual_seed(seed)
    num = torch.zeros(1, heads, nb, dtype=torch.int32)
    idx = torch.zeros(1, heads, nb, nb, dtype=torch.int32)
    for h in range(heads):
        for qb in range(nb):
            earlier = torch.randperm(qb, generator=g)[: max(0, topk - 1)] if qb else torch.empty(0, dtype=torch.long)
            chosen = torch.cat([earlier, torch.tensor([qb])]).sort().values
            num[0, h, qb] = len(chosen)
            idx[0, h, qb, : len(chosen)] = chosen.to(torch.int32)
    return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=BLOCK, mask_mod=_causal, seq_lengths=(n, n))


def _mixed(heads: int, window: int, sinks: int):
    stream = heads // 3

    def mask(b, h, q, k):
        local = (k < sinks) | (q - k < window)
        return (q >= k) & ((h >= stream) | local)
    return mask


def _tiles(bm: BlockMask) -> int:
    """Computed 64 x 64 tiles (full + partial) summed over heads and query blocks."""
    t = bm.kv_num_blocks.sum()
    if bm.full_kv_num_blocks is not None:
        t = t + bm.full_kv_num_blocks.sum()
    return int(t)


def run(n: int, heads: int, kv_heads: int, d: int, window: int, topk: int, warmup: int, reps: int,
        device: str, dtype: torch.dtype) -> list[dict]:
    torch.manual_seed(0)
    q = torch.randn(1, heads, n, d, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, n, d, device=device, dtype=dtype)
    v = torch.randn(1, kv_heads, n, d, device=device, dtype=dtype)
    groups = heads // kv_heads
    rows = []

    def sdpa():
        kr, vr = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        return torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)

    first, times = _time(sdpa, warmup, reps)
    base = statistics.median(times)
    nb = n // BLOCK
    causal_tiles = heads * nb * (nb + 1) // 2
    rows.append({"n": n, "case": "sdpa-causal", "tiles": causal_tiles, "mask_s": 0.0, "first_s": first,
                 "median_s": base, "min_s": min(times)})
    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {
        "flex-causal": lambda: create_block_mask(_causal, 1, heads, n, n, device=device, BLOCK_SIZE=BLOCK),
        "flex-streaming": lambda: create_block_mask(_streaming(window, BLOCK), 1, heads, n, n, device=device,
                                                    BLOCK_SIZE=BLOCK),
        "flex-block-topk": lambda: _block_topk_mask(heads, n, topk, 0).to(device),
        "flex-mixed": lambda: create_block_mask(_mixed(heads, window, BLOCK), 1, heads, n, n, device=device,
                                                BLOCK_SIZE=BLOCK),
    }
    for name, make in masks.items():
        t0 = time.perf_counter()
        bm = make()
        mask_s = time.perf_counter() - t0
        first, times = _time(lambda: compiled(q, k, v, block_mask=bm, enable_gqa=True), warmup, reps)
        rows.append({"n": n, "case": name, "tiles": _tiles(bm), "mask_s": mask_s, "first_s": first,
                     "median_s": statistics.median(times), "min_s": min(times)})
    for r in rows:
        r["block_sparsity"] = 1 - r["tiles"] / causal_tiles
        r["speedup"] = base / r["median_s"]
    return rows


def _load_plan_source(path: str):
    """(plan for plan_speed, oracle top-k saving or None) from an audit.json or a flex_plan.json."""
    import json

    from attn_audit.result import AuditResult

    data = json.loads(open(path, encoding="utf-8").read())
    if data.get("format") == "attn-audit/flex-plan":
        return data, None
    result = AuditResult.from_dict(data, source=path)
    return result, (result.data.get("plan_summary") or {}).get("planned_flops_saving")


def run_plan(a) -> None:
    """Time a real kernel plan inside the model (see the module docstring)."""
    from attn_audit.data import bundled_texts, token_stream
    from attn_audit.load import load_model
    from attn_audit.predeploy import plan_speed

    lm = load_model(a.model)
    path = a.plan
    if path == "make":
        from attn_audit import AuditConfig, audit

        t0 = time.perf_counter()
        cfg = AuditConfig(seq_lens=(a.plan_len,), num_sequences=a.plan_sequences, batch_size=a.plan_sequences,
                          target_len=a.n)
        result = audit(lm.model, lm.tokenizer, None, cfg, name=a.model)
        result.save(a.plan_out)
        print(f"# audit for the plan: {a.plan_sequences} x {a.plan_len} tokens, target {a.n}: "
              f"{time.perf_counter() - t0:.0f} s, written to {a.plan_out}")
        path = a.plan_out
    plan, oracle = _load_plan_source(path)
    ids, _ = token_stream(bundled_texts(), lm.tokenizer, 0, a.n)
    t0 = time.perf_counter()
    sp = plan_speed(lm.model, plan, torch.tensor([ids[: a.n]]), label="kernel plan", oracle_flops_saving=oracle,
                    warmup=a.warmup, reps=a.reps)
    wall = time.perf_counter() - t0
    print(f"# {a.model} at {a.n} tokens, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, float32; warmup {a.warmup}, median of {a.reps}; "
          f"compile {sp['compile_s']:.0f} s apart; whole measurement {wall:.0f} s")
    print(f"{'layer':>5} {'planned':>7} {'sparse':>6} {'dense ms':>9} {'mask ms':>8} {'kernel ms':>9} "
          f"{'plan ms':>8} {'tiles pred.':>11} {'measured':>8}")
    for x in sp["layers"]:
        pred = x["predicted_tile_speedup"]
        print(f"{x['layer']:>5} {x['heads_planned']:>7} {x['heads_sparse']:>6} {x['dense_ms']:>9.1f} "
              f"{x['mask_ms']:>8.1f} {x['kernel_ms']:>9.1f} {x['plan_ms']:>8.1f} "
              f"{(f'{pred:.2f}x' if pred else '-'):>11} {x['speedup']:>7.2f}x{' (dense)' if x['kept_dense'] else ''}")
    by_pattern: dict[str, list[int]] = {}
    for h in sp["heads_kept_dense"]:
        by_pattern.setdefault(h["pattern"], []).append(1)
    planned = sum(x["heads_planned"] for x in sp["layers"])
    print(f"heads planned sparse: {planned}; measured slower than dense and kept dense: "
          f"{len(sp['heads_kept_dense'])} ({', '.join(f'{k} {len(v)}' for k, v in sorted(by_pattern.items()))}); "
          f"layers kept dense: {len(sp['layers_kept_dense'])}")
    fmt = lambda v: f"{v:.1%}" if isinstance(v, float) else "n/a"  # noqa: E731
    sx = lambda v: f"{v:.2f}x" if isinstance(v, float) else "n/a"  # noqa: E731
    print(f"{'':24} {'FLOPs saving':>12} {'speedup':>8}")
    print(f"{'oracle top-k (bound)':24} {fmt(sp['oracle_flops_saving']):>12} {sx(sp['oracle_flops_speedup']):>8}")
    print(f"{'kernel plan (predicted)':24} {fmt(sp['kernel_flops_saving']):>12} {sx(sp['predicted_flops_speedup']):>8}")
    print(f"{'kernel plan (measured)':24} {'':>12} {sx(sp['attention_speedup']):>8}   "
          f"({sp['dense_ms']:.0f} ms dense attention -> {sp['plan_ms']:.0f} ms)")
    if a.json:
        import json

        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(sp, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lens", default="1024,4096")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=256, help="streaming window in keys (default 256)")
    p.add_argument("--topk", type=int, default=8, help="key blocks of 64 per query block (default 8)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--plan", help="an audit.json or flex_plan.json to time inside the model, or 'make'")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--n", type=int, default=4096, help="tokens for --plan (default 4096)")
    p.add_argument("--plan-len", type=int, default=1024)
    p.add_argument("--plan-sequences", type=int, default=2)
    p.add_argument("--plan-out", default="bench_plan_audit.json")
    p.add_argument("--json", help="write the verify.speed block of --plan here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.plan:
        run_plan(a)
        return
    dtype = getattr(torch, a.dtype)
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, device {a.device}, "
          f"{torch.get_num_threads()} threads, {a.dtype}; {a.heads} q / {a.kv_heads} kv heads, d {a.head_dim}, "
          f"window {a.window}, block-topk {a.topk}, warmup {a.warmup}, reps {a.reps}")
    print(f"{'n':>5} {'case':16} {'blk.sparsity':>12} {'mask s':>7} {'1st call s':>10} {'median ms':>10} "
          f"{'min ms':>8} {'speedup':>8}")
    for n in (int(x) for x in a.lens.split(",")):
        for r in run(n, a.heads, a.kv_heads, a.head_dim, a.window, a.topk, a.warmup, a.reps, a.device, dtype):
            print(f"{r['n']:>5} {r['case']:16} {r['block_sparsity']:>12.1%} {r['mask_s']:>7.2f} "
                  f"{r['first_s']:>10.2f} {r['median_s'] * 1e3:>10.1f} {r['min_s'] * 1e3:>8.1f} "
                  f"{r['speedup']:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
