"""Kernel patterns: their cost in whole blocks, and the cheapest pattern a head can run (stdlib only).

A block kernel computes whole ``block × block`` tiles of ``QKᵀ`` and ``PV`` (``4·d`` FLOPs per
(query, key) pair, as in :mod:`attn_audit.rank.flops`), the partial last block counted whole.
Per query block ``qb`` (``nb = ceil(N / block)`` blocks, ``qb + 1`` of them allowed under a causal
mask, all ``nb`` otherwise) a pattern at level ``b`` computes:

- ``dense``: every allowed tile;
- ``block-topk`` / ``block-oracle``: ``min(b, allowed)`` tiles;
- ``streaming``: the window's ``min(b, allowed)`` tiles (non-causal ``2b − 1``) plus the sink
  tile when the window does not reach block 0;
- ``vertical-slash``: ``b·block`` columns and ``b·block`` diagonals, i.e. ``min(2b, allowed)``
  tiles' worth per query block (MInference gathers the columns into dense tiles).

Estimation costs (dynamic patterns, FLOPs per head and sequence): ``block-topk`` pools Q and K
(``2·N·d``) and scores the pooled blocks (``2·d`` per pair of blocks allowed);
``vertical-slash`` scores the last ``min(64, N)`` queries against all keys (``2·d·64·N``).

:func:`kernel_choice` picks, for one head record with ``patterns`` (see
:mod:`attn_audit.assemble.patterns`), the cheapest kernel pattern whose measured p90 level meets
eps, or ``dense``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

KERNEL_PATTERNS = ("streaming", "block-topk", "vertical-slash")
DYNAMIC = ("block-topk", "vertical-slash")  # chosen from the input, at a cost
VS_LAST_Q = 64


def num_blocks(n: int, block: int) -> int:
    """Blocks of ``block`` positions covering ``n``."""
    return -(-n // block)


def tiles(n: int, block: int, causal: bool, pattern: str, level: int, sinks: int = 1,
          window: int | None = None) -> int:
    """Tiles a block kernel computes for one head over one sequence of ``n`` tokens; a causal
    sliding ``window`` (local layers) allows a query block only the tiles its window touches."""
    nb = num_blocks(n, block)
    reach = num_blocks(window, block) + 1 if causal and window else None
    total = 0
    for qb in range(nb):
        avail = (qb + 1 if reach is None else min(qb + 1, reach)) if causal else nb
        if pattern == "dense":
            t = avail
        elif pattern in ("block-topk", "block-oracle"):
            t = min(level, avail)
        elif pattern == "streaming":
            win = min(level, avail) if causal else (min(2 * level - 1, nb) if level else 0)
            t = min(avail, win + (1 if sinks > 0 and qb >= level else 0))
        elif pattern == "vertical-slash":
            t = min(avail, 2 * level)
        else:
            raise ValueError(f"unknown pattern {pattern!r}")
        total += t
    return total


def pattern_flops(n: int, block: int, head_dim: int, causal: bool, pattern: str, level: int,
                  sinks: int = 1, window: int | None = None) -> int:
    """QKᵀ + PV FLOPs of one head at ``n`` tokens, whole tiles: ``4·d·block²·tiles``."""
    return 4 * head_dim * block * block * tiles(n, block, causal, pattern, level, sinks, window)


def estimate_flops(n: int, block: int, head_dim: int, causal: bool, pattern: str) -> int:
    """FLOPs a dynamic pattern spends choosing its blocks (0 for static ones)."""
    if pattern == "block-topk":
        nb = num_blocks(n, block)
        pairs = nb * (nb + 1) // 2 if causal else nb * nb
        return 2 * n * head_dim + 2 * head_dim * pairs
    if pattern == "vertical-slash":
        return 2 * head_dim * min(VS_LAST_Q, n) * n
    return 0


def level_at(hist: list[int], q: float = 0.9) -> int | None:
    """The smallest level whose cumulative row count reaches the fraction ``q`` (None: no rows)."""
    total = sum(hist)
    if total <= 0:
        return None
    need = q * total
    acc = 0
    for level, c in enumerate(hist):
        acc += c
        if acc >= need - 1e-9:
            return level
    return len(hist) - 1


def scaled_level(level: int, audited: int, target: int, block: int) -> int:
    """A level measured at ``audited`` tokens taken to ``target`` tokens.

    Every pattern keeps the same fraction of the blocks, rounded up: conservative when the need
    grows sub-linearly with the length (a streaming window that does not grow is then
    over-provisioned; audit the target length to measure it).
    """
    if target == audited:
        return level
    return min(num_blocks(target, block), math.ceil(level * num_blocks(target, block)
                                                     / max(num_blocks(audited, block), 1) - 1e-9))


def kernel_choice(rec: Mapping[str, Any], eps_key: str, target: int, head_dim: int, causal: bool,
                  sinks: int) -> dict[str, Any] | None:
    """The cheapest kernel pattern meeting ``eps_key`` for 90% of rows at ``target`` tokens.

    Returns ``{"pattern", "level", "block_size", budgets..., "flops_saving", "estimate_flops",
    "candidates"}`` or None when the head has no ``patterns`` block. ``pattern`` is ``dense`` when
    no pattern is cheaper than dense attention in whole tiles.
    """
    pats = rec.get("patterns")
    if not isinstance(pats, Mapping) or not pats.get("block_size"):
        return None
    block = int(pats["block_size"])
    audited = int(pats["seq_len"])
    window = rec.get("sliding_window") if isinstance(rec.get("sliding_window"), int) else None
    dense = pattern_flops(target, block, head_dim, causal, "dense", 0, window=window)
    candidates = {}
    for name in KERNEL_PATTERNS:
        block_rec = (pats.get("by_pattern") or {}).get(name)
        if not isinstance(block_rec, Mapping):
            continue
        at = (block_rec.get("by_eps") or {}).get(eps_key)
        if not isinstance(at, Mapping) or at.get("level_p90") is None:
            continue
        level = scaled_level(int(at["level_p90"]), audited, target, block)
        flops = pattern_flops(target, block, head_dim, causal, name, level, sinks, window)
        est = estimate_flops(target, block, head_dim, causal, name)
        candidates[name] = {"level": level, "flops": flops, "estimate_flops": est,
                            "flops_saving": 1.0 - (flops + est) / dense if dense else 0.0}
    best = "dense"
    best_cost = dense
    for name, c in candidates.items():  # KERNEL_PATTERNS order breaks ties (static first)
        if c["flops"] + c["estimate_flops"] < best_cost:
            best, best_cost = name, c["flops"] + c["estimate_flops"]
    out: dict[str, Any] = {"pattern": best, "block_size": block, "target_len": target,
                           "flops_saving": 1.0 - best_cost / dense if dense else 0.0,
                           "candidates": candidates}
    if best != "dense":
        out.update(budget_fields(best, candidates[best]["level"], block, sinks))
        out["estimate_flops"] = candidates[best]["estimate_flops"]
    return out


def budget_fields(pattern: str, level: int, block: int, sinks: int) -> dict[str, Any]:
    """The budget fields of a pattern at ``level`` (as ``flex_plan.json`` and ``plan[]`` carry them)."""
    if pattern == "streaming":
        return {"sink_blocks": 1 if sinks > 0 else 0, "window_blocks": level}
    if pattern == "block-topk":
        return {"blocks": level}
    if pattern == "vertical-slash":
        return {"vertical_size": level * block, "slash_size": level * block}
    return {}


def _head_dim(rec: Mapping[str, Any], default: int) -> int:
    """The head's own d_qk where the head size varies per layer (``heads[].head_dim``), else ``default``."""
    d = rec.get("head_dim")
    return int(d) if isinstance(d, int) and d > 0 else default


