"""Turn the streamed summaries into the head records of the result (numpy only, no torch).

Per head: sparsity (:mod:`sparsity`), R (logit range and norm bounds), Gaussianity of the Q/K
reservoir samples (:mod:`stats`), the Gaussian-predicted k (:mod:`theory`), then the ranking and
plan (:mod:`rank`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from attn_audit.config import AuditConfig
from attn_audit.result import AuditResult
from attn_audit.sparsity import head_sparsity

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


def gaussianity_block(sample: np.ndarray, seed: int) -> dict[str, Any]:
    """Gaussianity summary of one (n, d_head) sample, or a skip reason when too small."""
    from attn_audit.stats import assess_gaussianity

    sample = sample[np.isfinite(sample).all(axis=1)]
    if sample.shape[0] < 32:
        return {"verdict": "not-assessed", "is_gaussian": None, "n": int(sample.shape[0]),
                "skipped_reason": "fewer than 32 finite tokens in the sample"}
    res = assess_gaussianity(sample.astype(np.float64), seed=seed)
    block = _compact(res.to_dict())
    block["n"] = int(sample.shape[0])
    return block


def theory_block(features: np.ndarray, names: list[str], eps_keys: list[str], seed: int) -> dict[str, Any]:
    """Predicted vs measured k_eps over the sampled rows of one head.

    Args:
        features: (rows, F) row features (see ``Accumulator.summary()['row_feature_names']``).
    """
    from attn_audit import theory

    col = {n: i for i, n in enumerate(names)}
    valid = features[:, col["valid"]] > 0
    sigma = features[:, col["bulk_std"]]
    n = features[:, col["n_keys"]]
    ok = valid & np.isfinite(sigma) & (n >= 2)
    out: dict[str, Any] = {"rows": int(ok.sum()), "k_pred": {}, "k_pred_finite_n": {}, "k_measured_mean": {},
                           "log_ratio_median": {}, "log_ratio_iqr": {}, "spearman": {}}
    if ok.sum() < 8:
        out["skipped_reason"] = "fewer than 8 sampled rows with a bulk of keys"
        return out
    sigma, n = sigma[ok], n[ok]
    out["sigma_median"] = float(np.median(sigma))
    out["large_sigma_share"] = float(np.mean(theory.large_sigma_regime(sigma, n)))
    rng = np.random.default_rng(seed)
    for e_key in eps_keys:
        eps = float(e_key)
        k_meas = features[ok, col[f"k_eps@{eps}"]]
        k_hat = np.maximum(theory.k_pred_plain(n, sigma, eps), 1.0)
        k_fin = np.maximum(np.asarray(theory.k_pred_finite_n(n, sigma, eps, rng=rng), dtype=float), 1.0)
        ratio = np.log(np.maximum(k_meas, 1.0) / k_fin)
        out["k_pred"][e_key] = float(np.mean(k_hat))
        out["k_pred_finite_n"][e_key] = float(np.mean(k_fin))
        out["k_measured_mean"][e_key] = float(np.mean(k_meas))
        out["log_ratio_median"][e_key] = float(np.median(ratio))
        q75, q25 = np.percentile(ratio, [75, 25])
        out["log_ratio_iqr"][e_key] = float(q75 - q25)
        if np.ptp(k_meas) > 0 and np.ptp(k_fin) > 0:
            from scipy.stats import spearmanr

            out["spearman"][e_key] = float(spearmanr(k_meas, k_fin).statistic)
    out["prediction"] = "finite-n Monte Carlo from the bulk row spread (theory.md §5.3); k_pred is the plain large-n formula"
    return out


def assemble(data: dict[str, Any], summaries: dict[int, dict[str, Any]], config: AuditConfig,
             model: Any = None) -> AuditResult:
    """Fill ``heads``, ``ranking`` and ``plan`` of ``data`` from per-length summaries."""
    info = data["model"]
    L, H, Hkv = info["num_layers"], info["num_heads"], info["num_kv_heads"]
    group = H // Hkv
    eps_keys = list(config.eps_keys)
    primary = max(summaries)
    s = summaries[primary]
    per_length = {n: head_sparsity(summ, eps_keys, seed=config.seed) for n, summ in summaries.items()}
    rows = s["seq_rows"].sum(0).astype(float)  # (L, H)
    heads: list[dict[str, Any]] = []
    for l in range(L):
        for h in range(H):
            g = h // group
            r = rows[l, h]

            def mean(x: np.ndarray) -> float | None:
                return float(x / r) if r > 0 else None

            rec: dict[str, Any] = {
                "layer": l,
                "head": h,
                "kv_head": g,
                "sparsity": per_length[primary][(l, h)],
                "tail_mass": {str(b): mean(s["tail"][l, h, i]) for i, b in enumerate(config.budgets)},
                "entropy_mean": mean(s["sums"]["entropy"][l, h]),
                "participation_mean": mean(s["sums"]["participation"][l, h]),
                "sink_mass_mean": mean(s["sums"]["sink_mass"][l, h]),
                "local_mass_mean": mean(s["sums"]["local_mass"][l, h]),
                "bulk_mass_mean": mean(s["sums"]["bulk_mass"][l, h]),
                "nonfinite_rows": int(s["nonfinite_rows"][l, h]),
                "R": {
                    "logit_range": _fin(s["max_abs_score"][l, h]),
                    "qk_bound": _fin(s["scale"][l] * s["max_q_norm"][l, h] * s["max_k_norm"][l, g]),
                    "max_q_norm": _fin(s["max_q_norm"][l, h]),
                    "max_k_norm": _fin(s["max_k_norm"][l, g]),
                    "scale": _fin(s["scale"][l]),
                },
                "flags": [],
                "score": None,
                "rank": None,
            }
            if rec["R"]["logit_range"] and rec["R"]["qk_bound"]:
                rec["R"]["looseness"] = rec["R"]["qk_bound"] / rec["R"]["logit_range"]
            if len(summaries) > 1:
                rec["by_length"] = {str(n): {"sparsity": per_length[n][(l, h)]} for n in sorted(summaries)}
            heads.append(rec)
    data["heads"] = heads
    _add_gaussianity(heads, s, config, group)
    _add_theory(heads, s, config, group)
    if len(summaries) > 1:
        _add_scaling(heads, summaries, config)
    result = AuditResult(data=data)
    data["ranking"] = []
    from attn_audit.rank import PlanConfig, build_plan, rank_heads

    plan_cfg = PlanConfig(target_len=config.target_len)
    rank_heads(result, plan_cfg)
    build_plan(result, plan_cfg)
    return result


def _fin(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _add_gaussianity(heads: list[dict[str, Any]], s: dict[str, Any], config: AuditConfig, group: int) -> None:
    k_cache: dict[tuple[int, int], dict[str, Any]] = {}
    for rec in heads:
        l, h, g = rec["layer"], rec["head"], rec["kv_head"]
        block: dict[str, Any] = {}
        if l in s["samples_q"]:
            block["q"] = gaussianity_block(s["samples_q"][l][:, h, :], config.seed)
        if l in s["samples_k"]:
            if (l, g) not in k_cache:
                k_cache[(l, g)] = gaussianity_block(s["samples_k"][l][:, g, :], config.seed)
            block["k"] = k_cache[(l, g)]
        rec["gaussianity"] = block


def _add_theory(heads: list[dict[str, Any]], s: dict[str, Any], config: AuditConfig, group: int) -> None:
    names = s["row_feature_names"]
    for rec in heads:
        feats = s["row_features"].get(rec["layer"])
        if feats is None:
            continue
        rec["theory"] = theory_block(feats[:, rec["head"], :], names, list(config.eps_keys), config.seed)


def _add_scaling(heads: list[dict[str, Any]], summaries: dict[int, dict[str, Any]], config: AuditConfig) -> None:
    from attn_audit import theory

    lengths = sorted(summaries)
    for rec in heads:
        l, h = rec["layer"], rec["head"]
        scaling: dict[str, Any] = {}
        for e, key in enumerate(config.eps_keys):
            per_seq = []
            for n in lengths:
                sk = summaries[n]["seq_k"][:, l, h, e]
                sr = summaries[n]["seq_rows"][:, l, h]
                with np.errstate(invalid="ignore", divide="ignore"):
                    per_seq.append(np.where(sr > 0, sk / np.maximum(sr, 1), np.nan))
            fit = theory.fit_scaling(lengths, per_seq, seed=config.seed)
            scaling[key] = fit
        primary = scaling.get(AuditResult(data={"run": {"eps_keys": list(config.eps_keys)}}).primary_eps_key, {})
        rec["scaling"] = {**{k: primary.get(k) for k in ("C", "C_ci", "alpha")}, "by_eps": scaling}
