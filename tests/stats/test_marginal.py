"""Tests of the vectorized evaluation (attn_audit.stats.marginal, .normality_tests, .whitening,
.henze_zirkler), batch API.

The statistics themselves are tested in test_stats.py; these tests check that the fast paths
(vectorized Shapiro-Wilk, paired Anderson-Darling logarithms, the symmetric pairwise blocks,
Cholesky distances, batched assessment) give the textbook / per-sample values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special as spc
from scipy import stats as sps

from attn_audit.stats import bh_adjust, bh_adjust_rows, henze_zirkler, whitening
from attn_audit.stats.assess import (
    GaussianityThresholds,
    assess_gaussianity,
    assess_gaussianity_batch,
)
from attn_audit.stats.marginal import coordinate_stats, coordinate_stats_many
from attn_audit.stats.normality_tests import shapiro_wilk


@pytest.mark.parametrize("n", [8, 9, 11, 12, 50, 513, 2040])
def test_shapiro_wilk_matches_scipy(n: int) -> None:
    rng = np.random.default_rng(n)
    x = np.column_stack([rng.standard_normal(n), rng.standard_t(3, n), rng.gamma(2.0, size=n),
                         rng.uniform(size=n), np.round(rng.standard_normal(n), 1)])  # fmt: skip
    w, p = shapiro_wilk(np.sort(x.T, axis=1))
    ref = [sps.shapiro(x[:, c]) for c in range(x.shape[1])]
    np.testing.assert_allclose(w, [r.statistic for r in ref], rtol=1e-12)
    np.testing.assert_allclose(p, [r.pvalue for r in ref], rtol=1e-8)


def test_anderson_ks_wasserstein_heavy_tails() -> None:
    """Cauchy columns reach |z| ~ 40, where 1 - Phi(z) underflows: A^2 is still scipy's."""
    rng = np.random.default_rng(20)
    x = rng.standard_cauchy((3000, 3))
    x[:, 2] = rng.standard_normal(3000)
    x[0, 2] = 60.0  # one far outlier: z ~ 55, Phi(-z) = 0
    cs = coordinate_stats(x)
    for c in range(3):
        z = np.sort((x[:, c] - x[:, c].mean()) / x[:, c].std(ddof=1))
        cdf, sf = spc.ndtr(z), spc.ndtr(-z)
        i = np.arange(1, z.size + 1)
        with np.errstate(divide="ignore"):
            a2 = -z.size - np.sum((2 * i - 1) * (np.log(cdf) + np.log(sf[::-1]))) / z.size
        assert cs.anderson[c] == pytest.approx(a2, rel=1e-10)
        ks = max(np.max(i / z.size - cdf), np.max(cdf - (i - 1) / z.size))
        assert cs.ks_distance[c] == pytest.approx(ks, rel=1e-12)
        # W1: sum of the exact per-interval integrals (every piece evaluated in full).
        u = np.arange(z.size + 1) / z.size
        g = -np.exp(-0.5 * spc.ndtri(u) ** 2) / math.sqrt(2 * math.pi)
        ustar = np.clip(cdf, u[:-1], u[1:])
        gstar = np.where(cdf < u[:-1], g[:-1], np.where(cdf > u[1:], g[1:],
                         -np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)))  # fmt: skip
        w1 = np.sum(z * (2 * ustar - u[:-1] - u[1:]) + g[:-1] + g[1:] - 2 * gstar)
        assert cs.wasserstein_sigma[c] == pytest.approx(w1, rel=1e-10)


def test_coordinate_stats_many_equals_single() -> None:
    rng = np.random.default_rng(21)
    xs = [rng.standard_t(5, (700, d)) for d in (1, 3, 200, 1, 64)]
    xs[2][:, 7] = 1.5  # a constant column inside a wide sample
    many = coordinate_stats_many(xs)
    for x, cs in zip(xs, many, strict=True):
        one = coordinate_stats(x)
        for name in ("mean", "var", "skewness", "excess_kurtosis", "ks_distance",
                     "wasserstein_sigma", "qq_corr", "anderson", "quantile_skewness"):  # fmt: skip
            np.testing.assert_allclose(getattr(cs, name), getattr(one, name), rtol=1e-12)
        for t, p in one.pvalues.items():  # (tail p-values amplify rounding: 1e-9)
            np.testing.assert_allclose(cs.pvalues[t], p, rtol=1e-9)
    assert np.isnan(many[2].skewness[7]) and many[2].var[7] == 0
    with pytest.raises(ValueError):
        coordinate_stats_many([xs[0], xs[0][:-1]])


