"""Tests of attn_audit.theory (predict, finite_n, norm_bound, rank_correlation, scaling): known
answers, finite-n agreement, R via Gram, fits, CIs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from attn_audit.config import MeasureSpec
from attn_audit.theory.correlation import spearman_with_ci
from attn_audit.theory.finite_n import k_pred_finite_n
from attn_audit.theory.norm_bound import RVariants, r_variants
from attn_audit.theory.predict import (
    k_pred_plain,
    k_pred_sink_aware,
    large_sigma_regime,
)
from attn_audit.theory.scaling import fit_scaling


def _measured_k_eps(logits: np.ndarray, eps: float) -> np.ndarray:
    """Exact k_eps per row of ``logits`` (shape (rows, n)) by a descending numpy sort."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = -np.sort(-p, axis=1)
    cum = np.cumsum(p, axis=1)
    return (cum < (1 - eps) * cum[:, -1:]).sum(axis=1) + 1


def test_k_pred_plain_theory_table() -> None:
    """docs/methods.md §5.1: k/n = 0.741 (sigma 1), 0.361 (2), 0.088 (3) at eps 0.05; 0.043 at 0.1."""
    n = 1024
    got = k_pred_plain(n, np.array([1.0, 2.0, 3.0]), 0.05) / n
    np.testing.assert_allclose(got, [0.741, 0.361, 0.088], atol=6e-4)
    assert k_pred_plain(n, 3.0, 0.1) / n == pytest.approx(0.043, abs=6e-4)
    assert k_pred_plain(n, 0.0, 0.05) == pytest.approx(0.95 * n)  # uniform row
    assert k_pred_plain(np.array([[512], [1024]]), np.array([1.0, 2.0]), 0.05).shape == (2, 2)


def test_k_pred_finite_n_theory_table_and_edges() -> None:
    """The empirical column of the docs/methods.md §5.1 table (finite n) is reproduced; plain is not."""
    # The table's empirical column is itself a 200-row median (~4% noise at sigma = 3).
    got = k_pred_finite_n(1024, [1.0, 2.0, 3.0], 0.05, draws=801, rng=1) / 1024
    for g, want, tol in zip(got, (0.741, 0.367, 0.120), (0.01, 0.03, 0.1), strict=True):
        assert g == pytest.approx(want, rel=tol)
    assert k_pred_finite_n(1024, 3.0, 0.1, draws=801, rng=1) / 1024 == pytest.approx(0.064, rel=0.1)
    plain = k_pred_plain(1024, 3.0, 0.05)
    assert k_pred_finite_n(1024, 3.0, 0.05, draws=801, rng=1) > 1.15 * plain  # large-sigma bias
    edges = k_pred_finite_n(
        [100, 100, 100, 0, 50], [1.0, 1.0, np.nan, 1.0, 0.0], [1.0, 0.0, 0.05, 0.05, 0.05]
    )
    assert edges[0] == 0 and edges[1] == 100 and np.isnan(edges[2]) and np.isnan(edges[3])
    assert edges[4] == math.ceil(0.95 * 50)  # sigma 0: uniform row
    mono = k_pred_finite_n(2048, np.linspace(0, 5, 51), 0.05)
    assert np.all(np.diff(mono) <= 0)  # common random numbers: monotone in sigma


def test_measured_k_eps_matches_finite_n_prediction_within_10_percent() -> None:
    """Synthetic Gaussian logits: median measured k_eps vs median finite-n prediction.

    Grid n in {256, 1024, 4096} x sigma in {0.5, 1, 2, 3, 4} x eps in {0.05, 0.1}.
    The prediction uses each row's *estimated* sigma (std of its logits), as the audit does.
    Noise budget at the worst cell (sigma = 4): the 1000-row measured median has a relative
    sd of ~3%, the 401-draw prediction ~2.5%, so 10% is > 2.5 combined sd. The plain
    formula misses by more than 10% in the large-sigma regime.
    """
    rng = np.random.default_rng(0)
    plain_misses = 0
    for n in (256, 1024, 4096):
        rows = 1000 if n < 4096 else 500
        for sigma in (0.5, 1.0, 2.0, 3.0, 4.0):
            logits = rng.normal(rng.normal(0, 5), sigma, size=(rows, n))
            sig_hat = logits.std(axis=1, ddof=1)
            for eps in (0.05, 0.1):
                measured = np.median(_measured_k_eps(logits, eps))
                pred = np.median(k_pred_finite_n(n, sig_hat, eps, draws=401, rng=n))
                # 10%, or one key where k < 10 and 10% is less than the integer step
                assert pred == pytest.approx(measured, rel=0.10, abs=1.0), (n, sigma, eps)
                plain = np.median(k_pred_plain(n, sig_hat, eps))
                if large_sigma_regime(sigma, n) and abs(plain / measured - 1) > 0.10:
                    plain_misses += 1
    assert plain_misses >= 4


