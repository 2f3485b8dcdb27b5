"""Plan by kernel pattern and the exports that follow the measured patterns (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attn_audit.export import export_duo, export_minference, write_exports
from attn_audit.export.flex import read_flex
from attn_audit.rank import rank_and_plan
from attn_audit.rank.kernel import pattern_flops, tiles
from tests.synthetic import make_result

KEPT = [0.0, 0.93, 0.97, 0.99, 1.0]


def _patterns(levels: dict[str, int]) -> dict:
    return {"block_size": 64, "seq_len": 256, "levels": 4, "rows": 100, "by_pattern": {
        name: {"unit": "", "kept_mass": KEPT,
               "by_eps": {e: {"level_p90": lv} for e in ("0.01", "0.05", "0.1")}}
        for name, lv in levels.items()}}


def _result():
    r = make_result(num_layers=2, num_heads=4, num_kv_heads=2)
    for rec in r.heads:
        levels = {"streaming": 4, "block-topk": 4, "vertical-slash": 4, "block-oracle": 4}
        if (rec["layer"], rec["head"]) in ((0, 0), (0, 1)):
            levels = {"streaming": 1, "block-topk": 4, "vertical-slash": 3, "block-oracle": 1}
        if (rec["layer"], rec["head"]) == (1, 2):
            levels = {"streaming": 4, "block-topk": 3, "vertical-slash": 1, "block-oracle": 1}
        rec["patterns"] = _patterns(levels)
    rank_and_plan(r)
    return r


def test_tiles_count_whole_blocks() -> None:
    """Causal 256 tokens in blocks of 64: dense 1+2+3+4 tiles; streaming w=1 + sink 1+2+2+2;
    vertical-slash level 1 (64 columns + 64 diagonals) min(avail, 2) per query block."""
    assert tiles(256, 64, True, "dense", 0) == 10
    assert tiles(256, 64, True, "streaming", 1) == 7
    assert tiles(256, 64, True, "vertical-slash", 1) == 7
    assert tiles(256, 64, True, "block-topk", 2) == 7
    assert tiles(256, 64, False, "dense", 0) == 16
    assert pattern_flops(256, 64, 32, True, "dense", 0) == 4 * 32 * 64 * 64 * 10


def test_kernel_plan_picks_the_cheapest_pattern_meeting_eps() -> None:
    r = _result()
    plan = {(e["layer"], e["head"]): e for e in r.data["plan"]}
    assert set(plan) == {(0, 0), (0, 1), (1, 2)}  # the others need dense tiles: left out, with why
    assert plan[(0, 0)]["pattern"] == "streaming" and plan[(0, 0)]["window_blocks"] == 1
    assert plan[(0, 0)]["block_size"] == 64 and plan[(0, 0)]["sink_blocks"] == 1
    assert plan[(1, 2)]["pattern"] == "vertical-slash" and plan[(1, 2)]["vertical_size"] == 64
    assert plan[(0, 0)]["flops_saving"] == pytest.approx(1 - 7 / 10)
    # vertical-slash pays for its estimate: 64 last queries x 256 keys x 2d
    d = int(r.model["head_dim"])
    est = 2 * d * 64 * 256
    assert plan[(1, 2)]["estimate_flops"] == est
    assert plan[(1, 2)]["flops_saving"] == pytest.approx(1 - (7 * 4 * d * 64 * 64 + est) / (10 * 4 * d * 64 * 64))
    s = r.data["plan_summary"]
    assert s["kind"] == "kernel" and s["heads_planned"] == 3 and s["block_size"] == 64
    assert s["heads_by_pattern"] == {"streaming": 2, "vertical-slash": 1}
    assert s["planned_flops_saving"] == pytest.approx(sum(e["flops_saving"] for e in plan.values()) / 8)
    assert {(x["layer"], x["head"]) for x in s["excluded"]} == {(0, 2), (0, 3), (1, 0), (1, 1), (1, 3)}
    assert all(x["why"].startswith("stays dense") for x in s["excluded"])
    # the oracle bound stays beside it: the per-row top-k plan of the same audit
    oracle = make_result(num_layers=2, num_heads=4, num_kv_heads=2)
    rank_and_plan(oracle)
    assert oracle.data["plan_summary"]["kind"] == "oracle-top-k"
    assert s["oracle_flops_saving"] == pytest.approx(oracle.data["plan_summary"]["planned_flops_saving"])
    assert s["oracle_flops_saving"] > s["planned_flops_saving"]
    for e in plan.values():  # (synthetic patterns: no order between the two savings per head)
        assert e["k"] >= 1 and 0 <= e["oracle_flops_saving"] <= 1


def test_ranking_uses_kernel_flops_not_oracle_flops() -> None:
    """Two heads equal in everything but their patterns: the one whose kernel saves more ranks
    first, whatever their oracle top-k; plan order is the ranking's order."""
    r = make_result(num_layers=1, num_heads=2, num_kv_heads=2)
    a = r.heads[0]
    b = json.loads(json.dumps(a)) | {"head": 1, "kv_head": 1}
    r.heads[1] = b
    a["patterns"] = _patterns({"streaming": 2, "block-topk": 4, "vertical-slash": 4})
    b["patterns"] = _patterns({"streaming": 1, "block-topk": 4, "vertical-slash": 4})
    a["sparsity"]["0.05"]["k_p90"] = 2  # a: the sparser head for the oracle
    b["sparsity"]["0.05"]["k_p90"] = 40
    rank_and_plan(r)
    ranking = r.data["ranking"]
    assert [e["head"] for e in ranking] == [1, 0]
    assert ranking[1]["oracle_flops_saving"] > ranking[0]["oracle_flops_saving"]
    assert ranking[0]["flops_saving"] > ranking[1]["flops_saving"]
    assert [e["head"] for e in r.data["plan"]] == [1, 0]
    assert [e["pattern"] for e in r.data["plan"]] == ["streaming", "streaming"]


