"""Checkpoints of a running audit, so ``--resume`` continues after Ctrl-C, a kill or a crash.

Layout of ``<out>/.checkpoint/``::

    manifest.json              the commit point: format, run fingerprint, and per length the
                               sequences folded in, the arrays file and its sha256
    len-<n>-<sha256[:16]>.npz  one length's accumulator state (numpy arrays only, never pickle)

A save writes the arrays to a new, content-named file, then replaces ``manifest.json`` (temporary
file, fsync, rename), then deletes the files the manifest no longer names. The manifest rename is
the one commit point: a kill before it leaves the previous manifest and the files it names intact;
a kill after it leaves the new state complete. Arrays and progress can never disagree.

The fingerprint binds a checkpoint to its run: the options, the model (its block in audit.json:
name, revision, dtype, shapes; and a digest of every parameter), the audited and held-out token
ids, and the versions of attn-audit, torch and transformers. On ``--resume`` each part is
compared; a mismatch, a missing or damaged manifest, a file whose sha256 differs, or an array
whose name, dtype or shape does not fit the accumulator is refused with one line
(:class:`CheckpointError`), never merged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from attn_audit.errors import CheckpointError, OutputError

DEFAULT_EVERY = 16
FORMAT = 2
MANIFEST = "manifest.json"
_OURS = re.compile(r"(manifest\.json|progress\.json|len-\d+(-[0-9a-f]{16})?\.npz|\..*\.tmp|\.len-.*\.npz)")
#: Accumulator state entries whose length grows with the data (reservoirs, sampled logits).
_VARIABLE = ("row_logits.", "tokens.", "rows.", "layers_seen")
_MAX_MANIFEST = 1 << 20


class Checkpointer:
    """Saves and restores per-length accumulator state under ``<out>/.checkpoint``."""

    def __init__(self, out: Path, every: int = DEFAULT_EVERY, resume: bool = False) -> None:
        self.dir = Path(out) / ".checkpoint"
        self.every = max(1, every)
        self.resume = resume
        self.parts: dict[str, str] = {}
        self.manifest: dict[str, Any] = {}

    # -- the run's identity -----------------------------------------------------------------
    def begin(self, parts: dict[str, str]) -> None:
        """Check (when resuming) or reset the checkpoint directory for the run named by ``parts``
        (component -> digest, see :func:`run_parts`)."""
        self.parts = dict(parts)
        if not self.resume:
            self._remove_ours()
            self.manifest = {}
            return
        if not (self.dir / MANIFEST).exists() and not (self.dir / MANIFEST).is_symlink():
            # nothing was committed (killed before the first manifest): start over; arrays files
            # that no manifest names are never read and go with the next save
            self.manifest = {}
            return
        manifest = self._read_manifest()
        differ = [k for k in sorted(set(manifest["run"]) | set(self.parts))
                  if manifest["run"].get(k) != self.parts.get(k)]
        if differ:
            raise CheckpointError(
                f"the checkpoint in {self.dir.parent} is from a different run ({', '.join(differ)} differ); "
                "rerun with the same model, options and data, or drop --resume and pass --force to start over"
            )
        self.manifest = manifest

    def _read_manifest(self) -> dict[str, Any]:
        path = self.dir / MANIFEST
        refuse = (f"the checkpoint in {self.dir.parent} is damaged or incomplete ({{}}); "
                  "drop --resume and pass --force to start over")
        try:
            if not path.is_file() or path.stat().st_size > _MAX_MANIFEST:
                raise CheckpointError(refuse.format(f"{MANIFEST} is not a file of at most 1 MB"))
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            raise CheckpointError(refuse.format(f"{MANIFEST} is not valid JSON")) from None
        ok = (isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("run"), dict)
              and all(isinstance(v, str) for v in data["run"].values()) and isinstance(data.get("lengths"), dict))
        if ok:
            for key, entry in data["lengths"].items():
                ok = ok and key.isdigit() and isinstance(entry, dict) and set(entry) == {"done", "file", "sha256"} \
                    and type(entry["done"]) is int and entry["done"] > 0 \
                    and isinstance(entry["file"], str) and re.fullmatch(r"len-\d+-[0-9a-f]{16}\.npz", entry["file"]) \
                    and isinstance(entry["sha256"], str) and entry["file"][:-4].endswith(entry["sha256"][:16])
        if not ok:
            raise CheckpointError(refuse.format(f"{MANIFEST} is not an attn-audit checkpoint manifest"))
        for entry in data["lengths"].values():
            if not (self.dir / entry["file"]).is_file():
                raise CheckpointError(refuse.format(f"{entry['file']} is missing"))
        return data

    # -- reading ------------------------------------------------------------------------------
    def done(self, seq_len: int) -> int:
        """Sequences of ``seq_len`` already folded into the saved state (0 when none)."""
        entry = self.manifest.get("lengths", {}).get(str(seq_len))
        return int(entry["done"]) if entry else 0

    def load(self, seq_len: int, template: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray] | None:
        """The saved state of ``seq_len`` (or None), its sha256 and, given the ``template`` of a
        fresh accumulator, every array's name, dtype and shape checked."""
        entry = self.manifest.get("lengths", {}).get(str(seq_len))
        if not self.resume or not entry:
            return None
        path = self.dir / entry["file"]
        refuse = f"the checkpoint file {path} is damaged or was changed ({{}}); drop --resume and pass --force to start over"
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(refuse.format(exc.strerror)) from None
        if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            raise CheckpointError(refuse.format("its sha256 differs from the manifest"))
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                state = {k: z[k] for k in z.files}
        except Exception as exc:  # noqa: BLE001 - zipfile and numpy raise many kinds
            raise CheckpointError(refuse.format(type(exc).__name__)) from None
        if template is not None:
            problem = check_state(state, template)
            if problem:
                raise CheckpointError(refuse.format(problem))
        return state

    # -- writing ------------------------------------------------------------------------------
    def save(self, seq_len: int, done: int, state: dict[str, np.ndarray]) -> None:
        """Commit the state of ``seq_len`` after ``done`` sequences (see the module docstring)."""
        try:
            self._save(seq_len, done, state)
        except OSError as exc:
            raise OutputError(f"cannot write the checkpoint in {self.dir}: {exc.strerror}") from None

    def _save(self, seq_len: int, done: int, state: dict[str, np.ndarray]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".len-", suffix=".tmp", dir=self.dir)
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **state)
            fh.flush()
            os.fsync(fh.fileno())
        self._step("arrays-written")
        digest = _sha256_file(Path(tmp))
        name = f"len-{seq_len}-{digest[:16]}.npz"
        os.replace(tmp, self.dir / name)
        self._step("arrays-renamed")
        lengths = dict(self.manifest.get("lengths", {}))
        lengths[str(seq_len)] = {"done": int(done), "file": name, "sha256": digest}
        manifest = {"format": FORMAT, "run": self.parts, "lengths": lengths}
        fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=self.dir)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(manifest, sort_keys=True))
            fh.flush()
            os.fsync(fh.fileno())
        self._step("manifest-written")
        os.replace(tmp, self.dir / MANIFEST)  # the commit point
        self.manifest = manifest
        self._step("manifest-renamed")
        keep = {e["file"] for e in lengths.values()} | {MANIFEST}
        for p in self.dir.iterdir():
            if p.name not in keep and _OURS.fullmatch(p.name):
                p.unlink(missing_ok=True)
        self._step("old-files-removed")

    def _step(self, name: str) -> None:
        """A point between two writes; tests replace it to kill the run exactly there."""

    def _remove_ours(self) -> None:
        """Delete the files attn-audit writes here (not a user's), then the folder if empty."""
        if not self.dir.is_dir():
            return
        for p in self.dir.iterdir():
            if _OURS.fullmatch(p.name) and p.is_file():
                p.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass  # files that are not ours stay

    def clear(self) -> None:
        """Remove the checkpoint after the audit was written."""
        self._remove_ours()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_state(state: dict[str, np.ndarray], template: dict[str, np.ndarray]) -> str:
    """'' when ``state`` fits ``template`` (the state of a fresh accumulator of the same run),
    else what does not: a missing or extra array, another dtype, another shape (fixed-size arrays
    must match exactly; growing ones, such as reservoirs, in dtype, rank and trailing axes)."""
    for key, want in template.items():
        if key not in state:
            return f"array {key} is missing"
        got = state[key]
        if got.dtype != want.dtype:
            return f"array {key} has dtype {got.dtype}, expected {want.dtype}"
        if key.startswith(_VARIABLE):
            if got.ndim != want.ndim:
                return f"array {key} has {got.ndim} axes, expected {want.ndim}"
        elif got.shape != want.shape:
            return f"array {key} has shape {got.shape}, expected {want.shape}"
    for key, got in state.items():
        if key in template:
            continue
        if not key.startswith(_VARIABLE):
            return f"unexpected array {key}"
        if got.dtype.kind not in "fiub" or got.ndim > 4:
            return f"array {key} has dtype {got.dtype} and {got.ndim} axes"
    return ""


