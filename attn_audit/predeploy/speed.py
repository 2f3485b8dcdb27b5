"""Measured attention speed of the applied kernel plan against the model's own dense kernel, per
layer and per head, on the run's device.

One forward of the model over ``ids`` (one sequence at the target length) runs with its own
attention; at every layer with planned heads the layer's real Q, K, V (post-RoPE, the inputs the
dynamic patterns choose from) are timed, each ``warmup`` untimed calls then the median of ``reps``:

- ``dense_ms``: the model's own kernel for the whole layer (transformers' ``sdpa`` path: causal,
  GQA), what runs without a plan;
- per planned head, ``head_ms``: that head alone through compiled FlexAttention with its block
  mask (the same :class:`~attn_audit.apply.flex.LayerMask` ``apply_plan`` builds, restricted to
  the head), against ``dense_head_ms``: one head of causal sdpa (the path an unplanned head takes
  inside a planned layer). **A head measured slower than dense is kept dense** and listed in
  ``heads_kept_dense``. Per-head timing is sound because both kernels do independent work per
  head (FlexAttention iterates (head, query block) pairs over the head's own tiles; sdpa computes
  heads independently), so a layer's kernel time is the sum of its heads' times up to the fixed
  per-call overhead, which the layer measurement below pays once;
- the layer as ``apply_plan`` runs it with the heads that stayed sparse:
  ``mask_ms`` (selection from the input and block-mask building, paid on every forward) plus
  ``kernel_ms`` (:func:`~attn_audit.apply.flex.planned_attention`: one FlexAttention call for the
  sparse heads, sdpa for the others) = ``plan_ms``. If even that is slower than ``dense_ms``
  (overheads), the whole layer is kept dense and listed in ``layers_kept_dense``.

Model-wide ``attention_speedup`` = Σ dense_ms / Σ min(plan_ms, dense_ms) over all layers (layers
without planned heads count dense / dense), next to ``predicted_flops_speedup`` = 1 / (1 − the
plan's kernel FLOPs saving) and ``oracle_flops_speedup`` = 1 / (1 − the oracle top-k saving);
per layer, ``predicted_tile_speedup`` counts the computed tiles of this input's block masks.
Compilation (the first call per shape) is timed apart as ``compile_s``. :func:`measured_plan`
turns the plan into the one measured: those heads and layers set to ``dense``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from attn_audit.apply.flex import flex_kernel, model_kernel, layer_mask, planned_attention
from attn_audit.apply.plan import LoadedPlan, load_plan
from attn_audit.capture.interface import AttentionCall, capturing


def _time(fn: Callable[[], Any], warmup: int, reps: int, sync: Callable[[], None]) -> float:
    """Median seconds of ``reps`` calls after ``warmup`` untimed ones."""
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


def _first(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


class _LayerTimer:
    """Attention consumer timing each planned layer on its real inputs; returns None (the model's
    own attention runs on)."""

    def __init__(self, plan: LoadedPlan, previous: str, warmup: int, reps: int, device: str) -> None:
        self.plan, self.previous, self.warmup, self.reps = plan, previous, warmup, reps
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.layers: list[dict[str, Any]] = []
        self.dense_ms: dict[int, float] = {}
        self.compile_s = 0.0

    def __call__(self, call: AttentionCall) -> None:
        heads = self.plan.layer(call.layer)
        q, k, v = call.query, call.key, call.value
        n = q.shape[2]
        if not heads or k.shape[2] != n or q.shape[0] != 1:
            return None
        own = model_kernel(self.previous)
        kw = {"scaling": call.scaling, "dropout": 0.0, "is_causal": call.is_causal}
        if call.sliding_window:
            kw["sliding_window"] = call.sliding_window
        dense_s = _time(lambda: own(call.module, q, k, v, call.attention_mask, **kw), self.warmup, self.reps,
                        self.sync)
        self.dense_ms[call.layer] = dense_s * 1e3
        block = self.plan.block_size
        groups = q.shape[1] // k.shape[1]
        lm = layer_mask(call, heads, block)
        flex = flex_kernel(True)

        def dense_head(h: int) -> Any:
            a = lm.allowed
            if call.attention_mask is None and call.is_causal and not call.sliding_window:
                return torch.nn.functional.scaled_dot_product_attention(
                    q[:, h:h + 1], k[:, h // groups:h // groups + 1], v[:, h // groups:h // groups + 1],
                    is_causal=True, scale=call.scaling)
            safe = a | ~a.any(-1, keepdim=True)
            return torch.nn.functional.scaled_dot_product_attention(
                q[:, h:h + 1], k[:, h // groups:h // groups + 1], v[:, h // groups:h // groups + 1],
                attn_mask=safe[:, None], scale=call.scaling)

        dense_head_s = _time(lambda: dense_head(0), self.warmup, self.reps, self.sync)
        per_head = []
        for h, p in sorted(heads.items()):
            bm = lm.block_mask(heads=[h])
            kh, vh = k[:, h // groups:h // groups + 1], v[:, h // groups:h // groups + 1]

            def run(h: int = h, bm: Any = bm, kh: torch.Tensor = kh, vh: torch.Tensor = vh) -> Any:
                return flex(q[:, h:h + 1], kh, vh, block_mask=bm, scale=call.scaling)

            self.compile_s += _first(run, self.sync)
            t = _time(run, self.warmup, self.reps, self.sync)
            per_head.append({"head": h, "pattern": p.pattern, "tiles": int(lm.tiles[:, h].sum()),
                             "head_ms": t * 1e3, "dense_head_ms": dense_head_s * 1e3,
                             "kept_dense": t > dense_head_s})
        kept = {h: heads[h] for h in heads if not next(x for x in per_head if x["head"] == h)["kept_dense"]}
        entry: dict[str, Any] = {"layer": call.layer, "heads_planned": len(heads), "heads_sparse": len(kept),
                                 "dense_ms": dense_s * 1e3, "dense_head_ms": dense_head_s * 1e3, "heads": per_head}
        causal_tiles = int(lm.allowed_tiles.sum())  # tiles one dense head computes
        H = q.shape[1]
        if kept:
            mask_s = _time(lambda: layer_mask(call, kept, block), self.warmup, self.reps, self.sync)
            lm2 = layer_mask(call, kept, block)
            self.compile_s += _first(lambda: planned_attention(call, kept, block, compile=True, mask=lm2), self.sync)
            kernel_s = _time(lambda: planned_attention(call, kept, block, compile=True, mask=lm2), self.warmup,
                             self.reps, self.sync)
            plan_tiles = int(lm2.tiles[:, list(kept)].sum()) + (H - len(kept)) * causal_tiles
            entry.update({"mask_ms": mask_s * 1e3, "kernel_ms": kernel_s * 1e3,
                          "plan_ms": (mask_s + kernel_s) * 1e3, "kept_dense": mask_s + kernel_s > dense_s,
                          "predicted_tile_speedup": H * causal_tiles / plan_tiles if plan_tiles else None})
        else:
            entry.update({"mask_ms": 0.0, "kernel_ms": dense_s * 1e3, "plan_ms": dense_s * 1e3, "kept_dense": True,
                          "predicted_tile_speedup": 1.0})
        entry["speedup"] = dense_s * 1e3 / min(entry["plan_ms"], entry["dense_ms"])
        self.layers.append(entry)
        return None


def _speedup(saving: Any) -> float | None:
    return 1.0 / (1.0 - float(saving)) if isinstance(saving, (int, float)) and saving < 1 else None


def plan_speed(model: Any, plan: Any, ids: torch.Tensor, *, label: str, oracle_flops_saving: float | None = None,
               warmup: int = 1, reps: int = 3) -> dict[str, Any]:
    """The ``verify.speed`` block: ``plan`` (anything :func:`~attn_audit.apply.plan.load_plan`
    reads) timed inside ``model`` on ``ids`` (1, n) against the model's own kernel (see the module
    docstring)."""
    cfg = getattr(model.config, "text_config", None) or model.config
    loaded = load_plan(plan, cfg.to_dict())
    device = str(next(model.parameters()).device)
    previous = getattr(model.config, "_attn_implementation", None) or "sdpa"
    timer = _LayerTimer(loaded, previous, warmup, reps, device)
    n = int(ids.shape[-1])
    with torch.inference_mode(), capturing(model, timer):
        model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device))
    layers = timer.layers
    total_layers = int(getattr(cfg, "num_hidden_layers", 0) or len(layers))
    typical = statistics.median(timer.dense_ms.values()) if timer.dense_ms else 0.0
    dense_total = typical * (total_layers - len(layers)) + sum(x["dense_ms"] for x in layers)
    plan_total = typical * (total_layers - len(layers)) + sum(min(x["plan_ms"], x["dense_ms"]) for x in layers)
    kernel_saving = loaded.source.get("kernel_flops_saving")
    return {
        "plan_attention": label,
        "device": device,
        "seq_len": n,
        "warmup": warmup,
        "reps": reps,
        "dense_kernel": f"the model's own kernel ({previous}: causal, GQA), whole layer",
        "block_size": loaded.block_size,
        "dense_ms_per_layer": typical,
        "layers": layers,
        "heads_kept_dense": [{"layer": x["layer"], "head": h["head"], "pattern": h["pattern"],
                              "head_ms": h["head_ms"], "dense_head_ms": h["dense_head_ms"]}
                             for x in layers for h in x["heads"] if h["kept_dense"]],
        "layers_kept_dense": [x["layer"] for x in layers if x["kept_dense"]],
        "compile_s": timer.compile_s,
        "mask_ms": sum(x["mask_ms"] for x in layers),
        "dense_ms": dense_total,
        "plan_ms": plan_total,
        "attention_speedup": dense_total / plan_total if plan_total else None,
        "kernel_flops_saving": kernel_saving,
        "predicted_flops_speedup": _speedup(kernel_saving),
        "oracle_flops_saving": oracle_flops_saving,
        "oracle_flops_speedup": _speedup(oracle_flops_saving),
        "rule": "a head whose FlexAttention time is above one head of dense sdpa is kept dense; a layer whose "
                "mask building + kernel time stays above the dense layer is kept dense",
    }


def measured_plan(flex_plan: dict[str, Any], speed: dict[str, Any]) -> dict[str, Any]:
    """``flex_plan`` (a flex plan dict, e.g. ``load_plan(result).source``) with the heads and layers
    ``speed`` (a ``verify.speed`` block) measured slower than dense set to ``dense``: the plan as
    measured, ready for :func:`attn_audit.apply_plan` or ``flex_plan.json``."""
    import json

    out = json.loads(json.dumps(flex_plan))  # a plain copy: layers that share one dict are split
    dense = {(h["layer"], h["head"]) for h in speed.get("heads_kept_dense") or []}
    layers = set(speed.get("layers_kept_dense") or [])
    for layer, entry in enumerate(out["layers"]):
        for head in entry:
            if layer in layers or (layer, int(head)) in dense:
                entry[head] = {"pattern": "dense"}
    out["speed_fallback"] = {"heads_kept_dense": len(dense), "layers_kept_dense": sorted(layers),
                             "rule": speed.get("rule")}
    return out
