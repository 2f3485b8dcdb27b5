"""Hostile inputs at the boundary: --load files, policies, expressions and option values are
refused with one line and a documented code, in bounded time, never a traceback or a hang."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from attn_audit.cli import main
from attn_audit.errors import ConfigError, ExitCode
from tests.synthetic import make_result


def _one_error(capsys, needle):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    assert needle in lines[0], lines[0]


@pytest.fixture
def good(tmp_path):
    return json.loads(make_result().to_json())


def _load(tmp_path, text_or_bytes, *extra):
    path = tmp_path / "audit.json"
    if isinstance(text_or_bytes, bytes):
        path.write_bytes(text_or_bytes)
    else:
        path.write_text(text_or_bytes)
    return main(["--load", str(path), "--format", "terminal", *extra])


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["heads"][0].update(layer="0"), "$.heads[0].layer is not an integer"),
    (lambda d: d["heads"][0].update(sparsity=[1]), "$.heads[0].sparsity is not an object"),
    (lambda d: d["heads"][0]["sparsity"]["0.05"].update(k_mean="big"), "k_mean is not a num"),
    (lambda d: d["model"].update(num_layers=10**7, num_heads=10**7), "which is not a model"),
    (lambda d: d["heads"].pop(), "records, not 3 x 4"),
    (lambda d: d["model"].update(layer_heads=[[4, 3, 8]]), "$.model.layer_heads is not one [heads, kv heads"),
    (lambda d: d["model"].update(layer_heads=[[4, 2, 8], [2, 2, 8], [4, 2, 8]]), "records, not the sum of"),
    (lambda d: d["heads"][1].update(layer=0, head=0), "out of range or twice"),
    (lambda d: d["run"].update(eps_keys=["abc"]), "not an eps in (0, 1)"),
    (lambda d: d["ranking"][0].update(layer=99), "not in heads"),
    (lambda d: d["run"].update(seq_len=True), "$.run.seq_len is not an integer"),
    (lambda d: d["heads"][0].update(flags="x"), "$.heads[0].flags is not a list"),
    (lambda d: d.update(model=[]), "$.model is not an object"),
])
def test_load_checks_every_field_it_reads(tmp_path, capsys, good, mutate, needle):
    mutate(good)
    assert _load(tmp_path, json.dumps(good)) == ExitCode.USAGE
    _one_error(capsys, needle)


@pytest.mark.parametrize("payload,needle", [
    ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
    ('{"a":' * 40 + "1" + "}" * 40, "nests deeper than 32 levels"),
    (b"\xff\xfe{}", "not UTF-8"),
    ('{"schema_version": NaN}', "not strict JSON"),
    ('{"schema_version": ' + "9" * 5000 + "}", "not valid JSON"),
    ("", "not valid JSON"),
])
def test_load_refuses_malformed_json_quickly(tmp_path, capsys, payload, needle):
    t0 = time.perf_counter()
    assert _load(tmp_path, payload) == ExitCode.USAGE
    assert time.perf_counter() - t0 < 2.0
    _one_error(capsys, needle)


def test_load_control_characters_do_not_reach_the_terminal_or_markdown(tmp_path, capsys, good):
    evil = "\x1b[2J\x1b]0;pwned\x07<script>x</script>\nrow | col"
    good["model"]["name"] = evil
    good["heads"][0]["flags"] = [evil]
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(good))
    assert main(["--load", str(path), "--format", "terminal,md", "--out", str(tmp_path / "o"), "--no-color"]) == 0
    out = capsys.readouterr().out
    md = (tmp_path / "o" / "report.md").read_text()
    for text in (out, md):
        assert "\x1b" not in text and "\x07" not in text
    outside_code = re.sub(r"(`+).*?\1", "", md)  # a code span shows HTML as text
    assert "<script>" not in outside_code and "\\x1b" in md


def test_fifo_is_refused_not_read(tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    assert main(["--load", str(fifo), "--format", "terminal"]) == ExitCode.USAGE
    _one_error(capsys, "not a regular file")
    assert main(["--load", str(make_result().save(tmp_path / "a.json")), "--format", "terminal",
                 "--policy", str(fifo)]) == ExitCode.USAGE
    _one_error(capsys, "not a regular file")
    assert main(["--load", str(tmp_path), "--format", "terminal"]) == ExitCode.USAGE
    _one_error(capsys, "is a directory")
    assert time.perf_counter() - t0 < 2.0


def test_gate_expressions_parse_in_linear_time_with_a_depth_limit():
    from attn_audit.gate import parse

    for op in ("and", "or"):
        text = f" {op} ".join(f"rows > {i}" for i in range(250))  # ~3.7 KB, 250 terms
        t0 = time.perf_counter()
        check = parse(text)
        assert len(check.metrics) == 1
        assert time.perf_counter() - t0 < 1.0
    with pytest.raises(ConfigError, match="nested deeper than 32"):
        parse("(" * 40 + "rows > 1" + ")" * 40)
    with pytest.raises(ConfigError, match="nested deeper than 32"):
        parse("not " * 40 + "rows > 1")
    with pytest.raises(ConfigError, match="at most 4096"):
        parse("rows > 1 and " * 500 + "rows > 1")
    assert parse("(" * 30 + "rows > 1" + ")" * 30).metrics == ("rows",)


def test_gate_chains_evaluate_in_linear_time(tmp_path):
    from attn_audit.gate import decide, parse

    text = " and ".join(f"rows > {-i}" for i in range(250))
    t0 = time.perf_counter()
    outcome = decide(make_result(), [parse(text)])
    assert time.perf_counter() - t0 < 1.0
    assert outcome.exit_code == ExitCode.CHECK_FAILED


def test_policy_nesting_and_size_are_bounded(tmp_path):
    from attn_audit.gate import load_policy

    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="deep.toml"):
        load_policy(deep)
    big = tmp_path / "big.toml"
    with open(big, "wb") as fh:
        fh.truncate(2 << 20)
    with pytest.raises(ConfigError, match="larger than"):
        load_policy(big)


@pytest.mark.parametrize("args,needle", [
    (["--seed", "-1"], "--seed -1 is outside the range"),
    (["--budgets", "1" + "0" * 30], "--budgets"),
    (["--sinks", str(2**70)], "--sinks"),
    (["--window", str(2**64)], "--window"),
    (["--min-keys", str(2**64)], "--min-keys"),
    (["--reservoir-size", str(10**12)], "--reservoir-size"),
    (["--seq-len", str(10**9)], "--seq-len"),
    (["--batch-size", "100000"], "--batch-size"),
    (["--max-ppl-increase", "nan"], "--max-ppl-increase"),
    (["--eps", ",".join(f"0.{i:03d}1" for i in range(40))], "at most 32"),
    (["--export", ""], "--export is empty"),
    (["--out", ""], "--out is empty"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0"),
])
def test_option_values_beyond_their_range_are_usage_errors(capsys, args, needle):
    assert main(["smollm2-135m-instruct", *args]) == ExitCode.USAGE
    _one_error(capsys, needle)
