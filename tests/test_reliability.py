"""Nothing is lost: kill and resume, determinism, atomic writes, non-finite values, pickle refusal."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}
VOLATILE = {"created", "elapsed_s", "tokens_per_s", "statistics_s", "stage_s", "total_s"}
ARGS = [
    "all-minilm-l6-v2",
    "--seq-len",
    "64",
    "--num-sequences",
    "24",
    "--batch-size",
    "2",
    "--checkpoint-every",
    "2",
    "--format",
    "json",
    "--quiet",
    "--reservoir-size",
    "256",
]


def _strip(d):
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in VOLATILE}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


def _close(a, b, path="$"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    proc = subprocess.run(
        [sys.executable, "-m", "attn_audit", *ARGS, "--out", str(out)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert not (out / ".checkpoint").exists()  # cleared after a finished run
    return json.loads((out / "audit.json").read_text())


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_audit(tmp_path, reference_run):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "attn_audit", *ARGS, "--out", str(out)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    progress = out / ".checkpoint" / "manifest.json"
    deadline = time.time() + 300
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if progress.exists():
            try:
                done = json.loads(progress.read_text())["lengths"]["64"]["done"]
            except (ValueError, KeyError):
                done = 0
            if done >= 4:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 4 <= done < 24
    assert not (out / "audit.json").exists()  # never a half-written result
    resumed = subprocess.run(
        [sys.executable, "-m", "attn_audit", *ARGS, "--out", str(out), "--resume"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    _close(_strip(json.loads((out / "audit.json").read_text())), _strip(reference_run))


@pytest.mark.slow
def test_same_inputs_and_seed_give_the_same_audit(tmp_path, reference_run):
    out = tmp_path / "again"
    proc = subprocess.run(
        [sys.executable, "-m", "attn_audit", *ARGS, "--out", str(out)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert _strip(json.loads((out / "audit.json").read_text())) == _strip(reference_run)


def test_resume_refuses_a_different_run(tmp_path):
    from attn_audit.capture.checkpoint import Checkpointer
    from attn_audit.errors import CheckpointError

    c = Checkpointer(tmp_path, resume=False)
    c.begin({"options": "aaa", "data": "d"})
    c.save(64, 2, {"x": torch.zeros(3).numpy()})
    with pytest.raises(CheckpointError, match=r"different run \(options differ\)"):
        Checkpointer(tmp_path, resume=True).begin({"options": "bbb", "data": "d"})
    c2 = Checkpointer(tmp_path, resume=True)
    c2.begin({"options": "aaa", "data": "d"})
    assert c2.done(64) == 2 and c2.load(64)["x"].shape == (3,)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    from attn_audit.errors import OutputError
    from attn_audit.result import atomic_write_text

    target = tmp_path / "audit.json"
    atomic_write_text(target, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OutputError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["audit.json"]  # no temp file left


def test_nonfinite_rows_are_counted_and_left_out(monkeypatch):
    """NaN in one head's Q (a broken checkpoint) drops only that head's rows, and the run finishes."""
    from attn_audit import AuditConfig, MeasureSpec, audit
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    layer0 = model.model.layers[0].self_attn
    with torch.no_grad():
        layer0.q_proj.weight[:16] = float("nan")  # head 0 of layer 0 (head_dim 16)
    texts = ["the quick brown fox jumps over the lazy dog and runs far away " * 8] * 6

    class Tok:
        eos_token_id = 1
        pad_token_id = 0

        def __call__(self, batch, add_special_tokens=False):
            return {"input_ids": [[5 + (ord(c) % 200) for c in t] for t in batch]}

    result = audit(
        model,
        Tok(),
        texts,
        AuditConfig(seq_lens=(48,), num_sequences=3, reservoir_size=32,
                    measure=MeasureSpec(rows_per_sequence=None, min_keys=4)),
        name="tiny-nan",
    )
    h0 = result.head(0, 0)
    assert h0["nonfinite_rows"] > 0 and h0["sparsity"]["0.05"]["rows"] == 0
    h1 = result.head(0, 1)
    assert h1["nonfinite_rows"] == 0 and h1["sparsity"]["0.05"]["rows"] > 0
    assert result.run["nonfinite_rows"] >= h0["nonfinite_rows"]


def test_pickle_weights_are_refused_without_allow_pickle(tmp_path):
    from attn_audit.errors import ModelLoadError
    from attn_audit.load import load_model
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle-based checkpoint
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_model(str(tmp_path))