def add_kernel_plan(result: Any, config: Any = None) -> None:
    """Fill ``result.data["kernel_plan"]`` (one entry per head, best kernel saving first) and
    ``kernel_plan_summary`` (kernel saving beside the oracle top-k saving, heads per pattern), and
    add ``kernel_pattern``, ``block_size``, ``kernel_flops_saving`` and the budget fields to the
    ``plan[]`` entries. Nothing is added when the audit has no ``heads[].patterns``."""
    from attn_audit.rank.settings import PlanConfig, _context

    ctx = _context(result, config or PlanConfig())
    entries = []
    for rec in result.heads:
        choice = kernel_choice(rec, ctx.eps_key, ctx.target, _head_dim(rec, ctx.head_dim), ctx.causal, ctx.sinks)
        if choice is None:
            return
        entry = {"layer": rec["layer"], "head": rec["head"], "kv_head": rec.get("kv_head"), **choice}
        entry["why"] = _why(choice, ctx.eps_key)
        entries.append(entry)
    entries.sort(key=lambda e: (-e["flops_saving"], e["layer"], e["head"]))
    total = len(entries)
    saving = sum(e["flops_saving"] for e in entries) / total if total else 0.0
    windows = {(r["layer"], r["head"]): r.get("sliding_window") for r in result.heads}
    dims = {(r["layer"], r["head"]): _head_dim(r, ctx.head_dim) for r in result.heads}
    if any(isinstance(w, int) for w in windows.values()) or len(set(dims.values())) > 1:
        # local layers (or smaller heads) cost less: weight by dense tiles
        dense = {key: pattern_flops(ctx.target, e["block_size"], dims[key], ctx.causal, "dense", 0,
                                    window=windows[key])
                 for key, e in ((( e["layer"], e["head"]), e) for e in entries)}
        total_dense = sum(dense.values())
        saving = (sum(e["flops_saving"] * dense[(e["layer"], e["head"])] for e in entries) / total_dense
                  if total_dense else 0.0)
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["pattern"]] = counts.get(e["pattern"], 0) + 1
    oracle = (result.data.get("plan_summary") or {}).get("planned_flops_saving")
    result.data["kernel_plan"] = entries
    result.data["kernel_plan_summary"] = {
        "target_len": ctx.target, "eps_key": ctx.eps_key, "block_size": entries[0]["block_size"] if entries else None,
        "heads_total": total, "heads_by_pattern": counts, "kernel_flops_saving": saving,
        "oracle_flops_saving": oracle,
        "text": (f"Running each head's cheapest kernel pattern at {ctx.target} tokens (eps={ctx.eps_key}, "
                 f"whole tiles, estimation included) saves {saving:.1%} of the attention FLOPs; the "
                 f"per-row top-k oracle bound is {oracle:.1%}." if oracle is not None else ""),
    }
    by_head = {(e["layer"], e["head"]): e for e in entries}
    for p in result.data.get("plan") or []:
        e = by_head.get((p["layer"], p["head"]))
        if e is not None:
            p["kernel_pattern"] = e["pattern"]
            p["block_size"] = e["block_size"]
            p["kernel_flops_saving"] = e["flops_saving"]
            p.update({k: e[k] for k in ("sink_blocks", "window_blocks", "blocks", "vertical_size", "slash_size")
                      if k in e})


