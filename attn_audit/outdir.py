"""The output directory: where the default ``--out`` goes, which files a run will write, the
refusal to overwrite any of them without ``--force`` and the lock that keeps two runs out of
one directory (stdlib only).

Every check here runs before any work: a run that is refused leaves ``--out`` as it found it.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from attn_audit.errors import OutputError

DEFAULT_ROOT = Path("attn-audit-out")
CHECKPOINT_DIR = ".checkpoint"
LOCK_NAME = ".attn-audit.lock"


def slug(name: str) -> str:
    """A file-system-safe, non-hidden name for a model id or path ('' and dots become 'model')."""
    base = Path(name).name if ("/" in name and Path(name).exists()) else name
    text = re.sub(r"[^A-Za-z0-9._-]+", "__", base).strip("_").lstrip(".-")
    return text[:100] or "model"


def default_out(name: str) -> Path:
    """``attn-audit-out/<slug>``; never resolves outside the working directory's attn-audit-out/."""
    out = DEFAULT_ROOT / slug(name)
    root = DEFAULT_ROOT.resolve()
    if not out.resolve().is_relative_to(root) or out.resolve() == root:
        raise OutputError(f"the default --out {out} leads outside {DEFAULT_ROOT}/; pass --out")
    return out


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def check_out_dir(out: Path, planned: Iterable[str], *, force: bool, resume: bool) -> None:
    """Refuse before any work if ``out`` cannot hold the run's files or would lose one.

    A file the run writes may already exist only with ``--force``, or with ``--resume`` when an
    interrupted run's checkpoint is there to continue. A checkpoint folder is left alone unless
    ``--resume`` (continue it) or ``--force`` (start over) is given.
    """
    if _exists(out) and not out.is_dir():
        raise OutputError(f"--out {out} is not a directory; give a directory")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out} is not writable; choose another directory")
    ckpt = out / CHECKPOINT_DIR
    has_ckpt = _exists(ckpt)
    committed = (ckpt / "manifest.json").is_file()  # an interrupted run of attn-audit to continue
    if has_ckpt and not ckpt.is_dir():
        raise OutputError(f"{ckpt} is not a directory; remove it or choose another --out")
    if has_ckpt and not (resume or force):
        raise OutputError(
            f"--out {out} holds the checkpoint of an interrupted run; pass --resume to continue it "
            "or --force to start over"
        )
    for rel in planned:
        path = out / rel
        for parent in path.relative_to(out).parents:
            p = out / parent
            if parent != Path(".") and _exists(p) and not p.is_dir():
                raise OutputError(f"{p} is not a directory but the run writes {path}; remove it or choose another --out")
        if not _exists(path):
            continue
        if path.is_dir() and not path.is_symlink():
            raise OutputError(f"{path} is a directory but the run writes a file there; choose another --out")
        if not (force or (resume and committed)):
            raise OutputError(f"--out {out} already holds {rel}; pass --force to overwrite it")


def regular_file(path: str | os.PathLike[str], what: str, error: type[Exception]) -> Path:
    """``path`` if it names a regular file (after symlinks); else ``error`` with one line.

    A FIFO, a device or a directory would block or fail on read; it is refused before opening.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise error(f"{what} {p} does not exist") from None
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {p} is a directory; give a file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {p} is not a regular file (a FIFO, socket or device); give a file")
    return p


class OutLock:
    """An exclusive lock on ``<out>/.attn-audit.lock`` (``flock``) held for the whole run, so a
    second run into the same ``--out`` is refused. The kernel drops it when the process dies."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> OutLock:
        import fcntl

        self.created = not _exists(self.out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot use --out {self.out}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the file may have been removed by the run that held it just before we locked it
            same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
        except OSError:
            same = False
        if not same:
            os.close(fd)
            raise OutputError(
                f"--out {self.out} is in use by another attn-audit run; wait for it or choose another --out"
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
            if self.created:
                self.out.rmdir()  # a refused or failed run leaves no empty folder behind
        except OSError:
            pass  # not empty: the run wrote its files
        finally:
            os.close(self.fd)
            self.fd = None