def test_k_pred_finite_n_default_draws_accuracy() -> None:
    """The default 101 draws stay within ~2 documented MC sd of a 4001-draw reference."""
    for sigma, tol in ((1.0, 0.015), (2.0, 0.03), (3.0, 0.07)):
        ref = k_pred_finite_n(1024, sigma, 0.05, draws=4001, rng=123)
        for seed in range(3):
            assert k_pred_finite_n(1024, sigma, 0.05, rng=seed) == pytest.approx(ref, rel=tol)


def test_k_pred_finite_n_on_thousands_of_rows() -> None:
    rng = np.random.default_rng(1)
    n = rng.choice([512, 1024, 2048], size=3000)
    sigma = rng.uniform(0.5, 3.0, size=3000)
    k = k_pred_finite_n(n, sigma, 0.05)  # its speed is measured by the benchmarks, not here
    assert k.shape == (3000,) and np.all((k >= 1) & (k <= n))


def test_k_pred_sink_aware() -> None:
    plain = k_pred_plain(1000, 2.0, 0.05)
    np.testing.assert_allclose(k_pred_sink_aware(1000, 4, 2.0, 1.0, 0.05), 4 + plain)
    # eps_B = eps / m_B: half the mass in the sinks doubles the bulk's budget.
    np.testing.assert_allclose(
        k_pred_sink_aware(1000, 4, 2.0, 0.5, 0.05), 4 + k_pred_plain(1000, 2.0, 0.1)
    )
    # eps_B >= 1 (sinks alone carry >= 1 - eps) or no bulk mass: no bulk keys.
    np.testing.assert_allclose(k_pred_sink_aware(1000, 4, 2.0, [0.04, 0.05, 0.0], 0.05), [4, 4, 4])


def test_large_sigma_regime() -> None:
    thr = 0.6 * math.sqrt(2 * math.log(1024))  # 2.235
    np.testing.assert_array_equal(large_sigma_regime([2.2, 2.3], 1024), [False, True])
    assert large_sigma_regime(thr + 1e-9, 1024) and not large_sigma_regime(thr - 1e-9, 1024)


def test_r_variants_gram_trick_matches_direct() -> None:
    rng = np.random.default_rng(2)
    d_head, big_d = 16, 96
    wq = rng.standard_normal((d_head, big_d))
    wk = rng.standard_normal((d_head, big_d)) * np.linspace(0.1, 2, big_d)
    scale, b_max, b_p999 = 1 / math.sqrt(d_head), 12.0, 9.5
    r = r_variants(wq, wk, scale, b_max, b_p999)
    w = wq.T @ wk  # D x D merged matrix W = W_Q W_K^T (W_Q = wq^T)
    assert r.w_fro == pytest.approx(np.linalg.norm(w, "fro"), rel=1e-10)
    assert r.w_op == pytest.approx(np.linalg.norm(w, 2), rel=1e-8)
    assert r.wq_op == pytest.approx(np.linalg.norm(wq, 2), rel=1e-10)
    assert r.wk_op == pytest.approx(np.linalg.norm(wk, 2), rel=1e-10)
    assert r.r_f_max == pytest.approx(scale * b_max**2 * np.linalg.norm(w, "fro"), rel=1e-10)
    assert r.r_f_p999 == pytest.approx(scale * b_p999**2 * np.linalg.norm(w, "fro"), rel=1e-10)
    assert r.r_op_max == pytest.approx(scale * b_max**2 * r.wq_op * r.wk_op)
    assert r.r_op_p999 == pytest.approx(scale * b_p999**2 * r.wq_op * r.wk_op)
    assert r.w_op <= r.wq_op * r.wk_op * (1 + 1e-12)
    # R bounds every logit: |c_s x^T W y| <= c_s ||x|| ||y|| ||W||_2 <= R.
    x = rng.standard_normal((50, big_d))
    x *= b_max / np.linalg.norm(x, axis=1, keepdims=True)
    logits = scale * (x @ wq.T) @ (x @ wk.T).T
    assert np.abs(logits).max() <= r.r_f_max and np.abs(logits).max() <= r.r_op_max
    d = r.to_dict()
    assert isinstance(r, RVariants) and set(d) >= {"w_fro", "w_op", "r_f_max", "r_op_p999"}
    low_rank = r_variants(np.zeros((4, 8)), rng.standard_normal((4, 8)), 1.0, 1.0, 1.0)
    assert low_rank.w_fro == 0 and low_rank.w_op == 0
    with pytest.raises(ValueError):
        r_variants(wq, wk[:, :10], scale, b_max, b_p999)


