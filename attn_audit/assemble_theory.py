"""The theory blocks of the head records (numpy only, no torch): the Gaussian-predicted k
(plain, sink-aware, finite-n Monte Carlo) against the measured k of sampled rows, the R
variants from the projection weights, the n^C fit over lengths, and the model-wide theory
summary. Used by :mod:`attn_audit.assemble`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attn_audit.config import AuditConfig
from attn_audit.result import AuditResult, finite_or_none

_THEORY_ROWS = 128  # sampled rows per head that the Monte Carlo prediction uses
_PREDICTION_NOTE = ("k_pred: plain large-n formula n*Phi_c(sigma + Phi^-1(eps)); k_pred_finite_n: Monte Carlo at "
                    "finite n (log ratios use it); k_pred_sink_aware: sinks and local window kept whole, an "
                    "upper bound up to the Gaussian approximation (theory.md §5.3); sigma = std of the bulk logits")


def theory_block(features: np.ndarray, names: list[str], eps_keys: list[str], seed: int,
                 sinks: int = 1, window: int = 64) -> dict[str, Any]:
    """Predicted vs measured k_eps over the sampled rows of one head.

    Args:
        features: (rows, F) row features (see ``Accumulator.summary()['row_feature_names']``).
    """
    from attn_audit.finite_n import k_pred_finite_n
    from attn_audit.predict import k_pred_plain, k_pred_sink_aware, large_sigma_regime
    from attn_audit.rank_correlation import average_ranks

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
    if len(sigma) > _THEORY_ROWS:  # the Monte Carlo prediction needs no more rows than this
        keep = np.sort(np.random.default_rng(seed).choice(len(sigma), _THEORY_ROWS, replace=False))
        features = features[ok][keep]
        sigma, n = sigma[keep], n[keep]
        ok = np.ones(len(sigma), dtype=bool)
        out["rows"] = int(len(sigma))
    out["sigma_median"] = float(np.median(sigma))
    out["large_sigma_share"] = float(np.mean(large_sigma_regime(sigma, n)))
    rng = np.random.default_rng(seed)
    # The finite-n Monte Carlo runs on n rounded to 4 steps per octave and rescaled
    # (kappa = k/n varies slowly in n), so a head costs a few distinct n, not hundreds, and
    # one call serves every eps (the same simulated rows are reused).
    step = np.maximum(1.0, 2.0 ** (np.floor(np.log2(n)) - 2))
    n_grid = np.maximum(2.0, np.round(n / step) * step)
    eps_arr = np.array([float(e) for e in eps_keys])
    k_grid_all = np.asarray(k_pred_finite_n(n_grid[:, None], sigma[:, None], eps_arr[None, :], rng=rng,
                                            sigma_step=0.02), dtype=float)
    for e_idx, e_key in enumerate(eps_keys):
        eps = float(e_key)
        k_meas = features[ok, col[f"k_eps@{eps}"]]
        k_hat = np.maximum(k_pred_plain(n, sigma, eps), 1.0)
        k_fin = np.maximum(np.minimum(k_grid_all[:, e_idx] * n / n_grid, n), 1.0)
        # sink- and local-aware: keep S and L whole, the bulk may lose eps / m_B of its own mass
        n_sl = np.minimum(n, sinks + window)
        m_b = features[ok, col["bulk_mass"]]
        k_sink = np.asarray(k_pred_sink_aware(n - n_sl, n_sl, sigma, m_b, eps), dtype=float)
        out.setdefault("k_pred_sink_aware", {})[e_key] = float(np.nanmean(k_sink))
        out.setdefault("sink_aware_covers_share", {})[e_key] = float(np.mean(k_meas <= np.ceil(k_sink) + 1e-9))
        ratio = np.log(np.maximum(k_meas, 1.0) / k_fin)
        out["k_pred"][e_key] = float(np.mean(k_hat))
        out["k_pred_finite_n"][e_key] = float(np.mean(k_fin))
        out["k_measured_mean"][e_key] = float(np.mean(k_meas))
        out["log_ratio_median"][e_key] = float(np.median(ratio))
        q75, q25 = np.percentile(ratio, [75, 25])
        out["log_ratio_iqr"][e_key] = float(q75 - q25)
        if np.ptp(k_meas) > 0 and np.ptp(k_fin) > 0:
            # scipy.stats.spearmanr(k_meas, k_fin).statistic, by its own steps (average ranks,
            # then np.corrcoef of the (rows, 2) ranks) without importing scipy.stats
            ranked = np.column_stack((average_ranks(k_meas), average_ranks(k_fin)))
            out["spearman"][e_key] = float(np.corrcoef(ranked, rowvar=False)[1, 0])
    out["prediction"] = _PREDICTION_NOTE
    return out


def theory_blocks(features: list[np.ndarray], names: list[str], eps_keys: list[str], seed: int,
                  sinks: int = 1, window: int = 64) -> list[dict[str, Any]]:
    """:func:`theory_block` of many heads at once; the same blocks, bit for bit.

    All heads share one finite-n Monte Carlo call (its grid cells are common to them), and the
    per-head statistics run on stacked ``(heads, rows)`` arrays, one stack per row count. Every
    reduction still runs along one head's rows, as the per-head code does.

    Args:
        features: per head, the (rows, F) row features (see ``theory_block``).

    Returns:
        One block per head, in order.
    """
    from attn_audit.finite_n import k_pred_finite_n
    from attn_audit.predict import k_pred_plain, k_pred_sink_aware, large_sigma_regime
    from attn_audit.rank_correlation import average_ranks

    col = {n: i for i, n in enumerate(names)}
    blocks: list[dict[str, Any]] = []
    by_rows: dict[int, list[tuple[int, np.ndarray]]] = {}  # row count -> (head index, kept rows)
    for i, feats in enumerate(features):
        sigma = feats[:, col["bulk_std"]]
        ok = (feats[:, col["valid"]] > 0) & np.isfinite(sigma) & (feats[:, col["n_keys"]] >= 2)
        out: dict[str, Any] = {"rows": int(ok.sum()), "k_pred": {}, "k_pred_finite_n": {}, "k_measured_mean": {},
                               "log_ratio_median": {}, "log_ratio_iqr": {}, "spearman": {}}
        blocks.append(out)
        if ok.sum() < 8:
            out["skipped_reason"] = "fewer than 8 sampled rows with a bulk of keys"
            continue
        kept = feats[ok]
        if len(kept) > _THEORY_ROWS:
            kept = kept[np.sort(np.random.default_rng(seed).choice(len(kept), _THEORY_ROWS, replace=False))]
            out["rows"] = int(len(kept))
        by_rows.setdefault(len(kept), []).append((i, kept))
    if not by_rows:
        return blocks
    stacks = [([i for i, _ in group], np.stack([k for _, k in group])) for group in by_rows.values()]
    n_grids = []
    for _, st in stacks:  # (heads, rows, F); n rounded as in theory_block
        step = np.maximum(1.0, 2.0 ** (np.floor(np.log2(st[:, :, col["n_keys"]])) - 2))
        n_grids.append(np.maximum(2.0, np.round(st[:, :, col["n_keys"]] / step) * step))
    eps_arr = np.array([float(e) for e in eps_keys])
    mc_seed = int(np.random.default_rng(seed).integers(2**31))  # what theory_block's generator yields
    n_all = np.concatenate([g.ravel() for g in n_grids])
    sigma_all = np.concatenate([st[:, :, col["bulk_std"]].ravel() for _, st in stacks])
    k_grid = np.asarray(k_pred_finite_n(n_all[:, None], sigma_all[:, None], eps_arr[None, :], rng=mc_seed,
                                        sigma_step=0.02), dtype=float)
    start = 0
    for (ids, st), n_grid in zip(stacks, n_grids, strict=True):
        # contiguous (heads, rows) copies: each row of a reduction is then laid out like theory_block's 1-d arrays
        sigma = np.ascontiguousarray(st[:, :, col["bulk_std"]])
        n = np.ascontiguousarray(st[:, :, col["n_keys"]])
        m_b = np.ascontiguousarray(st[:, :, col["bulk_mass"]])
        k_grid_all = k_grid[start:start + n.size].reshape(*n.shape, eps_arr.size)
        start += n.size
        stat: dict[str, np.ndarray] = {"sigma_median": np.median(sigma, axis=1),
                                       "large_sigma_share": np.mean(large_sigma_regime(sigma, n), axis=1)}
        for e_idx, e_key in enumerate(eps_keys):
            eps = float(e_key)
            k_meas = np.ascontiguousarray(st[:, :, col[f"k_eps@{eps}"]])
            k_hat = np.maximum(k_pred_plain(n, sigma, eps), 1.0)
            k_fin = np.maximum(np.minimum(k_grid_all[:, :, e_idx] * n / n_grid, n), 1.0)
            n_sl = np.minimum(n, sinks + window)
            k_sink = np.asarray(k_pred_sink_aware(n - n_sl, n_sl, sigma, m_b, eps), dtype=float)
            ratio = np.log(np.maximum(k_meas, 1.0) / k_fin)
            q75, q25 = np.percentile(ratio, [75, 25], axis=1)
            stat[f"sink {e_key}"] = np.nanmean(k_sink, axis=1)
            stat[f"covers {e_key}"] = np.mean(k_meas <= np.ceil(k_sink) + 1e-9, axis=1)
            stat[f"k_pred {e_key}"] = np.mean(k_hat, axis=1)
            stat[f"k_fin {e_key}"] = np.mean(k_fin, axis=1)
            stat[f"k_meas {e_key}"] = np.mean(k_meas, axis=1)
            stat[f"median {e_key}"] = np.median(ratio, axis=1)
            stat[f"iqr {e_key}"] = q75 - q25
            rho = np.full(len(ids), np.nan)
            has = (np.ptp(k_meas, axis=1) > 0) & (np.ptp(k_fin, axis=1) > 0)
            if has.any():
                # scipy.stats.spearmanr's own steps (average ranks, then np.corrcoef of the (rows, 2) ranks)
                ranked = np.empty((int(has.sum()), n.shape[1], 2))
                ranked[:, :, 0] = average_ranks(k_meas[has])  # = scipy.stats.rankdata(axis=1)
                ranked[:, :, 1] = average_ranks(k_fin[has])
                rho[has] = [np.corrcoef(r, rowvar=False)[1, 0] for r in ranked]
            stat[f"rho {e_key}"] = rho
            stat[f"has_rho {e_key}"] = has
        for j, i in enumerate(ids):
            out = blocks[i]
            out["sigma_median"] = float(stat["sigma_median"][j])
            out["large_sigma_share"] = float(stat["large_sigma_share"][j])
            for e_key in eps_keys:
                out.setdefault("k_pred_sink_aware", {})[e_key] = float(stat[f"sink {e_key}"][j])
                out.setdefault("sink_aware_covers_share", {})[e_key] = float(stat[f"covers {e_key}"][j])
                out["k_pred"][e_key] = float(stat[f"k_pred {e_key}"][j])
                out["k_pred_finite_n"][e_key] = float(stat[f"k_fin {e_key}"][j])
                out["k_measured_mean"][e_key] = float(stat[f"k_meas {e_key}"][j])
                out["log_ratio_median"][e_key] = float(stat[f"median {e_key}"][j])
                out["log_ratio_iqr"][e_key] = float(stat[f"iqr {e_key}"][j])
                if stat[f"has_rho {e_key}"][j]:
                    out["spearman"][e_key] = float(stat[f"rho {e_key}"][j])
            out["prediction"] = _PREDICTION_NOTE
    return blocks


def theory_summary(heads: list[dict[str, Any]], config: AuditConfig) -> dict[str, Any]:
    """Does sparsity grow with R? Spearman correlations across heads, with bootstrap intervals.

    A negative correlation between R (or the row spread sigma) and k_eps/n is the theory's
    "sparser as R grows" (theory.md §5.1). Model-wide and per layer.
    """
    from attn_audit.rank_correlation import spearman_with_ci

    key = AuditResult(data={"run": {"eps_keys": list(config.eps_keys)}}).primary_eps_key
    out: dict[str, Any] = {"eps_key": key, "note": "Spearman rho with a 95% bootstrap interval over heads"}

    def pairs(xname: str, recs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for r in recs:
            x = (r.get("theory", {}).get("sigma_median") if xname == "sigma_median"
                 else r.get("R", {}).get(xname))
            y = r["sparsity"][key].get("kfrac_mean")
            if x is not None and y is not None and np.isfinite(x) and np.isfinite(y):
                xs.append(x)
                ys.append(y)
        return np.array(xs), np.array(ys)

    for xname in ("logit_range", "R_F", "qk_bound", "sigma_median"):
        x, y = pairs(xname, heads)
        if len(x) >= 5 and np.ptp(x) > 0 and np.ptp(y) > 0:
            rho, lo, hi = spearman_with_ci(x, y, seed=config.seed)
            out[f"spearman_{xname}_kfrac"] = [finite_or_none(rho), finite_or_none(lo), finite_or_none(hi)]
            per_layer = {}
            for layer in sorted({r["layer"] for r in heads}):
                xl, yl = pairs(xname, [r for r in heads if r["layer"] == layer])
                if len(xl) >= 5 and np.ptp(xl) > 0 and np.ptp(yl) > 0:
                    per_layer[str(layer)] = [finite_or_none(v) for v in spearman_with_ci(xl, yl, n_boot=200, seed=config.seed)]
            out[f"spearman_{xname}_kfrac_by_layer"] = per_layer
    if "spearman_logit_range_kfrac" in out:
        out["spearman_R_kfrac"] = out["spearman_logit_range_kfrac"]
    ratios = [r["theory"]["log_ratio_median"].get(key) for r in heads if r.get("theory", {}).get("log_ratio_median")]
    ratios = [v for v in ratios if v is not None]
    if ratios:
        out["log_ratio_median_over_heads"] = float(np.median(ratios))
    return out


def add_weight_bounds(heads: list[dict[str, Any]], s: dict[str, Any],
                       weights: list[tuple[np.ndarray, np.ndarray]], info: dict[str, Any]) -> None:
    """R_F and R_op from the projection weights and the attention-input norm bound B (one call per layer)."""
    from attn_audit.norm_bound import r_variants_heads

    d = info["head_dim"]
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for rec in heads:
        l = rec["layer"]
        if l >= len(weights) or not np.isfinite(s["x_norm_max"][l]) or s["x_norm_max"][l] <= 0:
            continue
        by_layer.setdefault(l, []).append(rec)
    for l, recs in by_layer.items():
        wq, wk = weights[l]
        todo = []
        for rec in recs:
            h, g = rec["head"], rec["kv_head"]
            if not (np.isfinite(wq[h * d:(h + 1) * d]).all() and np.isfinite(wk[g * d:(g + 1) * d]).all()):
                rec["R"]["note"] = "weight-based R left out: the projection weights hold NaN or inf"
                continue
            todo.append(rec)
        if not todo:
            continue
        kv_heads = sorted({rec["kv_head"] for rec in todo})
        b_p999 = s["x_norm_p999"][l]
        b_max = float(s["x_norm_max"][l])
        rvs = r_variants_heads(np.stack([wq[r["head"] * d:(r["head"] + 1) * d] for r in todo]),
                               np.stack([wk[g * d:(g + 1) * d] for g in kv_heads]),
                               [kv_heads.index(r["kv_head"]) for r in todo], float(s["scale"][l]),
                               b_max, float(b_p999) if np.isfinite(b_p999) else b_max)
        for rec, rv in zip(todo, rvs, strict=True):
            rec["R"].update({
                "W_fro": rv.w_fro, "W_op": rv.w_op, "R_F": rv.r_f_max, "R_F_p999": rv.r_f_p999,
                "R_op": rv.r_op_max, "R_op_p999": rv.r_op_p999, "B_max": b_max,
                "B_p999": float(b_p999) if np.isfinite(b_p999) else None,
            })
            r_f = rv.r_f_max
            if r_f and rec["R"].get("logit_range"):
                rec["R"]["emp_over_R_F"] = rec["R"]["logit_range"] / r_f
            rec["R"]["note"] = "R_F = scale*B^2*||W_Q^h W_K^g^T||_F (theory.md §3, v2's form with the model's scale); W from pre-RoPE projections"


def add_theory(heads: list[dict[str, Any]], s: dict[str, Any], config: AuditConfig, group: int) -> None:
    """Each head's ``theory`` block, from the row-feature reservoir of its layer."""
    todo = [(rec, s["row_features"].get(rec["layer"])) for rec in heads]
    todo = [(rec, feats[:, rec["head"], :]) for rec, feats in todo if feats is not None]
    blocks = theory_blocks([f for _, f in todo], s["row_feature_names"], list(config.eps_keys), config.seed,
                           config.sinks, config.window)
    for (rec, _), block in zip(todo, blocks, strict=True):
        rec["theory"] = block


def add_scaling(heads: list[dict[str, Any]], summaries: dict[int, dict[str, Any]], config: AuditConfig) -> None:
    """Each head's ``scaling`` block: the n^C fit of mean k_eps over the audited lengths."""
    from attn_audit.scaling import fit_scaling

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
            fit = fit_scaling(lengths, np.stack(per_seq, axis=1), seed=config.seed)
            fit["C_ci"] = [fit.get("C_lo"), fit.get("C_hi")]
            scaling[key] = fit
        primary = scaling.get(AuditResult(data={"run": {"eps_keys": list(config.eps_keys)}}).primary_eps_key, {})
        rec["scaling"] = {**{k: primary.get(k) for k in ("C", "C_ci", "alpha", "local_slopes")},
                          "by_eps": scaling, "method": "OLS of log mean k_eps on log n over lengths, bootstrap over sequences"}
