"""Benchmark: the Gaussianity statistics alone, per head-site, on reservoirs shaped like a model's.

No model and no torch: seeded Student-t(8) reservoirs with SmolLM2's shapes (per layer: 9 query
heads and 3 KV heads of d = 64 at the Q, K, pre-RoPE Q and pre-RoPE K sites, 2032 rows each, and
9 x 1024 row logits) go through :func:`attn_audit.assemble.gaussianity.add_gaussianity`, as in an
audit, for a growing number of layers. Prints per layer count

    layers=30 head_sites=990 wall_s=... cpu_s=... wall_ms_per_head_site=... cpu_ms_per_head_site=...

(CPU time is the process's, all threads; on a shared machine it moves less than wall time). The
per-head-site figures should stay flat as layers grow (the cost is linear in heads x sites).

Usage: .venv/bin/python benchmarks/bench_statistics.py [--layers 10,20,30] [--rows 2032]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI sets it (attn_audit/cli.py)

import numpy as np  # noqa: E402


def reservoirs(layers: int, rows: int, heads: int = 9, kv_heads: int = 3, d: int = 64, logits: int = 1024,
               seed: int = 0) -> dict:
    """The summary keys the Gaussianity stage reads: samples (rows, heads, d) float32 per layer and
    site, row logits (heads, logits) per layer."""
    rng = np.random.default_rng(seed)

    def t8(*shape: int) -> np.ndarray:
        return rng.standard_t(8, size=shape).astype(np.float32)

    return {
        "samples_q": {l: t8(rows, heads, d) for l in range(layers)},
        "samples_k": {l: t8(rows, kv_heads, d) for l in range(layers)},
        "samples_q_pre": {l: t8(rows, heads, d) for l in range(layers)},
        "samples_k_pre": {l: t8(rows, kv_heads, d) for l in range(layers)},
        "row_logits": {l: t8(heads, logits) for l in range(layers)},
    }


def one(layers: int, rows: int) -> dict:
    from attn_audit.assemble.gaussianity import add_gaussianity
    from attn_audit.config import AuditConfig

    heads, kv_heads = 9, 3
    s = reservoirs(layers, rows, heads, kv_heads)
    recs = [{"layer": l, "head": h, "kv_head": h // (heads // kv_heads)} for l in range(layers) for h in range(heads)]
    sites = layers * (3 * heads + 2 * kv_heads)
    add_gaussianity(recs[:1], reservoirs(1, rows, heads, kv_heads, seed=1), AuditConfig(), heads // kv_heads)  # warm
    c0, t0 = time.process_time(), time.perf_counter()
    add_gaussianity(recs, s, AuditConfig(), heads // kv_heads)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {"layers": layers, "head_sites": sites, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "wall_ms_per_head_site": round(1e3 * wall / sites, 2), "cpu_ms_per_head_site": round(1e3 * cpu / sites, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="10,20,30")
    ap.add_argument("--rows", type=int, default=2032)
    args = ap.parse_args()
    for layers in (int(x) for x in args.layers.split(",") if x):
        rec = one(layers, args.rows)
        print(" ".join(f"{k}={v}" for k, v in rec.items()), flush=True)


if __name__ == "__main__":
    main()