def test_fit_scaling_recovers_power_law() -> None:
    """Recover C = 0.6, alpha = 3 from k = 3 n^0.6 with 10% noise per sequence and length."""
    lengths = np.array([512, 1024, 2048, 4096, 8192])
    cover_c = cover_a = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        k = 3.0 * lengths**0.6 * np.exp(rng.normal(0, 0.1, size=(40, lengths.size)) - 0.005)
        fit = fit_scaling(lengths, k, n_boot=400, seed=seed)
        assert fit["C"] == pytest.approx(0.6, abs=0.03)
        assert fit["alpha"] == pytest.approx(3.0, rel=0.2)
        cover_c += fit["C_lo"] <= 0.6 <= fit["C_hi"]
        cover_a += fit["alpha_lo"] <= 3.0 <= fit["alpha_hi"]
        assert len(fit["local_slopes"]) == 4 and len(fit["local_slopes_lo"]) == 4
        assert all(
            lo <= s <= hi
            for lo, s, hi in zip(
                fit["local_slopes_lo"], fit["local_slopes"], fit["local_slopes_hi"], strict=True
            )
        )
    assert cover_c >= 32 and cover_a >= 32  # nominal 95% of 40 = 38; bootstrap runs narrow
    exact = fit_scaling(lengths[::-1], 3.0 * lengths[::-1] ** 0.6)  # one exact sequence
    assert exact["C"] == pytest.approx(0.6) and exact["alpha"] == pytest.approx(3.0)
    assert exact["r2"] == pytest.approx(1.0) and math.isnan(exact["C_lo"])
    np.testing.assert_allclose(exact["local_slopes"], 0.6)
    assert exact["lengths"] == sorted(exact["lengths"])
    with pytest.raises(ValueError):
        fit_scaling([512, 512], [[1.0, 2.0]])
    with pytest.raises(ValueError):
        fit_scaling([512, 1024], [[0.0, 0.0]])


def test_spearman_ci_covers_truth() -> None:
    """Bivariate normal with r = 0.6: Spearman's rho_s = (6/pi) asin(r/2) = 0.5821."""
    r = 0.6
    truth = 6 / math.pi * math.asin(r / 2)
    cov = [[1, r], [r, 1]]
    covered = 0
    for seed in range(100):
        xy = np.random.default_rng(seed).multivariate_normal([0, 0], cov, size=150)
        rho, lo, hi = spearman_with_ci(xy[:, 0], xy[:, 1], n_boot=400, seed=seed)
        assert lo <= rho <= hi
        assert rho == pytest.approx(sps.spearmanr(xy[:, 0], xy[:, 1]).statistic, abs=1e-12)
        covered += lo <= truth <= hi
    assert covered >= 88  # nominal 95 of 100; P(< 88 | 95%) = 0.0015
    x = np.arange(10.0)
    y = x.copy()
    y[3] = np.nan
    rho, lo, hi = spearman_with_ci(x, y)
    assert rho == pytest.approx(1.0) and lo == pytest.approx(1.0)
    assert all(math.isnan(v) for v in spearman_with_ci([1.0, 2.0], [3.0, 4.0]))


