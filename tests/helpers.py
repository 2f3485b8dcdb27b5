"""Shared ways to run the tool in a fresh process: the CLI, a Python snippet, and the checks on
what a refused run prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The environment of every subprocess: offline, quiet, this checkout first on the path.
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
}


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m attn_audit ARGS`` in a fresh process; stdout and stderr captured."""
    return subprocess.run([sys.executable, "-m", "attn_audit", *args], capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(env or {})}, cwd=cwd)


def run_python(code: str, timeout: float = 300, env: dict[str, str] | None = None,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -c CODE`` in a fresh process (from the repository root)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})}, cwd=ROOT, check=check)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    """The run exited with ``code`` and said why in exactly one ``attn-audit:`` line holding
    ``needle``, with no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("attn-audit:")]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], lines[0]
