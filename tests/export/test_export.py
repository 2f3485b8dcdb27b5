"""Runtime exports: MInference JSON and DuoAttention TSV, round trips and model checks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from attn_audit.errors import ConfigError
from attn_audit.export import (
    EXPORTERS,
    ExportError,
    export_duo,
    export_minference,
    parse_export_names,
    read_duo,
    read_minference,
    validate_against_model,
    write_exports,
)
from attn_audit.rank import PlanConfig, rank_and_plan
from attn_audit.result import AuditResult
from tests.synthetic import make_result


def _gqa(num_layers: int = 3, num_heads: int = 8, num_kv_heads: int = 2, planned: bool = True,
         **kw: Any) -> AuditResult:
    """A synthetic GQA audit, ranked and planned as an audit run leaves it (unless ``planned`` is False)."""
    r = make_result(num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, **kw)
    if planned:
        rank_and_plan(r)
    return r


# -- round trips ---------------------------------------------------------------------------
def test_round_trip_through_files(tmp_path: Path) -> None:
    r = _gqa()
    rank_and_plan(r, PlanConfig(target_len=1024))
    paths = write_exports(r, ["minference", "duo"], tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in paths) == [
        "duo/config.json",
        "duo/full_attention_heads.tsv",
        "minference.json",
    ]
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporaries
    mi = read_minference(tmp_path / "minference.json", r.model)
    assert mi == export_minference(r)
    matrix, config = read_duo(tmp_path / "duo", r.model)
    tsv, cfg = export_duo(r)
    assert matrix == [[float(x) for x in line.split("\t")] for line in tsv.splitlines()]
    assert (
        config == cfg
        and config["sink_size"] == r.run["sinks"]
        and config["recent_size"] == r.run["window"]
    )
    assert r.data["exports"]["minference"]["files"] == ["minference.json"]
    assert r.data["exports"]["duo"]["target_len"] == 1024


def test_minference_keys_are_global_query_heads_all_present() -> None:
    r = _gqa(num_heads=8, num_kv_heads=2)
    rank_and_plan(r)
    data = export_minference(r)
    assert len(data) == 3
    for layer in data:
        assert list(layer) == [str(h) for h in range(8)]  # 0..7 after repeat_kv, not 0..1


def test_minference_size_mapping() -> None:
    r = _gqa()
    for rec in r.heads:  # no head is local/sink dominated
        rec.update(sink_mass_mean=0.1, local_mass_mean=0.2, bulk_mass_mean=0.7)
    rank_and_plan(r, PlanConfig(target_len=1024))
    data = export_minference(r)
    planned = {(p["layer"], p["head"]): p for p in r.data["plan"]}
    assert planned and len(planned) < 24
    sinks, window = r.run["sinks"], r.run["window"]
    for layer in range(3):
        for head in range(8):
            pattern, vertical, slash, score = data[layer][str(head)]
            p = planned.get((layer, head))
            if p is None:
                assert [pattern, vertical, slash, score] == ["vertical_and_slash", 1024, 1024, 1.0]
            else:
                k = p["k"]
                assert pattern == "vertical_and_slash"
                assert vertical == min(1024, max(30, sinks + math.ceil(k / 2)))
                assert slash == min(1024, max(50, window + k // 2))
                assert score == pytest.approx(0.95)


def test_minference_stream_llm_for_sink_and_local_heads() -> None:
    r = _gqa()
    rec = r.head(1, 5)
    rec.update(sink_mass_mean=0.6, local_mass_mean=0.38, bulk_mass_mean=0.02)
    rec["sparsity"]["0.05"].update(k_p90=5, kfrac_mean=0.02)
    rank_and_plan(r)
    assert export_minference(r)[1]["5"] == ["stream_llm", 30, 64, 0.98]  # sinks clamped to 30


def test_minference_sizes_never_exceed_short_targets() -> None:
    r = _gqa(seq_len=40)
    for rec in r.heads:
        rec["sparsity"]["0.05"].update(k_p90=2, kfrac_mean=0.05, rows=10)
    rank_and_plan(r)
    for layer in export_minference(r):
        for _, vertical, slash, _ in layer.values():
            assert vertical <= 40 and slash <= 40


def test_duo_shape_and_values() -> None:
    r = _gqa(num_layers=3, num_heads=8, num_kv_heads=2)
    for rec in r.heads:
        rec["bulk_mass_mean"] = 0.01
    r.head(2, 6)["bulk_mass_mean"] = 0.2  # KV head 1 of layer 2 (heads 4..7)
    tsv, config = export_duo(r)
    rows = [line.split("\t") for line in tsv.splitlines()]
    assert [len(row) for row in rows] == [2, 2, 2]  # layers x KV heads
    assert all("e" in cell for row in rows for cell in row)  # scientific notation
    values = [[float(c) for c in row] for row in rows]
    assert values[2][1] == pytest.approx(0.2 / (0.2 + 0.05), rel=1e-6)  # max over the group
    assert values[0][0] == pytest.approx(0.01 / 0.06, rel=1e-6)
    assert values[0][0] < 0.5  # streaming at DuoAttention's default threshold
    assert values[2][1] > 0.5  # retrieval: streaming would drop more than eps of its mass
    assert config["sink_size"] == 1 and config["recent_size"] == 64


def test_duo_missing_masses_keep_full_attention() -> None:
    r = _gqa()
    for key in ("bulk_mass_mean", "local_mass_mean"):
        r.head(0, 0).pop(key)
    tsv, _ = export_duo(r)
    assert float(tsv.splitlines()[0].split("\t")[0]) == 1.0


def test_export_reads_the_plan_and_never_plans(tmp_path: Path) -> None:
    r = _gqa(planned=False)
    assert "plan" not in r.data
    with pytest.raises(ExportError, match="no plan"):
        write_exports(r, ["minference"], tmp_path)
    assert "plan" not in r.data and not any(tmp_path.iterdir())


# -- names ---------------------------------------------------------------------------------
def test_export_names_repeatable_and_comma_separated() -> None:
    assert parse_export_names(["minference,duo", "duo", " MInference "]) == ["minference", "duo"]
    assert list(EXPORTERS) == ["minference", "duo", "flex"]


def test_unknown_export_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown export 'xattn' \(known: minference, duo, flex\)"):
        write_exports(_gqa(), ["minference,xattn"], tmp_path)
    assert not any(tmp_path.iterdir())


# -- model checks --------------------------------------------------------------------------
def test_validator_accepts_hf_config_names() -> None:
    shape = validate_against_model(
        {"num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2}
    )
    assert (shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.group_size) == (3, 8, 2, 4)
    assert (
        validate_against_model({"num_layers": 2, "num_heads": 4}).num_kv_heads == 4
    )  # MHA default


@pytest.mark.parametrize(
    ("info", "fragment"),
    [
        (
            {"num_layers": 0, "num_heads": 8, "num_kv_heads": 2},
            "num_layers must be a positive integer",
        ),
        (
            {"num_layers": 3, "num_heads": 0, "num_kv_heads": 2},
            "num_heads must be a positive integer",
        ),
        ({"num_layers": 3, "num_heads": 8, "num_kv_heads": 3}, "not divisible by 3 KV heads"),
        (
            {"num_layers": 3, "num_heads": 8.0, "num_kv_heads": 2},
            "num_heads must be a positive integer",
        ),
    ],
)
def test_validator_rejects_bad_model_configs(info: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ExportError, match=fragment):
        validate_against_model(info)


def test_validator_checks_tensor_parallel_degree() -> None:
    info = {"num_layers": 3, "num_heads": 8, "num_kv_heads": 2}
    validate_against_model(info, tp=4)  # KV heads replicate over 4 ranks
    with pytest.raises(ExportError, match="does not divide 8 query heads"):
        validate_against_model(info, tp=3)


def test_wrong_layer_count_is_rejected_before_writing(tmp_path: Path) -> None:
    r = _gqa()
    live = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2}
    with pytest.raises(ExportError, match="lacks 8 of 32 heads"):
        write_exports(r, ["minference", "duo"], tmp_path, model_info=live)
    assert not any(tmp_path.iterdir())


def test_missing_and_duplicate_heads_are_rejected(tmp_path: Path) -> None:
    r = _gqa()
    r.data["heads"] = [h for h in r.heads if (h["layer"], h["head"]) != (1, 3)]
    with pytest.raises(ExportError, match=r"lacks 1 of 24 heads \(L1.H3\)"):
        write_exports(r, ["duo"], tmp_path)
    r = _gqa()
    r.heads.append(dict(r.heads[0]))
    with pytest.raises(ExportError, match="L0.H0 appears more than once"):
        export_duo(r)
    assert not any(tmp_path.iterdir())


def test_non_divisible_gqa_and_kv_mismatch_are_rejected() -> None:
    r = _gqa(num_heads=8, num_kv_heads=2)
    with pytest.raises(ExportError, match="not divisible"):
        export_minference(r, {"num_layers": 3, "num_heads": 8, "num_kv_heads": 3})
    r.head(0, 3)["kv_head"] = 1
    with pytest.raises(ExportError, match="L0.H3 has kv_head 1"):
        export_duo(r)


def test_readers_reject_files_for_another_model(tmp_path: Path) -> None:
    r = _gqa()
    write_exports(r, ["minference", "duo"], tmp_path)
    with pytest.raises(ExportError, match="expected a list of 4 layers, got 3"):
        read_minference(tmp_path, {"num_layers": 4, "num_heads": 8, "num_kv_heads": 2})
    with pytest.raises(ExportError, match="must map query heads '0'..'15'"):
        read_minference(tmp_path, {"num_layers": 3, "num_heads": 16, "num_kv_heads": 2})
    with pytest.raises(ExportError, match="3 rows, but the model has 4 layers"):
        read_duo(tmp_path, {"num_layers": 4, "num_heads": 8, "num_kv_heads": 2})
    with pytest.raises(ExportError, match="row 0 has 2 columns, the model has 4 KV heads"):
        read_duo(tmp_path, {"num_layers": 3, "num_heads": 8, "num_kv_heads": 4})


def _tamper_json(path: Path, edit: Any) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda d: d[1].pop("7"), "layer 1 must map query heads"),
        (lambda d: d[0].__setitem__("0", ["a_shape", 30, 50, 1.0]), "unknown pattern 'a_shape'"),
        (
            lambda d: d[0].__setitem__("0", ["vertical_and_slash", 0, 50, 1.0]),
            "vertical_size must be a positive",
        ),
        (lambda d: d[0].__setitem__("0", ["vertical_and_slash", 30, 50]), "expected [pattern"),
        (lambda d: d.append({}), "expected a list of 3 layers, got 4"),
    ],
)
def test_minference_reader_rejects_tampered_files(tmp_path: Path, edit: Any, fragment: str) -> None:
    r = _gqa()
    write_exports(r, ["minference"], tmp_path)
    _tamper_json(tmp_path / "minference.json", edit)
    with pytest.raises(ExportError) as info:
        read_minference(tmp_path / "minference.json", r.model)
    assert fragment in str(info.value)


def test_duo_reader_rejects_out_of_range_values_and_bad_config(tmp_path: Path) -> None:
    r = _gqa()
    write_exports(r, ["duo"], tmp_path)
    tsv = tmp_path / "duo" / "full_attention_heads.tsv"
    good = tsv.read_text()
    tsv.write_text(good.replace(good.split("\t")[0], "1.5e+00", 1))
    with pytest.raises(ExportError, match="outside"):
        read_duo(tmp_path / "duo", r.model)
    tsv.write_text(good)
    _tamper_json(tmp_path / "duo" / "config.json", lambda d: d.pop("sink_size"))
    with pytest.raises(ExportError, match="sink_size must be an integer"):
        read_duo(tmp_path, r.model)


def test_export_error_is_a_config_error() -> None:
    assert issubclass(ExportError, ConfigError)
    assert ExportError("x").exit_code == 2