def test_fit_scaling_missing_lengths_per_sequence() -> None:
    """Sequences may lack some lengths (NaN); k_bar is the mean over those present."""
    lengths = [1024, 2048, 4096]
    k = np.array([[10.0, 15.0, np.nan], [12.0, np.nan, 24.0], [14.0, 17.0, 20.0]])
    fit = fit_scaling(lengths, k, n_boot=200)
    np.testing.assert_allclose(fit["k_bar"], [12.0, 16.0, 22.0])
    assert math.isfinite(fit["C_lo"]) and fit["C_lo"] <= fit["C"] <= fit["C_hi"]


def test_k_eps_columns_matches_cumsum_reference_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The checkpointed kernel counts the same partial sums as a full np.cumsum.

    Row counts around the tile and block sizes (1, 2, 7, 8, 9, 17, ...), blocks of several
    tiles (few checkpoints allowed), several passes of columns, sigma 0 (uniform row) and
    sigma large enough that the tail underflows.
    """
    from attn_audit.theory import simulation as simulated_rows

    rng = np.random.default_rng(4)
    eps = np.array([0.01, 0.05, 0.1, 0.5])
    for max_ckpt in (256, 3):
        monkeypatch.setattr(simulated_rows, "_MAX_CHECKPOINTS", max_ckpt)
        for n in (1, 2, 7, 8, 9, 17, 64, 129, 300):
            z = simulated_rows._max_stratified_rows(rng, n, 21)
            sig = np.concatenate([[0.0, 0.02, 40.0], rng.uniform(0, 6, 400)])
            got = simulated_rows._k_eps_columns(np.ascontiguousarray(z.T), sig, eps)
            want = np.stack([simulated_rows._k_eps_sorted(z, sig, e) for e in eps])
            np.testing.assert_array_equal(got, want, err_msg=f"n={n}, max_ckpt={max_ckpt}")


def test_k_pred_finite_n_cache_and_batching_do_not_change_values() -> None:
    """Predictions depend on (n, sigma, eps, draws, seed) only: not on the cache or on which
    rows are predicted together (so one batched call equals many small ones)."""
    from attn_audit.theory import finite_n
    from attn_audit.theory import simulation as simulated_rows

    rng = np.random.default_rng(6)
    n = rng.choice([2, 30, 64, 65, 700, 1024, 3000], size=300).astype(float)
    sigma = rng.uniform(0, 5, size=300)
    eps = rng.choice([0.01, 0.05, 0.1], size=300)
    finite_n._KAPPA_CACHE.clear()
    simulated_rows._ROWS_CACHE.clear()
    together = k_pred_finite_n(n, sigma, eps, draws=31, rng=9)
    finite_n._KAPPA_CACHE.clear()
    simulated_rows._ROWS_CACHE.clear()
    alone = np.array([k_pred_finite_n(a, b, c, draws=31, rng=9) for a, b, c in zip(n, sigma, eps)])
    np.testing.assert_array_equal(together, alone)
    cached = k_pred_finite_n(n, sigma, eps, draws=31, rng=9)
    np.testing.assert_array_equal(cached, together)


def test_r_variants_heads_equals_per_head() -> None:
    from attn_audit.theory.norm_bound import r_variants_heads

    rng = np.random.default_rng(3)
    wq = rng.standard_normal((5, 8, 40)).astype(np.float32)
    wk = rng.standard_normal((2, 8, 40)).astype(np.float32)
    wq[2] = 0.0  # rank-deficient head
    kv = [0, 0, 1, 1, 0]
    got = r_variants_heads(wq, wk, kv, 0.35, 11.0, 9.0)
    assert got == [r_variants(wq[i], wk[g], 0.35, 11.0, 9.0) for i, g in enumerate(kv)]
    assert r_variants_heads(wq[:0], wk, [], 0.35, 11.0, 9.0) == []
    with pytest.raises(ValueError):
        r_variants_heads(wq, wk[:, :, :10], kv, 0.35, 11.0, 9.0)


def test_spearman_ci_resampled_ranks_equal_rankdata() -> None:
    from attn_audit.theory.correlation import _resampled_ranks

    rng = np.random.default_rng(8)
    for values in (rng.normal(size=40), np.round(rng.normal(size=40), 1), np.ones(5)):
        idx = rng.integers(0, values.size, size=(60, values.size))
        want = sps.rankdata(values[idx], axis=1)
        np.testing.assert_array_equal(_resampled_ranks(values, idx), want)


def test_theory_blocks_equal_per_head_theory_block() -> None:
    """The batched assemble path gives the per-head blocks exactly (dict order included)."""
    from attn_audit.assemble.theory import theory_block, theory_blocks

    names = ["n_keys", "bulk_std", "bulk_mass", "sink_mass", "valid"]
    names += ["k_eps[0]", "k_eps[1]", "k_eps[2]"]
    rng = np.random.default_rng(11)
    heads = []
    for rows in (300, 200, 128, 60, 60, 9, 5, 0):
        f = np.empty((rows, len(names)), dtype=np.float32)
        n = rng.integers(1, 1500, size=rows)
        f[:, 0] = n
        f[:, 1] = rng.uniform(0.2, 4.0, size=rows)
        f[:, 2] = rng.uniform(0, 1, size=rows)
        f[:, 3] = rng.uniform(0, 1, size=rows)
        f[:, 4] = rng.random(rows) > 0.1
        for j, e in enumerate((0.01, 0.05, 0.1)):
            frac = rng.uniform(0.01, 0.9, size=rows) * (1 - 3 * e)
            f[:, 5 + j] = np.maximum(1, np.round(n * frac))
        if rows:
            f[rng.integers(0, rows, size=3), 1] = np.nan
        heads.append(f)
    heads[4][:, 5:] = 3.0  # constant measured k: no Spearman
    spec = MeasureSpec(eps=("0.01", "0.05", "0.1"), sinks=2, window=16)
    got = theory_blocks(heads, names, spec, seed=5)
    want = [theory_block(f, names, spec, 5) for f in heads]
    assert [list(b) for b in got] == [list(b) for b in want]
    assert got == want
    assert got[0]["rows"] == 128 and "skipped_reason" in got[-2] and "spearman" in got[0]


def test_scipy_stats_replacements_equal_scipy_stats_bit_for_bit() -> None:
    """The normal law and average ranks computed without scipy.stats equal its values."""
    from attn_audit.stats.distributions import norm_ppf, norm_sf
    from attn_audit.theory.correlation import average_ranks

    rng = np.random.default_rng(12)
    edges = [0.0, 1.0, -0.1, 1.1, np.nan, np.inf, -np.inf, 5e-324, 1e-300, 0.5, 1 - 2**-53]
    q = np.concatenate([edges, 10 ** rng.uniform(-300, 0, 200), 1 - 10 ** rng.uniform(-16, 0, 200)])
    x = np.concatenate([[0.0, -0.0, np.inf, -np.inf, np.nan, 40.0, -40.0], rng.normal(0, 10, 400)])
    with np.errstate(invalid="ignore", divide="ignore"):
        np.testing.assert_array_equal(norm_ppf(q), sps.norm.ppf(q))
        np.testing.assert_array_equal(norm_sf(x), sps.norm.sf(x))
        assert norm_sf(1.5) == sps.norm.sf(1.5) and norm_ppf(0.05) == sps.norm.ppf(0.05)
        # the k predictions against their former scipy.stats formulas
        n, s, e = rng.integers(1, 5000, 400), rng.uniform(0, 6, 400), np.resize(q, 400)
        mb = rng.uniform(-0.1, 1, 400)
        mb[:5] = 0
        np.testing.assert_array_equal(k_pred_plain(n, s, e), n * sps.norm.sf(s + sps.norm.ppf(e)))
        eps_b = np.where(mb > 0, e / mb, np.inf)
        want = 3 + n * sps.norm.sf(s + sps.norm.ppf(np.minimum(eps_b, 1.0)))
        np.testing.assert_array_equal(k_pred_sink_aware(n, 3, s, mb, e), want)
    for m in (1, 2, 7, 128, 1000):
        for v in (rng.normal(size=m), np.round(rng.normal(size=m), 1), np.ones(m)):
            np.testing.assert_array_equal(average_ranks(v), sps.rankdata(v))
            v32 = v.astype(np.float32)
            np.testing.assert_array_equal(average_ranks(v32), sps.rankdata(v32))
        rows = np.round(rng.normal(size=(6, m)) * 3)
        np.testing.assert_array_equal(average_ranks(rows), sps.rankdata(rows, axis=1))


def test_theory_block_spearman_equals_scipy_spearmanr(monkeypatch: pytest.MonkeyPatch) -> None:
    """theory_block / theory_blocks rank without scipy.stats and get spearmanr's rho exactly."""
    from attn_audit.assemble.theory import theory_block, theory_blocks
    from attn_audit.theory import finite_n

    def fake_finite_n(n, sigma, eps, **_):  # type: ignore[no-untyped-def]
        k = np.round(np.asarray(sigma, dtype=np.float64) * 5) + 1  # tied predictions
        return np.broadcast_to(k, np.broadcast_shapes(n.shape, eps.shape))

    monkeypatch.setattr(finite_n, "k_pred_finite_n", fake_finite_n)
    names = ["n_keys", "bulk_std", "bulk_mass", "sink_mass", "valid", "k_eps[0]"]
    spec = MeasureSpec(eps=("0.05",))
    rng = np.random.default_rng(13)
    heads = []
    for _ in range(3):
        f = np.empty((100, len(names)), dtype=np.float32)
        f[:, 0] = 2.0 ** rng.integers(6, 11, size=100)  # powers of two: the n grid is n itself
        f[:, 1] = rng.uniform(0.2, 4.0, size=100)
        f[:, 2:5] = 1.0
        f[:, 5] = np.maximum(1, np.round(f[:, 0] * rng.uniform(0.01, 0.8, size=100) / 16))  # ties
        heads.append(f)
    for f, block in zip(heads, theory_blocks(heads, names, spec, seed=3), strict=True):
        k_fin = np.maximum(np.minimum(np.round(f[:, 1].astype(np.float64) * 5) + 1, f[:, 0]), 1.0)
        want = float(sps.spearmanr(f[:, 5], k_fin).statistic)
        assert theory_block(f, names, spec, seed=3)["spearman"]["0.05"] == want
        assert block["spearman"]["0.05"] == want