def digest(value: Any) -> str:
    """sha256 of the JSON of ``value`` (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def model_digest(model: Any) -> str:
    """A digest of the weights: every parameter's and buffer's name, dtype, shape, float64 sum and
    sum of absolute values. Weights changed at the same path change it; O(parameters) reads."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        named = list(model.named_parameters()) + list(model.named_buffers())
        for name, t in named:
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel() and (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
                s = torch.sum(t, dtype=torch.float64).item()
                a = torch.sum(t.abs(), dtype=torch.float64).item() if t.is_floating_point() else 0.0
                h.update(f"{s!r}|{a!r};".encode())
    return h.hexdigest()


def run_parts(info: dict[str, Any], options: dict[str, Any], model: Any, token_hash: str, held_out_hash: str) -> dict[str, str]:
    """The run's identity in parts, compared one by one on ``--resume`` so the refusal names what changed."""
    from attn_audit import __version__

    try:
        import torch
        import transformers

        versions = f"attn-audit {__version__}, torch {torch.__version__}, transformers {transformers.__version__}"
    except ImportError:  # pragma: no cover
        versions = f"attn-audit {__version__}"
    return {
        "options": digest(options),
        "model": digest(info),
        "weights": model_digest(model),
        "data": digest([token_hash, held_out_hash]),
        "versions": versions,
    }
