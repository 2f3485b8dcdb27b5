"""The Gaussianity block of every head record (numpy only, no torch): the Q/K reservoir samples
and row logits of each site go through :mod:`attn_audit.stats.assess` in batches on a thread pool,
then Benjamini-Hochberg runs per site and test over all heads. Used by :mod:`attn_audit.assemble.records`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attn_audit.config import AuditConfig
from attn_audit.result import finite_or_none

# Per-coordinate arrays are summarised, not stored: keep lists up to this length (QQ points pass).
_MAX_LIST = 128


def _compact(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out[key] = _compact(value)
        elif isinstance(value, (list, tuple)) and len(value) > _MAX_LIST:
            continue
        else:
            out[key] = value
    return out


def gaussianity_blocks(samples: list[np.ndarray], seed: int) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """Gaussianity summaries of several (n_i, d_i) or (n_i,) samples, with their raw
    per-coordinate p-values. A summary keeps the scalar effect sizes, the verdict and 50
    Mahalanobis QQ points; the per-coordinate arrays stay out of audit.json (they would dominate
    its size).

    Samples with the same number of finite rows share one vectorized pass of the per-coordinate
    statistics (:func:`attn_audit.stats.assess.assess_gaussianity_batch`).
    """
    from dataclasses import fields

    from attn_audit.stats import assess_gaussianity_batch, to_plain

    kept = [x if np.isfinite(x).all() else x[np.isfinite(x).all(axis=1)] if x.ndim == 2 else x[np.isfinite(x)]
            for x in samples]
    out: list[tuple[dict[str, Any], dict[str, np.ndarray]]] = [
        ({"verdict": "not-assessed", "is_gaussian": None, "n": int(x.shape[0]),
          "skipped_reason": "fewer than 32 finite samples"}, {}) for x in kept]
    todo = [i for i, x in enumerate(kept) if x.shape[0] >= 32]
    results = assess_gaussianity_batch([kept[i].astype(np.float64) for i in todo], seed=seed)
    skip = ("pvalues", "pvalues_bh", "cov_eigenvalues", "thresholds")
    names = [f.name for f in fields(results[0])] if results else []
    for i, res in zip(todo, results, strict=True):
        block = {name: to_plain(getattr(res, name)) for name in names
                 if not name.startswith("coord_") and name not in skip}
        block["n"] = int(kept[i].shape[0])
        raw = {t: np.asarray(p, dtype=float) for t, p in res.pvalues.items()}
        block["p_min_bh_head"] = {t: finite_or_none(np.nanmin(p)) if np.size(p) and np.isfinite(p).any() else None
                                  for t, p in res.pvalues_bh.items()}
        out[i] = (_compact(block), raw)
    return out


# result site name -> (summary key, indexed by query head?)
SITES = {
    "q": ("samples_q", True),
    "k": ("samples_k", False),
    "q_pre_rope": ("samples_q_pre", True),
    "k_pre_rope": ("samples_k_pre", False),
}


def add_gaussianity(heads: list[dict[str, Any]], s: dict[str, Any], config: AuditConfig, group: int) -> None:
    """Assess every site; a K site is shared by the query heads of its KV group (computed once).

    Benjamini-Hochberg runs per site and test jointly over all coordinates of all heads; each
    head records the smallest jointly adjusted p-value and how many coordinates reject at 0.05.
    """
    from attn_audit.stats import bh_adjust_joint

    # Which samples are needed, in head order; then one batched assessment per (site, layer)
    # (all row-logit samples together), which vectorizes the per-coordinate statistics.
    wanted: dict[tuple[str, int, int], np.ndarray] = {}
    for rec in heads:
        l, h, g = rec["layer"], rec["head"], rec["kv_head"]
        for site, (key, per_query) in SITES.items():
            samples = s.get(key, {})
            if l in samples:
                idx = h if per_query else g
                wanted.setdefault((site, l, idx), samples[l][:, idx, :])
        logits = s.get("row_logits", {}).get(l)
        if logits is not None:
            vals = logits[h]
            wanted.setdefault(("logits", l, h), vals[np.isfinite(vals)][:, None])
    batches: dict[tuple[str, int], list[tuple[str, int, int]]] = {}
    for key in wanted:
        batches.setdefault((key[0], -1 if key[0] == "logits" else key[1]), []).append(key)
    computed: dict[tuple[str, int, int], tuple[dict[str, Any], dict[str, np.ndarray]]] = {}
    # numpy releases the GIL in the heavy loops: the batches run on every core the process has
    # (each batch is seeded on its own, so the results do not depend on the scheduling)
    from concurrent.futures import ThreadPoolExecutor

    def run(keys: list[tuple[str, int, int]]) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
        return gaussianity_blocks([wanted[k] for k in keys], config.seed)

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        for keys, blocks in zip(batches.values(), pool.map(run, batches.values()), strict=True):
            computed.update(zip(keys, blocks, strict=True))
    cache = {key: computed[key] for key in wanted}  # head order, as the joint BH families below
    for rec in heads:
        l, h, g = rec["layer"], rec["head"], rec["kv_head"]
        block: dict[str, Any] = {}
        for site, (_, per_query) in SITES.items():
            key = (site, l, h if per_query else g)
            if key in cache:
                block[site] = cache[key][0]
        if ("logits", l, h) in cache:
            block["row_logits"] = cache[("logits", l, h)][0]
        rec["gaussianity"] = block
    by_site: dict[tuple[str, str], list[tuple[tuple[str, int, int], np.ndarray]]] = {}
    for key, (_, raw) in cache.items():
        for test, p in raw.items():
            by_site.setdefault((key[0], test), []).append((key, p))
    for (site, test), items in by_site.items():
        adjusted = bh_adjust_joint([p for _, p in items])
        for (key, _), adj in zip(items, adjusted):
            blk = cache[key][0]
            finite = adj[np.isfinite(adj)]
            blk.setdefault("p_min_bh_joint", {})[test] = finite_or_none(finite.min()) if finite.size else None
            blk.setdefault("rejections_bh_joint_005", {})[test] = int((finite < 0.05).sum())
    for rec in heads:
        for site, blk in rec["gaussianity"].items():
            blk.setdefault("bh_family", "per site and test, all coordinates of all heads")


def _workers() -> int:
    """Threads for the statistics: the cores this process may use (at most 8)."""
    import os

    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        return max(1, min(8, os.cpu_count() or 1))