def test_finite_n_cells_persist_on_disk_with_the_same_values(tmp_path, monkeypatch) -> None:
    """A second process (here: cleared caches) reads the cells back instead of simulating them."""
    from attn_audit.theory import finite_n, kappa_store
    from attn_audit.theory import simulation as simulated_rows

    monkeypatch.setenv("ATTN_AUDIT_CACHE", str(tmp_path))
    monkeypatch.delenv("ATTN_AUDIT_NO_DISK_CACHE", raising=False)
    monkeypatch.setattr(kappa_store, "_LOADED", set())
    rng = np.random.default_rng(8)
    n = rng.choice([5, 64, 300, 1024], size=80).astype(float)
    sigma, eps = rng.uniform(0, 4, size=80), rng.choice([0.01, 0.1], size=80)
    finite_n._KAPPA_CACHE.clear()
    first = k_pred_finite_n(n, sigma, eps, draws=21, rng=4, persist=True)
    assert list(tmp_path.glob("finite_n/*/kappa-d21-s4-*.npz"))
    finite_n._KAPPA_CACHE.clear()
    simulated_rows._ROWS_CACHE.clear()
    monkeypatch.setattr(kappa_store, "_LOADED", set())

    def no_simulation(*args, **kwargs):
        raise AssertionError("a stored cell was simulated again")

    monkeypatch.setattr(finite_n, "_cell_kappa", no_simulation)
    again = k_pred_finite_n(n, sigma, eps, draws=21, rng=4, persist=True)
    np.testing.assert_array_equal(again, first)
    finite_n._KAPPA_CACHE.clear()
