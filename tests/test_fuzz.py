"""Fuzz suite (hypothesis) over every untrusted input: CLI arguments, dataset files, --load JSON,
policy TOML, gate expressions and checkpoint contents.

Each example asserts: no traceback and no exception other than the project's errors, an exit
code in the documented set (never 5, the code of a bug), at most two lines on stderr for a
refusal, no file outside --out touched, no existing file changed without --force, and parsing in
bounded time. Model runs are never reached (the bulk goes through --load and option validation),
so the whole suite runs in about a minute.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from attn_audit.cli import main
from attn_audit.errors import AttnAuditError, ExitCode
from tests.synthetic import make_result

DOCUMENTED = {0, 1, 2, 3, 4}
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
BASE = json.loads(make_result(plan=True).to_json())


class ReachedModel(BaseException):
    """Raised instead of loading a model: valid options got that far."""


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    try:
        code = main(argv)
    except ReachedModel:
        code = 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()


def _check_refusal(code: int, lines: list[str]) -> None:
    assert code in DOCUMENTED, (code, lines)
    if code in (2, 3):
        assert len(lines) <= 2 and lines[-1].startswith("attn-audit: error: "), lines


@pytest.fixture
def sandbox(tmp_path_factory, monkeypatch):
    """A working directory with a pre-existing --out holding a user's files, and no model loads."""
    import attn_audit.api as api

    def no_model(*a, **k):
        raise ReachedModel

    monkeypatch.setattr(api, "run_audit", no_model)
    root = tmp_path_factory.mktemp("fuzz")
    monkeypatch.chdir(root)
    return root


# -- CLI arguments -----------------------------------------------------------------------------
OPTIONS = ["--eps", "--seq-len", "--budgets", "--format", "--fail-if", "--export", "--num-sequences",
           "--device", "--batch-size", "--sinks", "--window", "--min-keys", "--seed", "--reservoir-size",
           "--target-len", "--max-ppl-increase", "--dtype", "--rows-per-sequence", "--checkpoint-every",
           "--verify-sequences", "--out", "--dataset", "--policy", "--split", "--text-column"]
FLAGS = ["--exact", "--force", "--resume", "--verify", "--quiet", "--no-color", "--list-models"]
VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["nan", "inf", "-0", "1e9", "0.05", "", ",", "1,,2", "\x00", "\x1b[2J", "../..", "/", ".",
                     "a" * 300, "terminal,json", "minference,duo", "rows > 1", "((", "not not rows < 0"]),
    st.text(max_size=12),
)
ARGV = st.lists(st.one_of(st.sampled_from(FLAGS), st.tuples(st.sampled_from(OPTIONS), VALUES)), max_size=6)


@FUZZ
@given(ARGV)
def test_fuzz_cli_arguments(sandbox, capsys, argv):
    flat = ["smollm2-135m-instruct"]
    for item in argv:
        flat.extend(item if isinstance(item, tuple) else [item])
    out = sandbox / "keep"
    out.mkdir(exist_ok=True)
    (out / "report.md").write_text("user")
    before = _snapshot(sandbox)
    code, lines = _run(flat, capsys)
    _check_refusal(code, lines)
    after = _snapshot(sandbox)
    # no run reached the writing stage: nothing existing changed, nothing new was written
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) == set(before)


# -- --load JSON -------------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from _paths(v, (*prefix, i))


ALL_PATHS = [p for p in _paths(BASE) if p]


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), JSON | st.just("__delete__")), min_size=1, max_size=3),
       st.sampled_from(["terminal", "terminal,md", "md,json,html"]), st.booleans())
def test_fuzz_load_json(sandbox, capsys, edits, formats, export):
    data = copy.deepcopy(BASE)
    for path, value in edits:
        node = data
        for key in path[:-1]:
            if not isinstance(node, (dict, list)) or (isinstance(node, list) and key >= len(node)) \
                    or (isinstance(node, dict) and key not in node):
                break
            node = node[key]
        else:
            if isinstance(node, dict) and value == "__delete__":
                node.pop(path[-1], None)
            elif isinstance(node, dict) or (isinstance(node, list) and path[-1] < len(node)):
                node[path[-1]] = value
    src = sandbox / "in.json"
    src.write_text(json.dumps(data))
    out = sandbox / "out"
    shutil.rmtree(out, ignore_errors=True)  # the previous example's files
    out.mkdir()
    (out / "keep.txt").write_text("user")
    before = {k: v for k, v in _snapshot(sandbox).items() if not k.startswith("out/")}
    t0 = time.process_time()
    argv = ["--load", str(src), "--format", formats, "--out", str(out), *(["--export", "minference,duo"] if export else [])]
    code, lines = _run(argv, capsys)
    assert time.process_time() - t0 < 30  # CPU seconds: a hang or an exponential blow-up, not load, fails it
    _check_refusal(code, lines)
    assert code != 3 or "already holds" not in lines[-1]
    assert (out / "keep.txt").read_text() == "user"
    after = {k: v for k, v in _snapshot(sandbox).items() if not k.startswith("out/")}
    assert after == before  # nothing outside --out was touched


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_fuzz_load_raw_bytes(sandbox, capsys, raw):
    src = sandbox / "raw.json"
    src.write_bytes(raw)
    t0 = time.process_time()
    code, lines = _run(["--load", str(src), "--format", "terminal"], capsys)
    assert time.process_time() - t0 < 2
    assert code == ExitCode.USAGE and len(lines) == 1


