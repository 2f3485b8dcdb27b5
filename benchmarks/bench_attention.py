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
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
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
