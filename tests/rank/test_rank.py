"""Ranking and planning: FLOP counts, budgets, risk flags, score, order, plan and groups."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attn_audit.errors import ConfigError
from attn_audit.rank import (
    GROUP_RULE,
    PlanConfig,
    RankWeights,
    attention_flops,
    flops_saving,
    is_non_gaussian,
    kept_pairs,
    rank_and_plan,
    rank_heads,
    sparse_flops,
)
from attn_audit.result import AuditResult
from tests.synthetic import make_result

NO_PENALTY = RankWeights(
    non_gaussian=0, sink_saturated=0, retrieval_like=0, unstable=0, unstable_across_lengths=0
)


def _calm(rec: dict[str, Any], k_p90: float = 20, kfrac: float = 0.05, eps: str = "0.05") -> None:
    """Make a head record predictable: given k_p90 and kfrac, tight CI, Gaussian, no sink/bulk."""
    block = rec["sparsity"][eps]
    block.update(k_p90=k_p90, k_mean=k_p90 / 2, k_median=k_p90 / 2, kfrac_mean=kfrac, rows=100)
    block["ci"] = {"k_mean": [k_p90 / 2, k_p90 / 2], "kfrac_mean": [kfrac * 0.99, kfrac * 1.01]}
    for site in rec["gaussianity"].values():
        site.update(verdict="gaussian-like", is_gaussian=True)
    rec.update(sink_mass_mean=0.1, local_mass_mean=0.5, bulk_mass_mean=0.4, flags=[])
    rec.pop("by_length", None)
    rec.pop("scaling", None)


def _calm_result(**kw: Any) -> AuditResult:
    r = make_result(**kw)
    for rec in r.heads:
        _calm(rec)
    return r


def _ranked(r: AuditResult, layer: int, head: int) -> dict[str, Any]:
    return next(e for e in r.ranking if e["layer"] == layer and e["head"] == head)


# -- FLOPs ---------------------------------------------------------------------------------
def test_dense_flops_exact_counts() -> None:
    assert attention_flops(512, 64, causal=False) == 4 * 64 * 512 * 512
    assert attention_flops(512, 64, causal=True) == 2 * 64 * 512 * 513
    assert attention_flops(0, 64, causal=True) == 0


@given(n=st.integers(1, 300), k=st.integers(0, 400), causal=st.booleans())
def test_sparse_flops_match_row_by_row_count(n: int, k: int, causal: bool) -> None:
    brute = sum(min(k, i if causal else n) for i in range(1, n + 1))
    assert kept_pairs(n, k, causal) == brute
    assert sparse_flops(n, k, 8, causal) == 4 * 8 * brute
    assert sparse_flops(n, k, 8, causal) <= attention_flops(n, 8, causal)


@given(n=st.integers(2, 500), k=st.integers(1, 499), causal=st.booleans())
def test_saving_decreases_with_k_and_vanishes_at_n(n: int, k: int, causal: bool) -> None:
    assert flops_saving(n, k, causal) >= flops_saving(n, k + 1, causal)
    assert flops_saving(n, n, causal) == 0.0
    assert 0.0 <= flops_saving(n, k, causal) < 1.0


def test_causal_saving_is_smaller_than_bidirectional() -> None:
    # A causal row i < k already costs fewer than k keys, so top-k saves less than bidirectionally.
    assert flops_saving(1024, 64, causal=True) < flops_saving(1024, 64, causal=False)
    assert flops_saving(1024, 64, causal=False) == pytest.approx(1 - 64 / 1024)


# -- budget k --------------------------------------------------------------------------------
def test_budget_at_audited_length_is_p90_plus_sinks() -> None:
    r = _calm_result()
    r.head(0, 1)["sparsity"]["0.05"]["k_p90"] = 40
    rank_heads(r)
    e = _ranked(r, 0, 1)
    assert e["k"] == 41  # p90 (not the mean, 20) plus run.sinks = 1
    assert e["reason"].startswith(
        "keeps 41 of 256 keys (16%) for eps=0.05 in 90% of rows (measured at 256"
    )
    assert e["flops_saving"] == pytest.approx(flops_saving(256, 41, True))


def test_budget_scaling_linear_fitted_and_measured() -> None:
    r = _calm_result()
    cfg = PlanConfig(target_len=1024)
    r.head(0, 1)["scaling"] = {"C": 0.5, "C_ci": [0.4, 0.6], "alpha": 1.3}
    r.head(0, 2)["by_length"] = {
        "1024": {"0.05": {"k_p90": 33, "k_median": 15, "k_mean": 15, "rows": 10}}
    }
    rank_heads(r, cfg)
    assert _ranked(r, 0, 0)["k"] == 20 * 4 + 1  # constant k/n
    assert "constant k/n" in _ranked(r, 0, 0)["reason"]
    assert _ranked(r, 0, 1)["k"] == 20 * 2 + 1  # (1024/256)^0.5 = 2
    assert "C=0.50" in _ranked(r, 0, 1)["reason"]
    assert _ranked(r, 0, 2)["k"] == 34  # measured at the target length
    assert "measured at 1024" in _ranked(r, 0, 2)["reason"]


def test_pipeline_layout_of_by_length_and_scaling() -> None:
    # assemble.py nests each length's block under "sparsity" and keeps per-eps fits in "by_eps".
    r = _calm_result()
    rec = r.head(0, 0)
    rec["by_length"] = {
        "256": {"sparsity": {"0.05": dict(rec["sparsity"]["0.05"])}},
        "1024": {"sparsity": {"0.05": {"k_p90": 50, "k_median": 40, "k_mean": 40, "rows": 9}}},
    }
    rank_heads(r, PlanConfig(target_len=1024))
    assert _ranked(r, 0, 0)["k"] == 51 and "measured at 1024" in _ranked(r, 0, 0)["reason"]
    rec = r.head(0, 1)
    rec["sparsity"]["0.01"].update(k_p90=30, rows=100)
    rec["scaling"] = {"C": 0.9, "alpha": 1.0, "by_eps": {"0.01": {"C": 0.0}, "0.05": {"C": 0.9}}}
    rank_heads(r, PlanConfig(target_len=2048, eps_key="0.01"))
    assert _ranked(r, 0, 1)["k"] == 31  # the eps=0.01 fit (C = 0), not the primary one


def test_budget_is_at_least_one_and_at_most_n() -> None:
    r = _calm_result()
    r.run["sinks"] = 0
    r.head(0, 0)["sparsity"]["0.05"]["k_p90"] = 0
    r.head(0, 1)["sparsity"]["0.05"]["k_p90"] = 10_000
    rank_heads(r)
    assert _ranked(r, 0, 0)["k"] == 1
    assert _ranked(r, 0, 1)["k"] == 256


def test_fitted_exponent_is_clamped_to_unit_interval() -> None:
    r = _calm_result()
    r.head(0, 0)["scaling"] = {"C": 1.7, "alpha": 0.1}
    r.head(0, 1)["scaling"] = {"C": -0.3, "alpha": 9.0}
    rank_heads(r, PlanConfig(target_len=512))
    assert _ranked(r, 0, 0)["k"] == 41  # C -> 1
    assert _ranked(r, 0, 1)["k"] == 21  # C -> 0


# -- flags and score -----------------------------------------------------------------------
def test_risk_flags_are_computed_from_the_record() -> None:
    r = _calm_result()
    r.head(0, 0)["gaussianity"]["k"].update(verdict="heavy-tailed", is_gaussian=False)
    r.head(0, 1)["sink_mass_mean"] = 0.97  # > 1 - 0.05
    r.head(0, 2).update(bulk_mass_mean=0.8, sink_mass_mean=0.1, local_mass_mean=0.1)
    r.head(0, 3)["sparsity"]["0.05"]["ci"]["kfrac_mean"] = [0.01, 0.09]  # width 0.08 / 0.05 > 0.5
    r.head(1, 0)["by_length"] = {
        "512": {"0.05": {"k_median": 60, "k_mean": 60}},
        "1024": {"0.05": {"k_median": 10, "k_mean": 10}},
    }
    r.head(1, 1)["by_length"] = {
        "512": {"0.05": {"k_median": 20, "k_mean": 20}},
        "1024": {"0.05": {"k_median": 40, "k_mean": 40}},
    }
    rank_heads(r)
    assert r.head(0, 0)["flags"] == ["non-gaussian"]
    assert r.head(0, 1)["flags"] == ["sink-saturated"]
    assert r.head(0, 2)["flags"] == ["retrieval-like"]
    assert r.head(0, 3)["flags"] == ["unstable"]
    assert r.head(1, 0)["flags"] == [
        "unstable-across-lengths"
    ]  # k jumps up then down: no power law
    assert r.head(1, 1)["flags"] == []  # 10 -> 20 -> 40 is an exact power law (C = 1)
    assert r.head(1, 2)["flags"] == []


def test_two_lengths_within_admissible_exponents_are_stable() -> None:
    r = _calm_result()
    r.head(0, 0)["by_length"] = {"1024": {"0.05": {"k_median": 10, "k_mean": 10}}}  # C = 0
    r.head(0, 1)["by_length"] = {"1024": {"0.05": {"k_median": 400, "k_mean": 400}}}  # C ~ 2.16 > 1
    r.head(0, 2)["by_length"] = {"1024": {"0.05": {"k_median": 400, "k_mean": 400}}}
    r.head(0, 2)["scaling"] = {"C": 1.0, "alpha": 0.04}  # still 20x more than n^1 allows
    rank_heads(r)
    assert "unstable-across-lengths" not in r.head(0, 0)["flags"]
    assert "unstable-across-lengths" in r.head(0, 1)["flags"]
    assert "unstable-across-lengths" in r.head(0, 2)["flags"]


def test_flag_thresholds_are_configurable() -> None:
    r = _calm_result()
    r.head(0, 0)["bulk_mass_mean"] = 0.45
    rank_heads(r)
    assert "retrieval-like" not in r.head(0, 0)["flags"]
    rank_heads(r, PlanConfig(retrieval_mass=0.3))
    assert "retrieval-like" in r.head(0, 0)["flags"]


def test_skipped_gaussianity_is_evidence_neither_way() -> None:
    assert is_non_gaussian({"gaussianity": {}}) is None
    rec = {"gaussianity": {"q": {"verdict": "skipped", "is_gaussian": False}}}  # stats.py layout
    assert is_non_gaussian(rec) is None
    rec["gaussianity"]["k"] = {"verdict": "gaussian-like", "is_gaussian": True}
    assert is_non_gaussian(rec) is None  # not every site shown Gaussian
    rec["gaussianity"]["q"] = {"verdict": "gaussian-like", "is_gaussian": True}
    assert is_non_gaussian(rec) is False
    rec["gaussianity"]["k"]["verdict"] = "outlier-channels"  # verdict alone suffices
    assert is_non_gaussian(rec) is True
    rec["gaussianity"]["k"] = {"verdict": None, "is_gaussian": False}
    assert is_non_gaussian(rec) is True


def test_skipped_site_does_not_raise_the_flag() -> None:
    r = _calm_result()
    r.head(0, 0)["gaussianity"]["q"].update(verdict="skipped", is_gaussian=False)
    rank_heads(r)
    assert "non-gaussian" not in r.head(0, 0)["flags"]


def test_score_formula_and_penalties() -> None:
    r = _calm_result()
    w = RankWeights()
    rank_heads(r)
    e = _ranked(r, 0, 0)
    stability = 1 - (0.05 * 1.01 - 0.05 * 0.99) / 0.05
    expected = w.saving * e["flops_saving"] + w.sparsity * (1 - 0.05) + w.stability * stability
    assert e["score"] == pytest.approx(expected, abs=1e-6)
    r.head(0, 0)["gaussianity"]["q"].update(verdict="skewed", is_gaussian=False)
    r.head(0, 0)["bulk_mass_mean"] = 0.9
    rank_heads(r)
    penalised = _ranked(r, 0, 0)["score"]
    assert penalised == pytest.approx(expected - w.non_gaussian - w.retrieval_like, abs=1e-6)


def test_weights_are_configurable_and_validated() -> None:
    r = _calm_result()
    r.head(0, 0)["gaussianity"]["q"].update(verdict="skewed", is_gaussian=False)
    only_saving = RankWeights(saving=1, sparsity=0, stability=0, non_gaussian=0)
    rank_heads(r, PlanConfig(weights=only_saving))
    e = _ranked(r, 0, 0)
    assert e["score"] == pytest.approx(e["flops_saving"], abs=1e-6)
    with pytest.raises(ConfigError, match=">= 0"):
        RankWeights(saving=-1)


def test_foreign_flags_survive_and_stale_risk_flags_go() -> None:
    r = _calm_result()
    r.head(0, 0)["flags"] = ["sink-saturated", "custom-note"]
    rank_heads(r)
    assert r.head(0, 0)["flags"] == ["custom-note"]


# -- order ---------------------------------------------------------------------------------
def test_ties_break_by_layer_then_head_and_ranks_are_consistent() -> None:
    r = _calm_result()
    rank_heads(r)
    assert [(e["layer"], e["head"]) for e in r.ranking] == [
        (h["layer"], h["head"]) for h in r.heads
    ]
    assert [e["rank"] for e in r.ranking] == list(range(1, len(r.heads) + 1))
    for e in r.ranking:
        assert r.head(e["layer"], e["head"])["rank"] == e["rank"]


def test_order_follows_score_and_is_deterministic() -> None:
    r1, r2 = make_result(seed=3), make_result(seed=3)
    rank_heads(r1)
    rank_heads(r2)
    assert r1.ranking == r2.ranking
    scores = [e["score"] for e in r1.ranking]
    assert scores == sorted(scores, reverse=True)


def test_unmeasured_heads_rank_last_and_are_not_planned() -> None:
    r = _calm_result()
    r.head(0, 0)["sparsity"]["0.05"]["rows"] = 0
    rank_and_plan(r)
    assert r.ranking[-1]["layer"] == 0 and r.ranking[-1]["head"] == 0
    assert r.head(0, 0)["flags"] == ["unmeasured"]
    assert (0, 0) not in {(p["layer"], p["head"]) for p in r.data["plan"]}
    assert {"layer": 0, "head": 0, "k": None, "why": "not measured"} in r.data["plan_summary"][
        "excluded"
    ]


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="target-len"):
        PlanConfig(target_len=0)
    with pytest.raises(ConfigError, match="max_kfrac"):
        PlanConfig(max_kfrac=1.5)
    r = make_result()
    with pytest.raises(ConfigError, match="eps 0.2 was not audited"):
        rank_heads(r, PlanConfig(eps_key="0.2"))
    rank_heads(r, PlanConfig(eps_key="1e-2"))  # the same number written differently
    assert "eps=0.01" in r.ranking[0]["reason"]


# -- plan ----------------------------------------------------------------------------------
PLAN_FIELDS = {
    "layer",
    "head",
    "kv_head",
    "k",
    "pattern",
    "kfrac",
    "flops_saving",
    "flops_saving_model",
    "score",
    "reason",
}


def test_plan_entries_summary_and_model_saving() -> None:
    r = make_result(seed=1)
    cfg = PlanConfig(target_len=2048)
    rank_and_plan(r, cfg)
    plan, summary = r.data["plan"], r.data["plan_summary"]
    assert plan and all(set(p) >= PLAN_FIELDS for p in plan)
    assert all(p["pattern"] == "top-k" and p["k"] <= 0.5 * 2048 for p in plan)
    assert [p["score"] for p in plan] == sorted((p["score"] for p in plan), reverse=True)
    assert summary["heads_planned"] + summary["heads_excluded"] == summary["heads_total"] == 12
    assert all("max_kfrac" in x["why"] for x in summary["excluded"])
    # model-wide saving = saved FLOPs / dense FLOPs of every head, recomputed from the FLOP counts
    d = r.model["head_dim"]
    dense = attention_flops(2048, d, True)
    saved = sum(dense - sparse_flops(2048, p["k"], d, True) for p in plan)
    assert summary["planned_flops_saving"] == pytest.approx(saved / (12 * dense))
    assert summary["dense_attention_flops"] == 12 * dense
    assert summary["formula"].startswith("score = ") and summary["weights"]["saving"] == 0.6
    assert f"Making {len(plan)} of 12 heads" in summary["text"]
    # every planned head's reason and rank agree with the ranking
    planned = [e for e in r.ranking if e["planned"]]
    assert [(e["layer"], e["head"]) for e in planned] == [(p["layer"], p["head"]) for p in plan]


def test_max_kfrac_excludes_dense_heads() -> None:
    r = _calm_result()
    r.head(1, 1)["sparsity"]["0.05"]["k_p90"] = 200
    rank_and_plan(r, PlanConfig(max_kfrac=0.5))
    assert (1, 1) not in {(p["layer"], p["head"]) for p in r.data["plan"]}
    assert "not planned: needs 78.5% of keys" in _ranked(r, 1, 1)["reason"]
    rank_and_plan(r, PlanConfig(max_kfrac=0.9))
    assert (1, 1) in {(p["layer"], p["head"]) for p in r.data["plan"]}


def test_plan_survives_an_audit_json_round_trip(tmp_path: Any) -> None:
    r = make_result()
    rank_and_plan(r)
    path = r.save(tmp_path / "audit.json")
    loaded = AuditResult.load(path)
    assert loaded.data["plan"] == json.loads(json.dumps(r.data["plan"]))
    assert loaded.data["plan_summary"]["heads_planned"] == r.data["plan_summary"]["heads_planned"]


# -- groups --------------------------------------------------------------------------------
def test_kv_groups_take_the_max_k_and_union_of_flags() -> None:
    r = _calm_result(num_heads=4, num_kv_heads=2)
    r.head(0, 1)["sparsity"]["0.05"]["k_p90"] = 90
    r.head(0, 0)["gaussianity"]["q"].update(verdict="skewed", is_gaussian=False)
    rank_heads(r)
    groups = r.data["ranking_kv_groups"]
    assert len(groups) == 3 * 2
    g = next(x for x in groups if x["layer"] == 0 and x["kv_head"] == 0)
    assert g["heads"] == [0, 1] and g["k"] == 91 and g["rule"] == GROUP_RULE
    assert g["flags"] == ["non-gaussian"]
    assert g["flops_saving"] == pytest.approx(flops_saving(256, 91, True))
    assert g["mean_head_saving"] == pytest.approx(
        (flops_saving(256, 21, True) + flops_saving(256, 91, True)) / 2
    )
    layers = r.data["ranking_layers"]
    assert sorted(x["layer"] for x in layers) == [0, 1, 2]
    assert next(x for x in layers if x["layer"] == 0)["k"] == 91
    assert [x["rank"] for x in layers] == [1, 2, 3]
    # a group is never scored better than its most demanding member would allow
    assert g["score"] <= min(_ranked(r, 0, h)["score"] for h in (0, 1)) + 1e-9


def test_reason_mentions_stability_and_flags() -> None:
    r = _calm_result()
    r.head(0, 0)["sparsity"]["0.05"].pop("ci")
    rank_heads(r)
    assert "stability unknown (no CI)" in _ranked(r, 0, 0)["reason"]
    assert "stable (CI ±0.1%); flags: none" in _ranked(r, 0, 1)["reason"]
    assert math.isfinite(_ranked(r, 0, 0)["score"])
