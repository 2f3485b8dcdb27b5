"""torchrun with 2 CPU processes (gloo) gives the same audit.json as one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests import helpers
from tests.test_reliability import _close, _strip

pytestmark = pytest.mark.slow
ENV = {**helpers.ENV, "OMP_NUM_THREADS": "1"}


def _run(args: list[str], out, nproc: int) -> dict:
    if nproc == 1:
        cmd = [sys.executable, "-m", "attn_audit", *args, "--out", str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "attn_audit", *args, "--out", str(out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "audit.json").read_text())


def _exact_parts(result: dict) -> list:
    return [(h["layer"], h["head"], {k: (v["rows"], v["k_median"], v["k_p90"]) for k, v in h["sparsity"].items()})
            for h in result["heads"]]


@pytest.mark.parametrize(
    "model,extra",
    [
        ("all-minilm-l6-v2", ["--seq-len", "64", "--num-sequences", "6"]),
        ("smollm2-135m-instruct", ["--seq-len", "48", "--num-sequences", "4", "--rows-per-sequence", "16"]),
    ],
)
def test_two_gloo_processes_match_one(tmp_path, model, extra):
    args = [model, *extra, "--batch-size", "1", "--format", "json", "--quiet", "--reservoir-size", "128"]
    one = _run(args, tmp_path / "one", 1)
    two = _run(args, tmp_path / "two", 2)
    assert _exact_parts(one) == _exact_parts(two)  # counts and k figures: exactly equal
    _close(_strip(one), _strip(two))  # everything else: float tolerance
