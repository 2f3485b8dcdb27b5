"""Checkpoints of a running audit, so ``--resume`` continues after Ctrl-C, a kill or a crash.

Every ``every`` sequences (at batch boundaries) the accumulator state of the current length is
written to ``<out>/.checkpoint/len-<n>.npz`` (numpy arrays only, never pickle) through a
temporary file and a rename, then ``progress.json`` records how many sequences of each length
are folded in. A fingerprint of the model, the configuration and the audited token ids guards
against resuming a different run. The directory is removed once the audit is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from attn_audit.errors import ConfigError
from attn_audit.result import atomic_write_text

DEFAULT_EVERY = 16


class Checkpointer:
    """Saves and restores per-length accumulator state under ``<out>/.checkpoint``."""

    def __init__(self, out: Path, every: int = DEFAULT_EVERY, resume: bool = False) -> None:
        self.dir = Path(out) / ".checkpoint"
        self.every = max(1, every)
        self.resume = resume
        self.fingerprint = ""

    def begin(self, fingerprint: str) -> None:
        """Check (when resuming) or reset the checkpoint directory for this run."""
        self.fingerprint = fingerprint
        meta = self._meta()
        if self.resume:
            if meta and meta.get("fingerprint") != fingerprint:
                raise ConfigError(
                    f"the checkpoint in {self.dir.parent} is from a different run (model, options or data "
                    "differ); rerun with the same options, or drop --resume to start over"
                )
            return
        if self.dir.exists():
            shutil.rmtree(self.dir)

    def _meta(self) -> dict[str, Any]:
        path = self.dir / "progress.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def done(self, seq_len: int) -> int:
        """Sequences of ``seq_len`` already folded into the saved state (0 when none)."""
        if not self.resume:
            return 0
        return int(self._meta().get("done", {}).get(str(seq_len), 0))

    def load(self, seq_len: int) -> dict[str, np.ndarray] | None:
        """The saved state of ``seq_len`` (or None)."""
        path = self.dir / f"len-{seq_len}.npz"
        if not self.resume or not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def save(self, seq_len: int, done: int, state: dict[str, np.ndarray]) -> None:
        """Write the state of ``seq_len`` after ``done`` sequences, atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".len-", suffix=".npz", dir=self.dir)
        os.close(fd)
        try:
            np.savez(tmp, **state)
            os.replace(tmp, self.dir / f"len-{seq_len}.npz")
        finally:
            Path(tmp).unlink(missing_ok=True)
        meta = self._meta() or {"fingerprint": self.fingerprint, "done": {}}
        meta["fingerprint"] = self.fingerprint
        meta["done"][str(seq_len)] = done
        atomic_write_text(self.dir / "progress.json", json.dumps(meta))

    def clear(self) -> None:
        """Remove the checkpoint after the audit was written."""
        shutil.rmtree(self.dir, ignore_errors=True)


def fingerprint(*parts: Any) -> str:
    """sha256 of the JSON of ``parts`` (sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