def test_exports_follow_measured_patterns(tmp_path: Path) -> None:
    r = _result()
    mi = export_minference(r)
    assert mi[0]["0"] == ["stream_llm", 64, 64, 0.93]
    assert mi[1]["2"] == ["vertical_and_slash", 64, 64, 0.93]
    assert mi[0]["2"] == ["vertical_and_slash", 256, 256, 1.0]
    tsv, cfg = export_duo(r)
    assert (cfg["sink_size"], cfg["recent_size"]) == (64, 64)  # the streaming heads' measured window
    gates = [[float(x) for x in line.split("\t")] for line in tsv.splitlines()]
    assert gates[0][0] == pytest.approx(0.07 / (0.07 + 0.05))  # m = 1 - kept mass at window 1
    write_exports(r, ["flex", "minference", "duo"], tmp_path)
    plan = read_flex(tmp_path / "flex_plan.json", r.model)
    assert plan["layers"][0]["0"] == {"pattern": "streaming", "sink_blocks": 1, "window_blocks": 1}
    assert plan["layers"][1]["3"] == {"pattern": "dense"}
    assert json.loads((tmp_path / "flex_plan.json").read_text())["block_size"] == 64


def test_reports_show_kernel_pattern_and_both_savings() -> None:
    from attn_audit.report import render

    r = _result()
    s = r.data["plan_summary"]
    for fmt in ("terminal", "md", "html"):
        out = render(r, fmt)
        assert "Kernel plan at 256 tokens, block 64" in out
        assert f"{s['planned_flops_saving']:.1%}" in out and f"{s['oracle_flops_saving']:.1%}" in out
        assert "sink+1 blk" in out and "v64 s64" in out
    html = render(r, "html")
    assert 'aria-label="oracle against kernel saving per head"' in html
    assert "stays dense: every pattern needs dense tiles" in html  # why the others stay dense
    bare = make_result(num_layers=2, num_heads=4, num_kv_heads=2)
    rank_and_plan(bare)
    assert bare.data["plan_summary"]["kind"] == "oracle-top-k" and "Kernel plan" not in render(bare, "md")


@pytest.mark.parametrize("args,needle", [
    (["--patterns", "diagonal"], "--patterns 'diagonal' is unknown"),
    (["--block-size", "0"], "--block-size 0 is outside the range 1..1048576"),
])
def test_pattern_options_fail_fast(args: list[str], needle: str) -> None:
    from tests.helpers import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("smollm2-135m-instruct", *args), 2, needle)


def test_flex_export_is_checked_against_the_model(tmp_path: Path) -> None:
    from attn_audit.export import ExportError

    r = _result()
    wrong = {"num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}
    with pytest.raises(ExportError, match="lacks"):
        write_exports(r, ["flex"], tmp_path, model_info=wrong)
    assert not any(tmp_path.iterdir())
    write_exports(r, ["flex"], tmp_path)
    path = tmp_path / "flex_plan.json"
    good = json.loads(path.read_text())
    for edit, fragment in [
        (lambda d: d["layers"][0]["1"].update(pattern="a-shape"), "unknown pattern 'a-shape'"),
        (lambda d: d["layers"][0]["0"].update(window_blocks=-1), "window_blocks must be an integer >= 0"),
        (lambda d: d["layers"].pop(), "expected 2 layers"),
        (lambda d: d.update(version=9), "version 9"),
    ]:
        data = json.loads(json.dumps(good))
        edit(data)
        path.write_text(json.dumps(data))
        with pytest.raises(ExportError, match=fragment):
            read_flex(path, r.model)
    path.write_text(json.dumps(good))
    other = dict(r.model, head_dim=int(r.model["head_dim"]) * 2)
    with pytest.raises(ExportError, match="another model shape"):
        read_flex(path, other)


def test_flex_export_needs_measured_patterns(tmp_path: Path) -> None:
    from attn_audit.export import ExportError

    bare = make_result(num_layers=2, num_heads=4, num_kv_heads=2)
    with pytest.raises(ExportError, match="no heads\\[\\].patterns"):
        write_exports(bare, ["flex"], tmp_path)
