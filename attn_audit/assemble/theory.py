"""The theory blocks of the head records (numpy only, no torch): the Gaussian-predicted k
(plain, sink-aware, finite-n Monte Carlo) against the measured k of sampled rows, the R
variants from the projection weights, the n^C fit over lengths, and the model-wide theory
summary. Used by :mod:`attn_audit.assemble.records`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attn_audit.config import AuditConfig, MeasureSpec
from attn_audit.result import finite_or_none

_THEORY_ROWS = 128  # sampled rows per head that the Monte Carlo prediction uses
_PREDICTION_NOTE = ("k_pred: plain large-n formula n*Phi_c(sigma + Phi^-1(eps)); k_pred_finite_n: Monte Carlo at "
                    "finite n (log ratios use it); k_pred_sink_aware: sinks and local window kept whole, an "
                    "upper bound up to the Gaussian approximation (docs/methods.md §5); sigma = std of the bulk logits")


def _bulk_rows(features: np.ndarray, col: dict[str, int]) -> np.ndarray:
    """The (rows,) mask of one head's rows with a bulk of keys: valid, finite bulk std, n_keys >= 2.

    Args:
        features: (rows, F) row features of one head.
    """
    sigma = features[:, col["bulk_std"]]
    return (features[:, col["valid"]] > 0) & np.isfinite(sigma) & (features[:, col["n_keys"]] >= 2)


def _new_block(rows: int) -> dict[str, Any]:
    """An empty theory block for ``rows`` usable rows, marked skipped when there are fewer than 8."""
    out: dict[str, Any] = {"rows": rows, "k_pred": {}, "k_pred_finite_n": {}, "k_measured_mean": {},
                           "log_ratio_median": {}, "log_ratio_iqr": {}, "spearman": {}}
    if rows < 8:
        out["skipped_reason"] = "fewer than 8 sampled rows with a bulk of keys"
    return out


def _subsample(count: int, seed: int) -> np.ndarray | None:
    """Sorted (_THEORY_ROWS,) indices of the rows kept out of ``count``; None when all are kept.

    The Monte Carlo prediction needs no more rows than ``_THEORY_ROWS``.
    """
    if count <= _THEORY_ROWS:
        return None
    return np.sort(np.random.default_rng(seed).choice(count, _THEORY_ROWS, replace=False))


def _round_n(n: np.ndarray) -> np.ndarray:
    """The key counts ``n`` rounded to 4 steps per octave (at least 2), same shape as ``n``.

    The finite-n Monte Carlo runs on this grid and is rescaled to n (kappa = k/n varies slowly
    in n), so a head costs a few distinct n, not hundreds.
    """
    step = np.maximum(1.0, 2.0 ** (np.floor(np.log2(n)) - 2))
    return np.maximum(2.0, np.round(n / step) * step)


def _k_grid(n_grid: np.ndarray, sigma: np.ndarray, eps: tuple[float, ...],
            rng: np.random.Generator | int) -> np.ndarray:
    """Finite-n Monte Carlo k of each row at every eps, shape (rows, len(eps)).

    One call serves every eps (the same simulated rows are reused).

    Args:
        n_grid: (rows,) key counts rounded by :func:`_round_n`.
        sigma: (rows,) bulk logit stds.
        rng: the Monte Carlo generator or its seed.
    """
    from attn_audit.theory.finite_n import k_pred_finite_n

    eps_arr = np.array(eps)
    return np.asarray(k_pred_finite_n(n_grid[:, None], sigma[:, None], eps_arr[None, :], rng=rng,
                                      sigma_step=0.02, persist=True), dtype=float)


def _predictions(n: np.ndarray, n_grid: np.ndarray, sigma: np.ndarray, m_b: np.ndarray, k_grid_e: np.ndarray,
                 eps: float, sinks: int, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plain, finite-n and sink-aware predicted k at one eps: (k_hat, k_fin, k_sink).

    All arrays share one shape, (rows,) for one head or (heads, rows) for a stack of heads;
    ``k_grid_e`` is the Monte Carlo k on ``n_grid`` at this eps, rescaled here to ``n``.
    """
    from attn_audit.theory.predict import k_pred_plain, k_pred_sink_aware

    k_hat = np.maximum(k_pred_plain(n, sigma, eps), 1.0)
    k_fin = np.maximum(np.minimum(k_grid_e * n / n_grid, n), 1.0)
    # sink- and local-aware: keep S and L whole, the bulk may lose eps / m_B of its own mass
    n_sl = np.minimum(n, sinks + window)
    k_sink = np.asarray(k_pred_sink_aware(n - n_sl, n_sl, sigma, m_b, eps), dtype=float)
    return k_hat, k_fin, k_sink


