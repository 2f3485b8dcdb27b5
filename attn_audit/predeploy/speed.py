"""Measured attention speed of a plan against the model's own dense kernel, per layer, on the
run's device.

For each layer, Q (1, H, n, d), K and V (1, H_kv, n, d) of the model's shapes at length ``n`` are
timed through the dense kernel (causal ``scaled_dot_product_attention`` with K/V repeated to the
query heads, as transformers' sdpa path runs it) and through the *plan attention* of that layer, a
pluggable callable (:data:`PlanAttention`) built once per layer (mask building and compilation are
timed apart, as ``setup_s``). Each is called ``warmup`` times, then timed ``reps`` times; the
median counts. A layer whose plan is measured slower than dense is kept dense (and listed), so the
model-wide ``attention_speedup`` = Σ dense / Σ min(plan, dense) is what the plan can buy; next to it
``predicted_flops_speedup`` = 1 / (1 − planned FLOPs saving).

The default plan attention (:func:`flex_window_attention`) runs each planned head as FlexAttention
with sinks + a window of its budget k (the plan's sink-window comparison pattern); a kernel plan
(per-head block patterns) plugs in the same way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

PlanAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(q (1, H, n, d), k (1, H_kv, n, d), v (1, H_kv, n, d)) -> output (1, H, n, d)."""
PlanAttentionFactory = Callable[[int, Mapping[int, int]], PlanAttention]
"""(layer, {query head: budget k}) -> that layer's plan attention."""


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The model's own kernel: causal sdpa with K/V repeated to the query heads."""
    groups = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), is_causal=True)


def flex_window_attention(n: int, heads: int, sinks: int, block: int = 64,
                          device: str = "cpu") -> PlanAttentionFactory:
    """Plan attention with compiled FlexAttention: planned head h keeps the first ``sinks`` keys and
    a window of its budget k, other heads stay causal-dense (one block mask per layer)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    window = torch.full((heads,), n + 1, dtype=torch.long, device=device)  # read by the one mask function at call time

    def mask(b: Any, h: Any, qi: Any, kj: Any) -> Any:
        return (qi >= kj) & ((kj < sinks) | (qi - kj < window[h]))

    def factory(layer: int, budgets: Mapping[int, int]) -> PlanAttention:
        mine = torch.full((heads,), n + 1, dtype=torch.long, device=device)
        for h, k in budgets.items():
            mine[h] = max(1, int(k) - sinks)
        window.copy_(mine)
        bm = create_block_mask(mask, 1, heads, n, n, device=device, BLOCK_SIZE=block)

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            window.copy_(mine)  # one mask function for every layer: compiled once, not per layer
            return compiled(q, k, v, block_mask=bm, enable_gqa=True)

        return run

    return factory


def _time(fn: Callable[[], Any], warmup: int, reps: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attention_speed(info: Mapping[str, Any], plan: list[dict[str, Any]], n: int, factory: PlanAttentionFactory, *,
                    label: str, planned_flops_saving: float | None, device: str = "cpu",
                    dtype: torch.dtype = torch.float32, warmup: int = 1, reps: int = 3,
                    dense: PlanAttention = dense_attention, seed: int = 0) -> dict[str, Any]:
    """The ``verify.speed`` block: per layer with planned heads, dense and plan times (ms), the
    plan's setup time apart, and the model-wide measured and predicted speedups."""
    heads, kv, d = int(info["num_heads"]), int(info["num_kv_heads"]), int(info["head_dim"])
    by_layer: dict[int, dict[int, int]] = {}
    for e in plan:
        by_layer.setdefault(int(e["layer"]), {})[int(e["head"])] = min(int(e["k"]), n)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, n, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(1, kv, n, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(1, kv, n, d, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        dense_s = _time(lambda: dense(q, k, v), warmup, reps, sync)
        layers = []
        for layer in sorted(by_layer):
            t0 = time.perf_counter()
            fn = factory(layer, by_layer[layer])
            fn(q, k, v)  # mask building and compilation
            sync()
            setup = time.perf_counter() - t0
            plan_s = _time(lambda: fn(q, k, v), warmup, reps, sync)
            layers.append({"layer": layer, "heads_planned": len(by_layer[layer]), "dense_ms": dense_s * 1e3,
                           "plan_ms": plan_s * 1e3, "setup_s": setup, "speedup": dense_s / plan_s,
                           "kept_dense": plan_s > dense_s})
    total_layers = int(info["num_layers"])
    dense_total = dense_s * total_layers
    plan_total = dense_s * (total_layers - len(layers)) + sum(min(x["plan_ms"], x["dense_ms"]) / 1e3 for x in layers)
    saving = planned_flops_saving
    return {
        "plan_attention": label,
        "device": device,
        "seq_len": n,
        "warmup": warmup,
        "reps": reps,
        "dense_kernel": "causal sdpa, K/V repeated (the model's own kernel)",
        "dense_ms_per_layer": dense_s * 1e3,
        "layers": layers,
        "layers_kept_dense": [x["layer"] for x in layers if x["kept_dense"]],
        "setup_s": sum(x["setup_s"] for x in layers),
        "attention_speedup": dense_total / plan_total,
        "predicted_flops_speedup": 1.0 / (1.0 - saving) if saving is not None and saving < 1 else None,
    }