def _why(choice: Mapping[str, Any], eps_key: str) -> str:
    c = choice["candidates"]
    if choice["pattern"] == "dense":
        if not c:
            return "no pattern measured"
        return f"no pattern keeps 1-{eps_key} below dense tiles"
    best = c[choice["pattern"]]
    return f"1-{eps_key} in 90% of rows at {1 - best['flops_saving']:.0%} of dense tiles"


def measured_level(rec: Mapping[str, Any], pattern: str, eps_key: str, target: int) -> tuple[int, float | None] | None:
    """(level at ``target``, mean kept mass at the audited level) of ``pattern`` for a head with
    ``patterns``; None when the pattern was not measured."""
    pats = rec.get("patterns")
    if not isinstance(pats, Mapping):
        return None
    entry = (pats.get("by_pattern") or {}).get(pattern)
    if not isinstance(entry, Mapping):
        return None
    at = (entry.get("by_eps") or {}).get(eps_key) or {}
    if at.get("level_p90") is None:
        return None
    level = int(at["level_p90"])
    return scaled_level(level, int(pats["seq_len"]), target, int(pats["block_size"])), at.get("kept_mass_at_p90")


def kept_mass_at(rec: Mapping[str, Any], pattern: str, level: int) -> float | None:
    """Mean kept mass of ``pattern`` at ``level`` (audited length; capped at the last level)."""
    entry = ((rec.get("patterns") or {}).get("by_pattern") or {}).get(pattern)
    if not isinstance(entry, Mapping) or not entry.get("kept_mass"):
        return None
    curve = entry["kept_mass"]
    return curve[min(level, len(curve) - 1)]