def test_batch_equals_one_by_one() -> None:
    rng = np.random.default_rng(22)
    samples: list[np.ndarray] = [
        rng.standard_normal((300, 8)), rng.standard_t(4, (300, 8)), rng.standard_normal(300),
        rng.standard_normal((10, 2)), rng.gamma(2.0, size=(6000, 2)),
        rng.standard_normal((1200, 16)),
    ]  # fmt: skip
    samples[1][::7, 3] = np.nan  # fewer finite rows: its own group
    th = GaussianityThresholds(pairwise_max_n=500)
    batch = assess_gaussianity_batch(samples, th, seed=5)
    assert [r.verdict for r in batch][3] == "skipped"
    for x, res in zip(samples, batch, strict=True):
        one = assess_gaussianity(x, th, seed=5).to_dict()
        got = res.to_dict()
        assert got.keys() == one.keys()
        for key, val in one.items():
            if isinstance(val, float):
                assert got[key] == pytest.approx(val, rel=1e-9), key
            elif isinstance(val, list) and val and isinstance(val[0], float):
                np.testing.assert_allclose(np.array(got[key], float), np.array(val, float),
                                           rtol=1e-9, err_msg=key)  # fmt: skip
            elif not isinstance(val, (list, dict)):
                assert got[key] == val, key


def test_mahalanobis_matches_whitening() -> None:
    rng = np.random.default_rng(23)
    a = rng.standard_normal((6, 6)) * np.exp(rng.uniform(0, 3, 6))
    x = rng.standard_normal((500, 6)) @ a.T + 4.0
    m, w = whitening.mahalanobis(x), whitening.whiten(x)
    assert isinstance(m, whitening.Distances) and m.d_eff == w.d_eff == 6
    np.testing.assert_allclose(m.d2, w.d2, rtol=1e-9)
    np.testing.assert_allclose(m.eigenvalues, w.eigenvalues, rtol=1e-9)
    x[:, 5] = x[:, 0] - x[:, 1]  # rank 5: falls back to the whitening
    deficient = whitening.mahalanobis(x)
    assert isinstance(deficient, whitening.Whitened) and deficient.d_eff == 5


def _pairwise_float64(x: np.ndarray) -> tuple[float, float]:
    """b1 and HZ by their definitions on the full float64 Gram matrix of the whitened rows."""
    w = whitening.whiten(x)
    y = w.y
    m, p = y.shape
    gram = y @ y.T
    b1 = float(np.sum(gram**3)) / m**2
    b2 = henze_zirkler._hz_beta(m, p) ** 2
    dj = np.diagonal(gram)
    term1 = float(np.sum(np.exp(b2 * gram - b2 / 2 * dj[:, None] - b2 / 2 * dj[None, :]))) / m**2
    term2 = 2 * (1 + b2) ** (-p / 2) * float(np.exp(-b2 / (2 * (1 + b2)) * dj).mean())
    return b1, m * (term1 - term2 + (1 + 2 * b2) ** (-p / 2))


@pytest.mark.parametrize(("m", "d"), [(300, 1), (513, 1), (1000, 64), (129, 5)])
def test_pairwise_blocks_equal_the_definition(m: int, d: int) -> None:
    """The blocked float32 Gram sums equal the float64 definition to float32 rounding. (An
    earlier test compared them with an unblocked float32 product at 1e-12: that held only
    for one CPU's BLAS kernels; an AMD EPYC host reorders the float32 sums by ~2e-9.)"""
    x = np.random.default_rng(m + d).standard_t(6, (m, d))
    b1, hz = _pairwise_float64(x)
    res = henze_zirkler.pairwise_stats(x)
    assert res.b1 == pytest.approx(b1, rel=2e-6)
    # HZ = m * (term1 - term2 + term3) cancels: bound the error by float32 rounding of the terms
    assert abs(res.hz - hz) <= 5e-6 * m


def test_bh_adjust_rows() -> None:
    rng = np.random.default_rng(24)
    p = rng.uniform(size=(5, 40)) ** 3
    np.testing.assert_array_equal(bh_adjust_rows(p), np.stack([bh_adjust(r) for r in p]))
    np.testing.assert_array_equal(bh_adjust(p[0]), sps.false_discovery_control(p[0]))
    p[2, [1, 4]] = np.nan
    got = bh_adjust_rows(p)
    np.testing.assert_array_equal(got[2], bh_adjust(p[2]))
    assert np.isnan(got[2, [1, 4]]).all()