def _add_eps_stats(out: dict[str, Any], e_key: str, k_meas: np.ndarray, k_hat: np.ndarray,
                   k_fin: np.ndarray, k_sink: np.ndarray) -> None:
    """Write one head's statistics at eps ``e_key`` into its block ``out``; the arrays are (rows,)."""
    from attn_audit.theory.correlation import average_ranks

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


def theory_block(features: np.ndarray, names: list[str], spec: MeasureSpec, seed: int) -> dict[str, Any]:
    """Predicted vs measured k_eps over the sampled rows of one head.

    Args:
        features: (rows, F) row features (see ``Accumulator.summary()['row_feature_names']``).
    """
    from attn_audit.theory.predict import large_sigma_regime

    col = {n: i for i, n in enumerate(names)}
    ok = _bulk_rows(features, col)
    out = _new_block(int(ok.sum()))
    if "skipped_reason" in out:
        return out
    sigma, n = features[ok, col["bulk_std"]], features[ok, col["n_keys"]]
    keep = _subsample(len(sigma), seed)
    if keep is not None:
        features = features[ok][keep]
        sigma, n = sigma[keep], n[keep]
        ok = np.ones(len(sigma), dtype=bool)
        out["rows"] = int(len(sigma))
    out["sigma_median"] = float(np.median(sigma))
    out["large_sigma_share"] = float(np.mean(large_sigma_regime(sigma, n)))
    n_grid = _round_n(n)
    k_grid_all = _k_grid(n_grid, sigma, spec.eps, np.random.default_rng(seed))
    m_b = features[ok, col["bulk_mass"]]
    for e_idx, (eps, e_key) in enumerate(zip(spec.eps, spec.eps_keys, strict=True)):
        k_hat, k_fin, k_sink = _predictions(n, n_grid, sigma, m_b, k_grid_all[:, e_idx], eps, spec.sinks, spec.window)
        _add_eps_stats(out, e_key, features[ok, col[f"k_eps[{e_idx}]"]], k_hat, k_fin, k_sink)
    out["prediction"] = _PREDICTION_NOTE
    return out


def _group_by_rows(features: list[np.ndarray], col: dict[str, int],
                   seed: int) -> tuple[list[dict[str, Any]], dict[int, list[tuple[int, np.ndarray]]]]:
    """A new block per head, and the kept rows of the heads not skipped, grouped by row count.

    Args:
        features: per head, the (rows, F) row features.

    Returns:
        (blocks, by_rows): ``by_rows`` maps a row count to (head index, (rows, F) kept rows) pairs.
    """
    blocks: list[dict[str, Any]] = []
    by_rows: dict[int, list[tuple[int, np.ndarray]]] = {}
    for i, feats in enumerate(features):
        ok = _bulk_rows(feats, col)
        out = _new_block(int(ok.sum()))
        blocks.append(out)
        if "skipped_reason" in out:
            continue
        kept = feats[ok]
        keep = _subsample(len(kept), seed)
        if keep is not None:
            kept = kept[keep]
            out["rows"] = int(len(kept))
        by_rows.setdefault(len(kept), []).append((i, kept))
    return blocks, by_rows


