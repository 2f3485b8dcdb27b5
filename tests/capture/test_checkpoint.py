"""Checkpoints are one atomic unit bound to their run: killed at every write step, a resume gives
the identical audit or a refusal; damaged, foreign or inconsistent checkpoints are refused."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from attn_audit.capture.checkpoint import Checkpointer, check_state
from attn_audit.errors import CheckpointError

VOLATILE = {"created", "elapsed_s", "tokens_per_s", "statistics_s", "stage_s", "total_s"}
TEXTS = [f"document {i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(40)) for i in range(40)]
STEPS = ("arrays-written", "arrays-renamed", "manifest-written", "manifest-renamed", "old-files-removed")


class Killed(BaseException):
    """Stands for SIGKILL: raised between two writes, caught by nothing in attn-audit."""


class Tok:
    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, batch, add_special_tokens=False):
        return {"input_ids": [[5 + (ord(c) % 120) for c in t] for t in batch]}


def _strip(d):
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in VOLATILE}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


@pytest.fixture(scope="module")
def model():
    import torch

    from tests.conftest import tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-layer toy: threads only add contention
    yield tiny_model("llama")
    torch.set_num_threads(threads)


def _config(**kw):
    from attn_audit import AuditConfig, MeasureSpec

    base = dict(seq_lens=(16, 24), num_sequences=2, batch_size=1, reservoir_size=16,
                measure=MeasureSpec(min_keys=4, budgets=(4, 8), window=8))
    base.update(kw)
    return AuditConfig(**base)


def _audit(model, out, resume=False, config=None, kill=None):
    from attn_audit import audit

    ck = Checkpointer(out, every=1, resume=resume)
    if kill is not None:
        calls = {"n": 0}

        def step(name):
            if name == kill[1]:
                calls["n"] += 1
                if calls["n"] == kill[0]:
                    raise Killed

        ck._step = step
    result = audit(model, Tok(), TEXTS, config or _config(), name="tiny", checkpoint=ck)
    return _strip(json.loads(result.to_json()))


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    return _audit(model, tmp_path_factory.mktemp("ref"))


def test_kill_at_every_write_step_then_resume_gives_the_same_audit(model, reference, tmp_path):
    """2 + 1 saves (the last batch of the last length is not saved) x 5 steps: every kill point."""
    points = [(n, step) for n in range(1, 4) for step in STEPS]
    for n, step in points:
        out = tmp_path / f"{step}-{n}"
        with pytest.raises(Killed):
            _audit(model, out, kill=(n, step))
        assert (out / ".checkpoint").is_dir()
        assert _audit(model, out, resume=True) == reference, (n, step)
        Checkpointer(out).clear()  # as the CLI does once the audit is written: no stray file stays
        assert not (out / ".checkpoint").exists()


def _killed_run(model, out, n=2):
    with pytest.raises(Killed):
        _audit(model, out, kill=(n, "old-files-removed"))
    return out / ".checkpoint"


@pytest.mark.parametrize("change", [
    dict(seed=1), dict(batch_size=2), dict(reservoir_size=32), dict(num_sequences=3),
])
def test_resume_after_a_changed_option_is_refused(model, tmp_path, change):
    _killed_run(model, tmp_path)
    with pytest.raises(CheckpointError, match="different run.*options"):
        _audit(model, tmp_path, resume=True, config=_config(**change))


def test_resume_after_changed_weights_dtype_or_data_is_refused(model, tmp_path):
    import torch

    from attn_audit import audit

    _killed_run(model, tmp_path)
    with torch.no_grad():
        w = model.model.layers[0].self_attn.q_proj.weight
        old = w[0, 0].item()
        w[0, 0] += 1e-3
        try:
            with pytest.raises(CheckpointError, match="weights"):
                _audit(model, tmp_path, resume=True)
        finally:
            w[0, 0] = old
    half = copy.deepcopy(model).to(torch.bfloat16)  # the same weights in another dtype
    with pytest.raises(CheckpointError, match="different run"):
        _audit(half, tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="data"):
        audit(model, Tok(), TEXTS[::-1], _config(), name="tiny", checkpoint=Checkpointer(tmp_path, 1, resume=True))
    assert _audit(model, tmp_path, resume=True)  # the untouched run still resumes


def _manifest(ckpt):
    return json.loads((ckpt / "manifest.json").read_text())


def test_damaged_foreign_or_inconsistent_checkpoints_are_refused(model, reference, tmp_path):
    ckpt = _killed_run(model, tmp_path / "a")
    m = _manifest(ckpt)
    arrays = ckpt / m["lengths"]["16"]["file"]
    # a flipped byte in the arrays
    raw = bytearray(arrays.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    arrays.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        _audit(model, tmp_path / "a", resume=True)
    # progress without its manifest, or a damaged manifest
    for text in ("{", '{"format": 2}', json.dumps({**m, "lengths": {"24": {"done": "3"}}}), "[" * 100000):
        ckpt = _killed_run(model, tmp_path / "b")
        (ckpt / "manifest.json").write_text(text)
        with pytest.raises(CheckpointError, match="damaged or incomplete"):
            _audit(model, tmp_path / "b", resume=True)
    # arrays without a manifest were never committed: the resume starts over, merging nothing
    ckpt = _killed_run(model, tmp_path / "d")
    (ckpt / "manifest.json").unlink()
    assert _audit(model, tmp_path / "d", resume=True) == reference
    # progress that is not on a batch boundary (a batch counted twice)
    ckpt = _killed_run(model, tmp_path / "c")
    m = _manifest(ckpt)
    m["lengths"]["16"]["done"] = 5
    (ckpt / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="inconsistent"):
        _audit(model, tmp_path / "c", resume=True)


def test_edited_arrays_that_broadcast_are_refused(model, tmp_path):
    ckpt = _killed_run(model, tmp_path)
    m = _manifest(ckpt)
    entry = m["lengths"]["16"]
    with np.load(ckpt / entry["file"]) as z:
        state = {k: z[k] for k in z.files}
    key = next(k for k, v in state.items() if v.ndim >= 1 and v.size > 1 and not k.startswith(("rows.", "tokens.", "row_logits.", "layers_seen")))
    state[key] = state[key][..., :1]  # still broadcasts into the accumulator's array
    import hashlib

    path = ckpt / entry["file"]
    np.savez(path, **state)
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    new = path.with_name(f"len-16-{entry['sha256'][:16]}.npz")
    path.rename(new)
    entry["file"] = new.name
    (ckpt / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=f"array {key} has shape"):
        _audit(model, tmp_path, resume=True)


def test_check_state_names_the_problem():
    t = {"a": np.zeros((2, 3), np.float32), "rows.prio": np.zeros(0, np.float64)}
    assert check_state({"a": np.zeros((2, 3), np.float32), "rows.prio": np.ones(5)}, t) == ""
    assert "dtype" in check_state({"a": np.zeros((2, 3), np.float64), "rows.prio": np.ones(5)}, t)
    assert "missing" in check_state({"rows.prio": np.ones(5)}, t)
    assert "unexpected" in check_state({**t, "b": np.ones(1)}, t)
    assert "axes" in check_state({"a": t["a"], "rows.prio": np.ones((5, 1))}, t)


def test_a_fresh_run_keeps_files_it_did_not_write(tmp_path):
    ck = tmp_path / ".checkpoint"
    ck.mkdir()
    (ck / "notes.txt").write_text("mine")
    (ck / "manifest.json").write_text("{}")
    Checkpointer(tmp_path).begin({"x": "1"})
    assert (ck / "notes.txt").read_text() == "mine" and not (ck / "manifest.json").exists()