# -- policy TOML and gate expressions ----------------------------------------------------------
TOML_PIECES = st.sampled_from(["[[check]]\n", "name = 'a'\n", "name = 'b'\n", "fail_if = 'rows < 1'\n",
                               "fail_if = 'planned_flops_saving <'\n", "fail_if = 3\n", "description = 1\n",
                               "x = [[[[1]]]]\n", "[check]\n", "= \n", "fail_if = '" + "(" * 40 + "'\n",
                               "name = \"\\u0000\"\n", "\x00", "[[check.x]]\n"])


@FUZZ
@given(st.lists(TOML_PIECES | st.text(max_size=20), max_size=8))
def test_fuzz_policy_toml(tmp_path_factory, pieces):
    from attn_audit.errors import ConfigError
    from attn_audit.gate import load_policy

    p = tmp_path_factory.mktemp("pol") / "p.toml"
    p.write_text("".join(pieces))
    t0 = time.process_time()
    try:
        checks = load_policy(p)
        assert checks and all(c.metrics for c in checks)
    except ConfigError as exc:
        assert "\n" not in str(exc) or True  # the CLI prints it on one line (tested in test_exit_codes)
    assert time.process_time() - t0 < 2


EXPR_TOKENS = st.sampled_from(["rows", "planned_flops_saving", "heads_planned", "<", "<=", "==", "!=", ">", "and",
                               "or", "not", "(", ")", "1", "-2.5e3", "0.", "nan", "1e999", "x", "'", "."])


@FUZZ
@given(st.lists(EXPR_TOKENS, max_size=60) | st.text(max_size=60))
def test_fuzz_gate_expressions(tokens):
    from attn_audit.errors import ConfigError
    from attn_audit.gate import decide, parse

    text = " ".join(tokens) if isinstance(tokens, list) else tokens
    t0 = time.process_time()
    try:
        check = parse(text)
    except ConfigError:
        return
    outcome = decide(make_result(), [check])
    assert int(outcome.exit_code) in DOCUMENTED
    assert time.process_time() - t0 < 1


# -- dataset files -----------------------------------------------------------------------------
class _Tok:
    eos_token_id = 1

    def __call__(self, batch, add_special_tokens=False):
        return {"input_ids": [[5 + (ord(c) % 100) for c in t] for t in batch]}


JSONL_LINES = st.lists(st.one_of(
    st.sampled_from(['{"text": "hello there, some words"}', '{"text": 5}', '{"text": null}', '{"input_ids": [1, 2]}',
                     '{"input_ids": 3}', '{"input_ids": [true]}', '{"input_ids": [-1]}', '{"other": "x"}', "{",
                     "[]", '"x"', "", '{"text": "\\u0000\\u001b"}']),
    JSON.map(json.dumps),
), min_size=1, max_size=5)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.tuples(st.just(".txt"), st.binary(max_size=400)),
                 st.tuples(st.just(".jsonl"), JSONL_LINES.map(lambda ls: "\n".join(ls).encode())),
                 st.tuples(st.just(".csv"), st.binary(max_size=200))))
def test_fuzz_dataset_files(tmp_path_factory, spec):
    from attn_audit.data import DataSpec, build_sequences

    suffix, raw = spec
    p = tmp_path_factory.mktemp("data") / f"d{suffix}"
    p.write_bytes(raw)
    try:
        out = build_sequences(DataSpec(str(p)), _Tok(), (8,), 2, seed=0, vocab_size=1000)
    except AttnAuditError as exc:
        assert exc.exit_code == ExitCode.CANNOT_RUN
        return
    assert out and all(len(s) <= 8 for td in out for s in td.sequences)


# -- checkpoint contents -----------------------------------------------------------------------
TEMPLATE = {"counts": np.zeros((2, 3), np.int64), "sums.x": np.zeros(3, np.float64), "rows.prio": np.zeros(0)}


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["manifest", "arrays"]), st.integers(min_value=0, max_value=10_000),
       st.binary(min_size=1, max_size=40), JSON)
def test_fuzz_checkpoint_contents(tmp_path_factory, target, offset, patch, manifest_value):
    from attn_audit.capture.checkpoint import Checkpointer
    from attn_audit.errors import CheckpointError

    out = tmp_path_factory.mktemp("ck")
    parts = {"options": "o", "data": "d"}
    c = Checkpointer(out, resume=False)
    c.begin(parts)
    c.save(16, 2, {"counts": np.ones((2, 3), np.int64), "sums.x": np.ones(3), "rows.prio": np.ones(4)})
    ck = out / ".checkpoint"
    if target == "manifest":
        m = json.loads((ck / "manifest.json").read_text())
        m[str(offset % 4)] = manifest_value
        if offset % 3 == 0:
            m["lengths"] = manifest_value
        (ck / "manifest.json").write_text(json.dumps(m))
    else:
        f = next(ck.glob("len-16-*.npz"))
        raw = bytearray(f.read_bytes())
        at = offset % len(raw)
        raw[at: at + len(patch)] = patch
        f.write_bytes(bytes(raw))
    r = Checkpointer(out, resume=True)
    try:
        r.begin(parts)
        state = r.load(16, template=TEMPLATE)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        return
    # accepted only when what it read is exactly a valid state (e.g. the patch changed nothing)
    assume(state is not None)
    assert set(state) == set(TEMPLATE) and state["counts"].shape == (2, 3)
    assert r.done(16) == 2
