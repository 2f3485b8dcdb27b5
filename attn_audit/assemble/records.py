"""Turn the streamed summaries into the head records of the result (numpy only, no torch).

Per head: sparsity, R (logit range and norm bounds), Gaussianity of the Q/K reservoir samples,
the Gaussian-predicted k. Ranking and planning come after, in :mod:`attn_audit.rank`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attn_audit.assemble.gaussianity import add_gaussianity
from attn_audit.assemble.patterns import add_patterns
from attn_audit.assemble.sparsity import head_sparsity
from attn_audit.assemble.theory import (
    add_scaling,
    add_theory,
    add_weight_bounds,
    theory_summary,
)
from attn_audit.config import AuditConfig
from attn_audit.result import AuditResult, finite_or_none


def assemble(data: dict[str, Any], summaries: dict[int, dict[str, Any]], config: AuditConfig,
             weights: list[tuple[np.ndarray, np.ndarray]] | None = None, clock: Any = None) -> AuditResult:
    """Fill ``heads`` and ``theory_summary`` of ``data`` from per-length summaries.

    Args:
        weights: per layer (W_Q, W_K) as (out, in) numpy arrays, for the weight-based R variants
            (RoPE families with separate projections); None leaves them out.
        clock: a :class:`attn_audit.provenance.StageClock`; the sparsity records and the
            Gaussianity are charged to "statistics", the theory blocks to "theory".
    """
    info = data["model"]
    L, H, Hkv = info["num_layers"], info["num_heads"], info["num_kv_heads"]
    group = H // Hkv
    # per layer (heads, kv heads, d_qk); where they vary only the heads a layer has get a record
    per_layer = [tuple(g) for g in info["layer_heads"]] if info.get("layer_heads") else [(H, Hkv, None)] * L
    eps_keys = list(config.measure.eps_keys)
    primary = config.seq_len
    s = summaries[primary]
    per_length = {n: head_sparsity(summ, eps_keys, seed=config.seed) for n, summ in summaries.items()}
    rows = s["seq_rows"].sum(0).astype(float)  # (L, H)
    heads: list[dict[str, Any]] = []
    for l in range(L):
        heads_l, kv_l, d_l = per_layer[l]
        for h in range(heads_l):
            g = h // (heads_l // kv_l)
            r = rows[l, h]

            def mean(x: np.ndarray) -> float | None:
                return float(x / r) if r > 0 else None

            rec: dict[str, Any] = {
                "layer": l,
                "head": h,
                "kv_head": g,
                "sparsity": per_length[primary][(l, h)],
                "tail_mass": {str(b): mean(s["tail"][l, h, i]) for i, b in enumerate(config.measure.budgets)},
                "entropy_mean": mean(s["sums"]["entropy"][l, h]),
                "participation_mean": mean(s["sums"]["participation"][l, h]),
                "sink_mass_mean": mean(s["sums"]["sink_mass"][l, h]),
                "local_mass_mean": mean(s["sums"]["local_mass"][l, h]),
                "bulk_mass_mean": mean(s["sums"]["bulk_mass"][l, h]),
                "nonfinite_rows": int(s["nonfinite_rows"][l, h]),
                "R": {
                    "logit_range": finite_or_none(s["max_abs_score"][l, h]),
                    "qk_bound": finite_or_none(s["scale"][l] * s["max_q_norm"][l, h] * s["max_k_norm"][l, g]),
                    "max_q_norm": finite_or_none(s["max_q_norm"][l, h]),
                    "max_k_norm": finite_or_none(s["max_k_norm"][l, g]),
                    "scale": finite_or_none(s["scale"][l]),
                },
                "flags": [],
                "score": None,
                "rank": None,
            }
            if rec["R"]["logit_range"] and rec["R"]["qk_bound"]:
                rec["R"]["looseness"] = rec["R"]["qk_bound"] / rec["R"]["logit_range"]
            kinds = info.get("site_kinds")
            if kinds:  # encoder-decoder: which stack and attention this site is, and its causality
                rec["site_kind"] = kinds[l]["kind"]
                rec["stack_layer"] = int(kinds[l]["stack_layer"])
                rec["causal"] = bool((info.get("layer_causal") or [False] * L)[l])
            window = (info.get("layer_windows") or [None] * L)[l]
            if window:  # a local layer: its rows see at most this many keys (the plan's FLOPs)
                rec["sliding_window"] = int(window)
            if d_l is not None:  # heads or head size vary per layer: this head's d_qk (the plan's FLOPs)
                rec["head_dim"] = int(d_l)
            if len(summaries) > 1:
                rec["by_length"] = {str(n): {"sparsity": per_length[n][(l, h)]} for n in sorted(summaries)}
            heads.append(rec)
    data["heads"] = heads
    add_patterns(heads, s, eps_keys, primary, bool(info.get("causal", True)), config.measure.sinks,
                 int(info.get("head_dim") or 0))
    add_gaussianity(heads, s, config, group)
    if clock is not None:
        clock.lap("statistics")
    add_theory(heads, s, config, group)
    if weights is not None:
        add_weight_bounds(heads, s, weights, info)
    if len(summaries) > 1:
        add_scaling(heads, summaries, config)
    data["theory_summary"] = theory_summary(heads, config)
    data["ranking"] = []  # filled by attn_audit.rank; keeps the key's place in audit.json
    if clock is not None:
        clock.lap("theory")
    return AuditResult(data=data)