def _stack_spearman(k_meas: np.ndarray, k_fin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-head Spearman rho of ``k_meas`` vs ``k_fin`` (both (heads, rows)): (rho, has), each (heads,).

    ``has`` marks the heads where both vary; rho is NaN elsewhere.
    """
    from attn_audit.theory.correlation import average_ranks

    rho = np.full(len(k_meas), np.nan)
    has = (np.ptp(k_meas, axis=1) > 0) & (np.ptp(k_fin, axis=1) > 0)
    if has.any():
        # scipy.stats.spearmanr's own steps (average ranks, then np.corrcoef of the (rows, 2) ranks)
        ranked = np.empty((int(has.sum()), k_meas.shape[1], 2))
        ranked[:, :, 0] = average_ranks(k_meas[has])  # = scipy.stats.rankdata(axis=1)
        ranked[:, :, 1] = average_ranks(k_fin[has])
        rho[has] = [np.corrcoef(r, rowvar=False)[1, 0] for r in ranked]
    return rho, has


def _stack_stats(st: np.ndarray, col: dict[str, int], n_grid: np.ndarray, k_grid_all: np.ndarray,
                 spec: MeasureSpec) -> dict[str, np.ndarray]:
    """The statistics of a stack of heads with equal row counts, each of shape (heads,).

    Args:
        st: (heads, rows, F) kept row features.
        n_grid: (heads, rows) key counts rounded by :func:`_round_n`.
        k_grid_all: (heads, rows, E) Monte Carlo k on ``n_grid``, one column per eps.
    """
    from attn_audit.theory.predict import large_sigma_regime

    # contiguous (heads, rows) copies: each row of a reduction is then laid out like theory_block's 1-d arrays
    sigma = np.ascontiguousarray(st[:, :, col["bulk_std"]])
    n = np.ascontiguousarray(st[:, :, col["n_keys"]])
    m_b = np.ascontiguousarray(st[:, :, col["bulk_mass"]])
    stat: dict[str, np.ndarray] = {"sigma_median": np.median(sigma, axis=1),
                                   "large_sigma_share": np.mean(large_sigma_regime(sigma, n), axis=1)}
    for e_idx, (eps, e_key) in enumerate(zip(spec.eps, spec.eps_keys, strict=True)):
        k_meas = np.ascontiguousarray(st[:, :, col[f"k_eps[{e_idx}]"]])
        k_hat, k_fin, k_sink = _predictions(n, n_grid, sigma, m_b, k_grid_all[:, :, e_idx], eps, spec.sinks,
                                            spec.window)
        ratio = np.log(np.maximum(k_meas, 1.0) / k_fin)
        q75, q25 = np.percentile(ratio, [75, 25], axis=1)
        stat[f"sink {e_key}"] = np.nanmean(k_sink, axis=1)
        stat[f"covers {e_key}"] = np.mean(k_meas <= np.ceil(k_sink) + 1e-9, axis=1)
        stat[f"k_pred {e_key}"] = np.mean(k_hat, axis=1)
        stat[f"k_fin {e_key}"] = np.mean(k_fin, axis=1)
        stat[f"k_meas {e_key}"] = np.mean(k_meas, axis=1)
        stat[f"median {e_key}"] = np.median(ratio, axis=1)
        stat[f"iqr {e_key}"] = q75 - q25
        stat[f"rho {e_key}"], stat[f"has_rho {e_key}"] = _stack_spearman(k_meas, k_fin)
    return stat


def _fill_blocks(blocks: list[dict[str, Any]], ids: list[int], stat: dict[str, np.ndarray],
                 eps_keys: tuple[str, ...]) -> None:
    """Write the (heads,) statistics ``stat`` of one stack into the blocks of its heads ``ids``."""
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


def theory_blocks(features: list[np.ndarray], names: list[str], spec: MeasureSpec,
                  seed: int) -> list[dict[str, Any]]:
    """:func:`theory_block` of many heads at once; the same blocks, bit for bit.

    All heads share one finite-n Monte Carlo call (its grid cells are common to them), and the
    per-head statistics run on stacked ``(heads, rows)`` arrays, one stack per row count. Every
    reduction still runs along one head's rows, as the per-head code does.

    Args:
        features: per head, the (rows, F) row features (see ``theory_block``).

    Returns:
        One block per head, in order.
    """
    col = {n: i for i, n in enumerate(names)}
    blocks, by_rows = _group_by_rows(features, col, seed)
    if not by_rows:
        return blocks
    stacks = [([i for i, _ in group], np.stack([k for _, k in group])) for group in by_rows.values()]
    n_grids = [_round_n(st[:, :, col["n_keys"]]) for _, st in stacks]  # (heads, rows) each
    mc_seed = int(np.random.default_rng(seed).integers(2**31))  # what theory_block's generator yields
    k_grid = _k_grid(np.concatenate([g.ravel() for g in n_grids]),
                     np.concatenate([st[:, :, col["bulk_std"]].ravel() for _, st in stacks]), spec.eps, mc_seed)
    start = 0
    for (ids, st), n_grid in zip(stacks, n_grids, strict=True):
        k_grid_all = k_grid[start:start + n_grid.size].reshape(*n_grid.shape, len(spec.eps))
        start += n_grid.size
        _fill_blocks(blocks, ids, _stack_stats(st, col, n_grid, k_grid_all, spec), spec.eps_keys)
    return blocks


def theory_summary(heads: list[dict[str, Any]], config: AuditConfig) -> dict[str, Any]:
    """Does sparsity grow with R? Spearman correlations across heads, with bootstrap intervals.

    A negative correlation between R (or the row spread sigma) and k_eps/n is the theory's
    "sparser as R grows" (docs/methods.md §6). Model-wide and per layer.
    """
    from attn_audit.theory.correlation import spearman_with_ci

    m = config.measure
    key = m.eps_keys[m.primary_eps]
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
    from attn_audit.theory.norm_bound import r_variants_heads

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
            rec["R"]["note"] = "R_F = scale*B^2*||W_Q^h W_K^g^T||_F (docs/methods.md §3.2, Deng et al.'s form with the model's scale); W from pre-RoPE projections"


def add_theory(heads: list[dict[str, Any]], s: dict[str, Any], config: AuditConfig, group: int) -> None:
    """Each head's ``theory`` block, from the row-feature reservoir of its layer."""
    todo = [(rec, s["row_features"].get(rec["layer"])) for rec in heads]
    todo = [(rec, feats[:, rec["head"], :]) for rec, feats in todo if feats is not None]
    blocks = theory_blocks([f for _, f in todo], s["row_feature_names"], config.measure, config.seed)
    for (rec, _), block in zip(todo, blocks, strict=True):
        rec["theory"] = block


def add_scaling(heads: list[dict[str, Any]], summaries: dict[int, dict[str, Any]], config: AuditConfig) -> None:
    """Each head's ``scaling`` block: the n^C fit of mean k_eps over the audited lengths."""
    from attn_audit.theory.scaling import fit_scaling

    lengths = sorted(summaries)
    for rec in heads:
        l, h = rec["layer"], rec["head"]
        scaling: dict[str, Any] = {}
        for e, key in enumerate(config.measure.eps_keys):
            per_seq = []
            for n in lengths:
                sk = summaries[n]["seq_k"][:, l, h, e]
                sr = summaries[n]["seq_rows"][:, l, h]
                with np.errstate(invalid="ignore", divide="ignore"):
                    per_seq.append(np.where(sr > 0, sk / np.maximum(sr, 1), np.nan))
            fit = fit_scaling(lengths, np.stack(per_seq, axis=1), seed=config.seed)
            fit["C_ci"] = [fit.get("C_lo"), fit.get("C_hi")]
            scaling[key] = fit
        primary = scaling.get(config.measure.eps_keys[config.measure.primary_eps], {})
        rec["scaling"] = {**{k: primary.get(k) for k in ("C", "C_ci", "alpha", "local_slopes")},
                          "by_eps": scaling, "method": "OLS of log mean k_eps on log n over lengths, bootstrap over sequences"}
