"""The gate: expression language, metrics, policies, exit codes and verdict lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attn_audit import gate
from attn_audit.errors import ConfigError, ExitCode
from attn_audit.gate import (
    METRICS,
    BoolOp,
    Compare,
    Not,
    decide,
    load_policy,
    metrics,
    parse,
)
from attn_audit.rank import rank_and_plan
from attn_audit.result import AuditResult
from tests.synthetic import make_result

EXAMPLE_POLICY = Path(__file__).resolve().parents[2] / "examples" / "policy.toml"


def _result(saving: float = 0.21, rows: bool = True, **data: Any) -> AuditResult:
    r = make_result()
    r.data["plan_summary"] = {"planned_flops_saving": saving, "heads_planned": 5, "heads_total": 12}
    if not rows:
        for h in r.heads:
            for block in h["sparsity"].values():
                block["rows"] = 0
    r.data.update(data)
    return r


# -- parsing -------------------------------------------------------------------------------
def test_precedence_not_over_and_over_or() -> None:
    node = parse("rows > 1 or not rows < 2 and heads_planned >= 3").node
    assert node == BoolOp(
        "or",
        Compare("rows", ">", 1.0),
        BoolOp("and", Not(Compare("rows", "<", 2.0)), Compare("heads_planned", ">=", 3.0)),
    )
    grouped = parse("(rows > 1 OR rows < 2) And heads_planned != 3").node
    assert isinstance(grouped, BoolOp) and grouped.op == "and"
    assert parse("ppl_increase>-1e-3").node == Compare("ppl_increase", ">", -0.001)


@pytest.mark.parametrize(
    ("expr", "position", "fragment"),
    [
        ("", 1, "empty expression"),
        ("foo < 1", 1, "unknown metric 'foo'"),
        ("planed_flops_saving < 1", 1, "did you mean 'planned_flops_saving'"),
        ("rows", 5, "expected one of"),
        ("rows <", 7, "expected a number"),
        ("rows < x", 8, "expected a number"),
        ("rows = 1", 6, "unexpected character '='"),
        ("0.3 > rows", 1, "expected a metric name"),
        ("rows > 1 and", 13, "expected a metric name"),
        ("(rows > 1", 10, "expected ')'"),
        ("rows > 1)", 9, "expected 'and', 'or' or the end"),
        ("rows > 1e", 8, "malformed number '1e'"),
        ("rows > 1; import os", 9, "unexpected character ';'"),
        ("__import__('os') > 1", 1, "unknown metric"),
    ],
)
def test_malformed_expressions_raise_config_error(expr: str, position: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(expr)
    message = str(info.value)
    assert f"at position {position}:" in message
    assert fragment in message
    assert "known metrics: planned_flops_saving" in message
    assert info.value.exit_code == ExitCode.USAGE


def test_check_knows_its_metrics_in_order() -> None:
    assert parse("rows > 1 or (ppl_ratio < 2 and rows < 5)").metrics == ("rows", "ppl_ratio")


# -- metrics -------------------------------------------------------------------------------
def test_metrics_from_the_result() -> None:
    r = make_result()
    r.data["verify"] = {"ppl_ratio": 1.02, "top1_agreement": 0.97, "hidden_cosine": 0.999}
    r.heads[0]["sink_mass_mean"] = 0.99
    for h in r.heads:
        h["sink_mass_mean"] = min(h["sink_mass_mean"], 0.99)
    rank_and_plan(r)
    m = metrics(r)
    assert set(m) == set(METRICS)
    assert m["ppl_increase"] == pytest.approx(0.02)
    assert m["ppl_ratio"] == 1.02 and m["top1_agreement"] == 0.97 and m["hidden_cosine"] == 0.999
    assert m["planned_flops_saving"] == r.data["plan_summary"]["planned_flops_saving"]
    assert m["heads_planned"] == len(r.data["plan"])
    gauss = [
        all(s["verdict"] == "gaussian-like" for s in h["gaussianity"].values()) for h in r.heads
    ]
    assert m["heads_gaussian"] == pytest.approx(sum(gauss) / len(gauss))
    assert m["heads_non_gaussian"] == pytest.approx(1 - sum(gauss) / len(gauss))
    kf = sorted(h["sparsity"]["0.05"]["kfrac_mean"] for h in r.heads)
    assert m["median_kfrac"] == pytest.approx((kf[5] + kf[6]) / 2)
    assert m["mean_kfrac"] == pytest.approx(sum(kf) / len(kf))
    assert m["rows"] == r.rows_measured == 12 * 1920
    assert m["sink_saturated_heads"] == sum(h["sink_mass_mean"] > 0.95 for h in r.heads) >= 1


def test_absent_metrics_are_none_not_zero() -> None:
    m = metrics(make_result())
    for name in (
        "planned_flops_saving",
        "heads_planned",
        "ppl_ratio",
        "ppl_increase",
        "top1_agreement",
    ):
        assert m[name] is None
    r = make_result()
    for h in r.heads:
        h["gaussianity"] = {"q": {"verdict": "skipped", "is_gaussian": False}}
    assert metrics(r)["heads_non_gaussian"] is None
    assert metrics(r)["heads_gaussian"] is None


def test_gaussian_shares_leave_undecided_heads_out() -> None:
    r = make_result(num_layers=1, num_heads=4, num_kv_heads=2)
    verdicts = ["gaussian-like", "heavy-tailed", "gaussian-like", "skipped"]
    for h, verdict in zip(r.heads, verdicts, strict=True):
        h["gaussianity"] = {"q": {"verdict": verdict, "is_gaussian": verdict == "gaussian-like"}}
    m = metrics(r)
    assert m["heads_gaussian"] == pytest.approx(2 / 3)
    assert m["heads_non_gaussian"] == pytest.approx(1 / 3)


# -- decisions and exit codes -------------------------------------------------------------
def test_exit_0_when_every_check_passes() -> None:
    out = decide(_result(0.5), [parse("planned_flops_saving < 0.3"), parse("rows < 1")])
    assert out.exit_code == ExitCode.OK == 0
    assert out.verdict_line() == "PASS: all 2 checks passed"
    assert out.to_dict()["passed"] is True
    assert [c.status for c in out.checks] == ["passed", "passed"]


def test_exit_0_without_checks() -> None:
    out = decide(_result(), [])
    assert out.exit_code == 0 and out.verdict_line() == "OK: audit complete; no checks configured"


def test_exit_1_with_the_documented_verdict_line() -> None:
    checks = [parse("planned_flops_saving < 0.3"), parse("rows < 1"), parse("heads_planned > 100")]
    out = decide(_result(0.21), checks)
    assert out.exit_code == ExitCode.CHECK_FAILED == 1
    assert (
        out.verdict_line() == "FAIL: 1 of 3 checks failed: planned_flops_saving < 0.3 (value 0.21)"
    )


def test_unevaluable_check_fails_with_a_reason() -> None:
    out = decide(_result(0.5), [parse("ppl_increase > 0.01"), parse("rows < 1")])
    assert out.exit_code == 1
    assert out.checks[0].status == "unevaluable"
    assert "--verify" in out.checks[0].message
    assert out.verdict_line().startswith(
        "FAIL: 1 of 2 checks could not be evaluated: ppl_increase > 0.01"
    )


def test_unevaluable_even_when_another_branch_is_true() -> None:
    # Strict rule: any absent metric makes the whole check unevaluable, never a silent pass.
    out = decide(_result(0.5), [parse("ppl_increase > 0.01 and rows < 1")])
    assert out.checks[0].status == "unevaluable" and out.exit_code == 1


def test_mixed_failure_and_unevaluable_verdict() -> None:
    named = parse("planned_flops_saving < 0.3", name="enough-saving")
    out = decide(_result(0.2), [named, parse("top1_agreement < 0.99"), parse("rows < 1")])
    line = out.verdict_line()
    assert line.startswith(
        "FAIL: 2 of 3 checks did not pass (1 failed, 1 could not be evaluated): "
    )
    assert "enough-saving: planned_flops_saving < 0.3 (value 0.2)" in line


def test_exit_4_when_nothing_was_measured_regardless_of_checks() -> None:
    for checks in ([], [parse("planned_flops_saving < 0.3")], [parse("rows > 1e9")]):
        out = decide(_result(0.9, rows=False), checks)
        assert out.exit_code == ExitCode.NOTHING_MEASURED == 4
        assert out.verdict_line().startswith("NO DATA")
        assert out.to_dict()["passed"] is False


def test_compound_values_are_reported() -> None:
    out = decide(_result(0.2), [parse("planned_flops_saving < 0.3 and heads_planned >= 5")])
    assert out.checks[0].status == "failed"
    assert "(value planned_flops_saving=0.2, heads_planned=5)" in out.verdict_line()


def test_equality_uses_a_tolerance() -> None:
    assert decide(_result(0.1 + 0.2), [parse("planned_flops_saving == 0.3")]).exit_code == 1
    assert decide(_result(0.1 + 0.2), [parse("planned_flops_saving != 0.3")]).exit_code == 0


def test_outcome_to_dict_is_json_and_survives_the_result_file(tmp_path: Path) -> None:
    r = _result(0.21)
    out = decide(r, [parse("planned_flops_saving < 0.3"), parse("ppl_ratio > 1.01")])
    r.data["gate"] = out.to_dict()
    loaded = AuditResult.load(r.save(tmp_path / "audit.json"))
    g = loaded.data["gate"]
    assert g["exit_code"] == 1 and g["passed"] is False
    assert g["counts"] == {"passed": 0, "failed": 1, "unevaluable": 1}
    assert g["checks"][0] == {
        "name": "planned_flops_saving < 0.3",
        "expression": "planned_flops_saving < 0.3",
        "description": "",
        "status": "failed",
        "value": 0.21,
        "values": {"planned_flops_saving": 0.21},
        "message": "planned_flops_saving < 0.3 (value 0.21)",
    }
    assert g["metrics"]["planned_flops_saving"] == 0.21
    json.dumps(g, allow_nan=False)


def test_decide_does_not_mutate_the_result() -> None:
    r = _result()
    before = json.dumps(r.to_dict(), sort_keys=True)
    decide(r, [parse("planned_flops_saving < 0.3")])
    assert json.dumps(r.to_dict(), sort_keys=True) == before


# -- monotonicity (hypothesis) ------------------------------------------------------------
finite = st.floats(-10, 10, allow_nan=False)


@given(value=finite, t1=finite, t2=finite, op=st.sampled_from(["<", "<=", ">", ">="]))
def test_tightening_a_threshold_never_turns_fail_into_pass(
    value: float, t1: float, t2: float, op: str
) -> None:
    # "Tighter" = the failure region grows: a larger bound for < / <=, a smaller one for > / >=.
    loose, tight = (min(t1, t2), max(t1, t2)) if op in ("<", "<=") else (max(t1, t2), min(t1, t2))
    r = _result(value)
    before = decide(r, [parse(f"planned_flops_saving {op} {loose!r}")])
    after = decide(r, [parse(f"planned_flops_saving {op} {tight!r}")])
    if before.exit_code == ExitCode.CHECK_FAILED:
        assert after.exit_code == ExitCode.CHECK_FAILED


@given(
    saving=finite, planned=st.integers(0, 20), t=finite, dt=st.floats(0, 5), n=st.integers(0, 20)
)
def test_tightening_inside_and_or_is_monotone(
    saving: float, planned: int, t: float, dt: float, n: int
) -> None:
    r = _result(saving)
    r.data["plan_summary"]["heads_planned"] = planned
    for template in (
        "planned_flops_saving < {t} or heads_planned < {n}",
        "(planned_flops_saving < {t}) and heads_planned < {n}",
    ):
        loose = decide(r, [parse(template.format(t=repr(t), n=n))])
        tight = decide(r, [parse(template.format(t=repr(t + dt), n=n + 1))])
        if loose.exit_code == 1:
            assert tight.exit_code == 1


# -- policies ------------------------------------------------------------------------------
def test_example_policy_loads_with_three_named_checks() -> None:
    checks = load_policy(EXAMPLE_POLICY)
    assert [c.name for c in checks] == [
        "enough-saving",
        "finite-numerics",
        "attention-stays-sparse",
    ]
    assert all(c.description for c in checks)
    out = decide(_result(0.21), checks)
    assert out.exit_code == 1 and "enough-saving" in out.verdict_line()


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "policy.toml"
    p.write_text(text, encoding="utf-8")
    return p


GOOD = '[[check]]\nname = "saving"\nfail_if = "planned_flops_saving < 0.3"\n'


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[[check]\nname=1", "is not valid TOML"),
        ("", "defines no [[check]] tables"),
        ('[[checks]]\nname = "a"\nfail_if = "rows < 1"\n', "unknown top-level key(s) checks"),
        ('[[check]]\nname = "a"\nfail-if = "rows < 1"\n', "unknown key(s) fail-if"),
        ('[[check]]\nfail_if = "rows < 1"\n', "'name' must be a non-empty string"),
        ('[[check]]\nname = "a"\n', "'fail_if' must be a non-empty string"),
        ('[[check]]\nname = "a"\nfail_if = 3\n', "'fail_if' must be a non-empty string"),
        (
            '[[check]]\nname = "a"\nfail_if = "rows < 1"\ndescription = 2\n',
            "'description' must be a string",
        ),
        (GOOD + GOOD, "duplicate check name 'saving'"),
        ('[[check]]\nname = "q"\nfail_if = "ppl_increse > 0.01"\n', "check 1 (q): bad check"),
        ('check = "rows < 1"\n', "defines no [[check]] tables"),
    ],
)
def test_malformed_policies_raise_config_error_naming_the_file(
    tmp_path: Path, text: str, fragment: str
) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_policy(p)
    assert str(p) in str(info.value)
    assert fragment in str(info.value)


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_policy(tmp_path / "nope.toml")


def test_collect_checks_puts_fail_if_first(tmp_path: Path) -> None:
    checks = gate.collect_checks(["rows < 1"], _write(tmp_path, GOOD))
    assert [c.name for c in checks] == ["rows < 1", "saving"]
    assert gate.collect_checks([]) == []
