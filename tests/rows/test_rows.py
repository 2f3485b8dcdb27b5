"""attn_audit.rows.dispatch: the per-row sparsity kernel against its brute-force float64 reference.

The integers (n_keys, k_eps, k_eps_sinks) must be identical to the reference; the float
fields must agree to 1e-6.  Hypothesis drives random shapes, score scales (very peaked to
exactly uniform), ties, masks (causal, padding, sliding window, single-key and empty rows),
eps lists, sink counts and windows.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attn_audit.config import MeasureSpec
from attn_audit.errors import ConfigError
from attn_audit.rows import RowMetrics, reference_row_metrics, row_metrics
from attn_audit.rows import dispatch as rows_mod

NINF = float("-inf")
BACKENDS = ["cpu", "torch"]  # the compiled CPU kernel and the vectorised torch kernel
by_backend = pytest.mark.parametrize("backend", BACKENDS)
FLOAT_ATOL = {
    "tail_mass": 1e-6,
    "entropy": 1e-6,
    "sink_mass": 1e-6,
    "local_mass": 1e-6,
    "bulk_mass": 1e-6,
}
FLOAT_RTOL = {"participation": 1e-6, "max_abs_score": 2e-7}


# ---------------------------------------------------------------------------------------
# generators
# ---------------------------------------------------------------------------------------


def make_scores(
    seed: int, g: int, r: int, n: int, kind: str, scale: float, mask: str, sink_boost: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scores (g, r, n) float32 with -inf masks, and q_pos (r,) int64."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        s = torch.randn(g, r, n, generator=gen) * scale
    elif kind == "ties":  # few distinct values: many exact ties
        s = torch.randint(0, 3, (g, r, n), generator=gen).float() * scale
    elif kind == "uniform":
        s = torch.full((g, r, n), float(scale))
    elif kind == "peaked":  # one (or a few) keys far above a flat bulk
        s = torch.randn(g, r, n, generator=gen) * 0.1
        hot = torch.randint(0, n, (g, r, 1), generator=gen)
        s.scatter_(2, hot, scale)
    elif kind == "qk":  # realistic: (Q K^T) / sqrt(d)
        d = 16
        q = torch.randn(g, r, d, generator=gen) * scale
        k = torch.randn(g, n, d, generator=gen) * scale
        s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    else:
        raise ValueError(kind)
    s[..., 0] += sink_boost
    q_pos = torch.arange(r) + max(n - r, 0)
    cols = torch.arange(n)
    allowed = torch.ones(g, r, n, dtype=torch.bool)
    if mask in ("causal", "sliding", "causal_pad"):
        allowed &= cols[None, None, :] <= q_pos[None, :, None]
    if mask == "sliding":
        allowed &= cols[None, None, :] > (q_pos[None, :, None] - 5)
    if mask in ("padding", "causal_pad"):
        allowed &= torch.rand(g, r, n, generator=gen) < 0.7
    if mask == "one":
        keep = torch.randint(0, n, (g, r, 1), generator=gen)
        allowed = torch.zeros_like(allowed).scatter_(2, keep, True)
    if mask == "empty_rows":
        allowed &= (torch.rand(g, r, 1, generator=gen) < 0.6).expand(g, r, n)
    s = s.masked_fill(~allowed, NINF)
    return s.contiguous(), q_pos


EPS_POOL = [0.001, 0.01, 0.05, 0.1, 0.2, 0.25, 0.5, 0.9, 0.999]

cases = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "g": st.integers(1, 3),
        "r": st.integers(1, 40),
        "n": st.integers(1, 300),
        "kind": st.sampled_from(["gauss", "ties", "uniform", "peaked", "qk"]),
        "scale": st.sampled_from([1e-4, 0.05, 0.5, 1.0, 2.0, 4.0, 10.0, 60.0]),
        "mask": st.sampled_from(
            ["none", "causal", "sliding", "padding", "causal_pad", "one", "empty_rows"]
        ),
        "sink_boost": st.sampled_from([0.0, 0.0, 3.0, 8.0]),
        "eps": st.lists(  # distinct: they key the results (MeasureSpec refuses a repeated eps)
            st.one_of(st.sampled_from(EPS_POOL), st.floats(1e-4, 0.9999)),
            min_size=1,
            max_size=4,
            unique=True,
        ),
        "budgets": st.lists(st.sampled_from([1, 2, 5, 16, 64, 256]), min_size=0, max_size=3),
        "sinks": st.sampled_from([0, 1, 1, 4]),
        "window": st.sampled_from([0, 1, 8, 64]),
        "chunk": st.sampled_from([1 << 17, 1000]),
    }
)


def build(c: dict) -> tuple[torch.Tensor, torch.Tensor, MeasureSpec]:
    s, q = make_scores(
        c["seed"], c["g"], c["r"], c["n"], c["kind"], c["scale"], c["mask"], c["sink_boost"]
    )
    spec = MeasureSpec(
        eps=tuple(c["eps"]), budgets=tuple(c["budgets"]), sinks=c["sinks"], window=c["window"]
    )
    return s, q, spec


# ---------------------------------------------------------------------------------------
# comparison helpers
# ---------------------------------------------------------------------------------------


def assert_matches(fast: RowMetrics, ref: RowMetrics) -> None:
    """Integers identical; floats within tolerance on rows that have allowed keys."""
    assert torch.equal(fast.n_keys, ref.n_keys)
    assert torch.equal(fast.k_eps, ref.k_eps), _first_diff(fast.k_eps, ref.k_eps)
    assert torch.equal(fast.k_eps_sinks, ref.k_eps_sinks), _first_diff(
        fast.k_eps_sinks, ref.k_eps_sinks
    )
    assert torch.equal(fast.n_bulk, ref.n_bulk)
    ok = ref.n_keys > 0
    for name, atol in FLOAT_ATOL.items():
        a, b = getattr(fast, name)[ok], getattr(ref, name)[ok]
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=name)
    for name, rtol in FLOAT_RTOL.items():
        a, b = getattr(fast, name)[ok], getattr(ref, name)[ok]
        torch.testing.assert_close(a, b, atol=0, rtol=rtol, msg=name)
    assert torch.equal(fast.max_score[ok], ref.max_score[ok])
    # bulk statistics come from float32-shifted scores: relative 1e-5 of the logit spread
    nb_ok = ok & (ref.n_bulk >= 2)
    spread = (ref.max_abs_score[nb_ok]).clamp_min(1.0)
    for name in ("bulk_mean", "bulk_std"):
        a, b = getattr(fast, name)[nb_ok], getattr(ref, name)[nb_ok]
        assert ((a - b).abs() <= 1e-5 * spread).all(), name
    assert torch.isnan(fast.bulk_std[ok & (ref.n_bulk < 2)]).all()
    # rows without allowed keys
    assert (fast.k_eps[~ok] == 0).all() and (fast.k_eps_sinks[~ok] == 0).all()


def _first_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    idx = (a != b).nonzero()
    if not len(idx):
        return "shapes differ"
    i = tuple(idx[0].tolist())
    return f"first difference at {i}: fast {a[i].item()} vs reference {b[i].item()}"


# ---------------------------------------------------------------------------------------
# property tests
# ---------------------------------------------------------------------------------------


@by_backend
@settings(deadline=None, max_examples=250, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases)
def test_matches_reference(c: dict, backend: str) -> None:
    s, q, spec = build(c)
    fast = row_metrics(s, q, spec, chunk_elems=c["chunk"], backend=backend)
    ref = reference_row_metrics(s, q, spec)
    assert_matches(fast, ref)


@by_backend
@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases)
def test_invariants(c: dict, backend: str) -> None:
    s, q, spec = build(c)
    m = row_metrics(s, q, spec, backend=backend)
    n = m.n_keys
    ok = n > 0
    k = m.k_eps
    assert ((k >= 1) & (k <= n[..., None]))[ok].all()
    assert (k[~ok] == 0).all()
    # k_eps is non-increasing in eps
    order = sorted(range(len(spec.eps)), key=lambda i: spec.eps[i])
    ks = k[..., order]
    assert (ks[..., 1:] <= ks[..., :-1]).all()
    # sinks forced in never need fewer keys than the sink count, nor more than n_i
    assert (m.k_eps_sinks <= n[..., None]).all()
    # entropy in [0, ln n_i], participation in [1, n_i], masses sum to one
    h = m.entropy[ok]
    assert (h >= -1e-9).all() and (h <= torch.log(n[ok].double()) + 1e-6).all()
    pr = m.participation[ok]
    assert (pr >= 1 - 1e-9).all() and (pr <= n[ok].double() * (1 + 1e-9)).all()
    tot = (m.sink_mass + m.local_mass + m.bulk_mass)[ok]
    torch.testing.assert_close(tot, torch.ones_like(tot), atol=1e-9, rtol=0)
    # tail mass is non-increasing in the budget and in [0, 1]
    tm = m.tail_mass[ok]
    assert ((tm >= 0) & (tm <= 1 + 1e-12)).all()
    ob = sorted(range(len(spec.budgets)), key=lambda i: spec.budgets[i])
    assert (tm[..., ob][..., 1:] <= tm[..., ob][..., :-1] + 1e-12).all()


@by_backend
@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases, pseed=st.integers(0, 2**31 - 1))
def test_key_permutation_invariance(c: dict, pseed: int, backend: str) -> None:
    """k_eps depends only on the multiset of allowed scores, not on key positions."""
    s, q, spec = build(c)
    perm = torch.randperm(s.shape[-1], generator=torch.Generator().manual_seed(pseed))
    a = row_metrics(s, q, spec, backend=backend).k_eps
    b = row_metrics(s[..., perm].contiguous(), q, spec, backend=backend).k_eps
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# special rows
# ---------------------------------------------------------------------------------------


@by_backend
@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 20, 100, 128, 1000, 1024, 3000])
def test_uniform_rows(n: int, backend: str) -> None:
    """Exactly uniform rows: k = ceil((1 - eps) n) up to the reference's float64 rounding."""
    eps = (0.01, 0.05, 0.1, 0.2, 0.25, 0.5, 0.3, 0.7, 0.9)
    spec = MeasureSpec(eps=eps, budgets=(1, 16, 256), sinks=1, window=4)
    s = torch.full((2, 3, n), 1.5)
    q = torch.arange(3) + n
    m = row_metrics(s, q, spec, backend=backend)
    ref = reference_row_metrics(s, q, spec)
    assert_matches(m, ref)
    expect = torch.tensor([math.ceil((1 - e) * n - 1e-9) for e in eps])
    assert ((m.k_eps[0, 0] - expect).abs() <= 1).all()
    torch.testing.assert_close(
        m.entropy, torch.full_like(m.entropy, math.log(n)), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(m.participation, torch.full_like(m.participation, float(n)))


@by_backend
@pytest.mark.parametrize("gap", [20.0, 40.0, 100.0, 1e4])
def test_one_hot_rows(gap: float, backend: str) -> None:
    n = 500
    s = torch.zeros(1, 4, n)
    s[0, torch.arange(4), torch.tensor([0, 7, 250, 499])] = gap
    spec = MeasureSpec(eps=(0.001, 0.01, 0.5), budgets=(1, 2, 300), sinks=1)
    m = row_metrics(s, torch.arange(4) + 600, spec, backend=backend)
    assert (m.k_eps == 1).all()
    assert_matches(m, reference_row_metrics(s, torch.arange(4) + 600, spec))
    # the row whose hot key is the sink needs only the sink when it is forced in
    assert (m.k_eps_sinks[0, 0] == 1).all()
    assert (m.k_eps_sinks[0, 1:] == 2).all()


@by_backend
def test_single_key_and_empty_rows(backend: str) -> None:
    s = torch.full((2, 3, 6), NINF)
    s[0, 0, 3] = 2.0
    s[1, 2, 0] = -5.0
    s[1, 1, 1:3] = torch.tensor([0.5, 0.5])
    spec = MeasureSpec(eps=(0.05, 0.5), budgets=(1, 4))
    m = row_metrics(s, torch.arange(3) + 5, spec, backend=backend)
    ref = reference_row_metrics(s, torch.arange(3) + 5, spec)
    assert_matches(m, ref)
    assert m.n_keys.tolist() == [[1, 0, 0], [0, 2, 1]]
    assert m.k_eps[0, 0].tolist() == [1, 1]
    assert m.k_eps[1, 1].tolist() == [2, 1]
    assert (m.k_eps[m.n_keys == 0] == 0).all()
    assert not torch.isnan(m.k_eps.double()).any()
    assert m.k_eps_sinks[1, 2].tolist() == [1, 1]  # the only key is the sink


@by_backend
def test_fallback_path_equals_reference(backend: str) -> None:
    """The exact sort-based fallback (used for ambiguous rows) is the reference itself."""
    s, q = make_scores(3, 2, 30, 200, "ties", 1.0, "causal", 2.0)
    spec = MeasureSpec(eps=(0.01, 0.1, 0.5), budgets=(4, 64))
    a = row_metrics(s, q, spec, _force_fallback=True, backend=backend)
    assert_matches(a, reference_row_metrics(s, q, spec))


@by_backend
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes(dtype: torch.dtype, backend: str) -> None:
    s, q = make_scores(5, 2, 25, 150, "qk", 1.5, "causal", 4.0)
    s = s.to(dtype)
    spec = MeasureSpec(eps=(0.01, 0.05, 0.1))
    assert_matches(row_metrics(s, q, spec, backend=backend), reference_row_metrics(s, q, spec))


def test_argument_checks() -> None:
    with pytest.raises(ConfigError, match="outside"):
        MeasureSpec(eps=(0.0,))
    with pytest.raises(ConfigError, match="budgets"):
        MeasureSpec(eps=(0.1,), budgets=(0,))
    with pytest.raises(ValueError):
        row_metrics(torch.zeros(2, 3), torch.arange(2), MeasureSpec(eps=(0.1,)))
    with pytest.raises(ValueError):
        row_metrics(torch.zeros(1, 2, 3), torch.arange(3), MeasureSpec(eps=(0.1,)))


@by_backend
def test_zero_sized_inputs(backend: str) -> None:
    spec = MeasureSpec(eps=(0.1,), budgets=(2,))
    m = row_metrics(torch.zeros(2, 0, 5), torch.zeros(0, dtype=torch.int64), spec, backend=backend)
    assert m.k_eps.shape == (2, 0, 1) and m.tail_mass.shape == (2, 0, 1)
    m = row_metrics(torch.zeros(1, 3, 0), torch.arange(3), spec, backend=backend)
    assert (m.n_keys == 0).all() and (m.k_eps == 0).all()


@by_backend
@pytest.mark.parametrize("sinks", [1, 2, 4])
def test_no_eps_only_budgets(backend: str, sinks: int) -> None:
    """With no eps (only tail masses asked for) and several sinks, the kernels still run and
    agree with the reference (the torch kernel once failed to reshape its empty targets)."""
    s, q = realistic_block(3, 12, 40, seed=5)
    spec = MeasureSpec(eps=(), budgets=(4, 16), sinks=sinks)
    got, ref = row_metrics(s, q, spec, backend=backend), reference_row_metrics(s, q, spec)
    assert got.k_eps.shape == got.k_eps_sinks.shape == (3, 12, 0)
    torch.testing.assert_close(got.tail_mass, ref.tail_mass, rtol=0, atol=1e-9)
    torch.testing.assert_close(got.sink_mass, ref.sink_mass, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------
# realistic block
# ---------------------------------------------------------------------------------------


def realistic_block(
    g: int, r: int, n: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q K^T)/8 with head-dependent scales, a boosted sink column and a causal mask."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.3, 0.7, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0])[:g].view(g, 1, 1)
    q = torch.randn(g, r, 64, generator=gen) * scale
    k = torch.randn(g, n, 64, generator=gen) * scale
    s = (q @ k.transpose(-1, -2)) / 8.0
    s[..., 0] += torch.linspace(0, 10, g).view(g, 1)
    q_pos = torch.arange(r) + (n - r)
    s.masked_fill_(torch.arange(n)[None, :] > q_pos[:, None], NINF)
    return s.contiguous(), q_pos


@by_backend
def test_large_realistic_block_exact(backend: str) -> None:
    s, q = realistic_block(9, 512, 2048)
    spec = MeasureSpec(eps=(0.01, 0.05, 0.1, 0.2))
    fast = row_metrics(s, q, spec, backend=backend)
    ref = reference_row_metrics(s, q, spec)
    assert_matches(fast, ref)


def test_workspace_reuse_and_chunking_do_not_change_results() -> None:
    s, q = realistic_block(4, 64, 700, seed=1)
    spec = MeasureSpec(eps=(0.01, 0.1), budgets=(16, 64))
    a = row_metrics(s, q, spec, backend="torch")
    rows_mod.clear_workspace()
    b = row_metrics(s, q, spec, chunk_elems=3000, backend="torch")
    for k, v in a.to_dict().items():
        w = getattr(b, k)
        if v is None:
            assert w is None, k
        elif v.dtype.is_floating_point:  # summation order may differ with the chunking
            torch.testing.assert_close(v, w, atol=1e-12, rtol=1e-12, equal_nan=True, msg=k)
        else:
            assert torch.equal(v, w), k


@by_backend
def test_weights_out_are_the_softmax(backend: str) -> None:
    """weights_out / mass is the softmax of the scores (the fused attention output uses it)."""
    s, q = make_scores(7, 3, 40, 120, "qk", 2.0, "causal_pad", 5.0)
    s[1, 3] = NINF  # a row without allowed keys
    spec = MeasureSpec(eps=(0.05,))
    w = torch.full_like(s, 7.0)
    m = row_metrics(s, q, spec, backend=backend, weights_out=w)
    ref = torch.softmax(s.double(), dim=-1).nan_to_num(0.0)
    got = w.double() / m.mass.clamp_min(1.0)[..., None]
    torch.testing.assert_close(got, ref, atol=1e-7, rtol=1e-6)
    assert (w[s == NINF] == 0).all() and (m.mass[1, 3] == 0)
    assert torch.equal(m.k_eps, row_metrics(s, q, spec, backend=backend).k_eps)


@by_backend
@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases)
def test_causal_flag_ignores_values_after_the_query(c: dict, backend: str) -> None:
    """causal=True: keys after q_pos are disallowed whatever they hold (here: large finite
    values), with the same result as scores masked with -inf there."""
    s, q, spec = build(c)
    late = torch.arange(s.shape[-1])[None, :] > q[:, None]  # (R, n)
    junk = s.masked_fill(late, 50.0)
    ref = reference_row_metrics(s.masked_fill(late, NINF), q, spec)
    w = torch.empty_like(s)
    got = row_metrics(junk, q, spec, backend=backend, causal=True, weights_out=w)
    assert_matches(got, ref)
    assert (w[..., late] == 0).all()
    # every row through the reference path, which must apply the causal cut itself
    assert_matches(row_metrics(junk, q, spec, backend=backend, causal=True, _force_fallback=True), ref)


def test_cpu_kernel_uses_512_bit_vectors_on_avx512_hosts() -> None:
    """The CPU target must be set up with the wide-vector tuning before anything compiles (a
    regression here silently costs ~10% of the kernel). Fresh process: numba's target is set
    up once per process."""
    code = (
        "import llvmlite.binding as llvm\n"
        "import attn_audit.rows.cpu\n"
        "from numba.core.registry import cpu_target\n"
        "feats = cpu_target.target_context.codegen()._tm_features  # what LLVM was given\n"
        "host = llvm.get_host_cpu_features()\n"
        "wide = bool(host.get('avx512f') and host.get('avx512bw'))\n"
        "assert ('-prefer-256-bit' in feats) == wide, (wide, feats)\n"
        "print('wide' if wide else 'narrow')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_cpu_kernel_cache_follows_the_stage_sources(tmp_path) -> None:
    """numba caches the kernel keyed on rows/cpu.py's time stamp only; the stages it inlines
    live in rows/cpu_stages.py (and num_bins in rows/spec.py). A change there alone must recompile
    the kernel, not load stale machine code. Fresh processes on a copy of the package: the
    first compiles, an unchanged second loads the cache, and after an edit of
    rows/cpu_stages.py only (then of rows/spec.py only), the next run must miss the cache."""
    import shutil

    pkg = Path(__file__).resolve().parents[2] / "attn_audit"
    copy = tmp_path / "attn_audit"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import torch\n"
        "from attn_audit.config import MeasureSpec\n"
        "from attn_audit.rows import reference_row_metrics, row_metrics\n"
        "from attn_audit.rows.cpu import _rows\n"
        "s = torch.randn(2, 40, 300, generator=torch.Generator().manual_seed(0)) * 3\n"
        "q = torch.arange(260, 300)\n"
        "spec = MeasureSpec(eps=(0.05,), budgets=(16,))\n"
        "got, ref = row_metrics(s, q, spec), reference_row_metrics(s, q, spec)\n"
        "assert torch.equal(got.k_eps, ref.k_eps)\n"
        "print(sum(_rows.stats.cache_hits.values()), sum(_rows.stats.cache_misses.values()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "NUMBA_CACHE_DIR": str(tmp_path / "cache")}

    def run() -> tuple[int, int]:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        hits, misses = proc.stdout.split()
        return int(hits), int(misses)

    assert run() == (0, 1)  # compiled
    assert run() == (1, 0)  # loaded from the cache
    stages = copy / "rows" / "cpu_stages.py"
    stages.write_text(stages.read_text() + "\n# an edit of the stages alone\n")
    assert run() == (0, 1)  # recompiled, not the stale code
    assert run() == (1, 0)
    spec_src = copy / "rows" / "spec.py"
    spec_src.write_text(spec_src.read_text() + "\n# an edit of the bin geometry's file alone\n")
    assert run() == (0, 1)


def test_kernel_sources_digest_without_readable_sources(monkeypatch) -> None:
    """The cache digest reads the stage sources; where they cannot be read (a zip import, a
    frozen build) the kernel must still import and run, keyed on its own file only."""
    from attn_audit.rows import cpu as rows_cpu

    assert rows_cpu._sources_digest() > 0

    def unreadable(self: Path) -> bytes:
        raise OSError("no source")

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    assert rows_cpu._sources_digest() == 0
