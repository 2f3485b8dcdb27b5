"""One exception base and the documented exit codes.

The CLI catches :class:`AttnAuditError` and prints its message as one line on stderr with the
subclass's exit code. Any other exception is a bug: the CLI prints one line naming it, points to
``--debug`` (which shows the traceback) and exits :attr:`ExitCode.INTERNAL`, never 1, so a CI job
reading 1 knows that a check failed and nothing else.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes (also listed in ``--help`` and the README)."""

    OK = 0  # the audit ran and every check passed
    CHECK_FAILED = 1  # the audit ran and at least one --fail-if / policy check failed
    USAGE = 2  # usage or configuration error (bad option, expression, policy, --load file)
    CANNOT_RUN = 3  # could not run: model, data, capture, checkpoint, output directory or files
    NOTHING_MEASURED = 4  # no row was measured; never counts as a pass (decided by the gate)
    INTERNAL = 5  # an unexpected exception: a bug in attn-audit (rerun with --debug)
    INTERRUPTED = 130  # Ctrl-C


class AttnAuditError(Exception):
    """Base of every error a user can cause; ``str(err)`` is the one-line message."""

    exit_code: ExitCode = ExitCode.CANNOT_RUN


class ConfigError(AttnAuditError, ValueError):
    """A bad option value or combination (detected before any model is loaded); also a
    ``ValueError``, so API callers that catch bad values the usual way catch it too."""

    exit_code = ExitCode.USAGE


class ModelLoadError(AttnAuditError):
    """The model could not be found or loaded."""


class UnsupportedFamilyError(AttnAuditError):
    """The architecture does not route attention through transformers' attention interface."""


class DatasetError(AttnAuditError):
    """The dataset is missing, empty, lacks the column, holds bad records or too few tokens."""


class CaptureError(AttnAuditError):
    """Capturing Q/K failed or measured nothing."""


class CheckpointError(AttnAuditError):
    """A checkpoint in ``--out`` is damaged, foreign (another run) or inconsistent."""


class OutputError(AttnAuditError):
    """``--out`` cannot be used: not a directory, not writable, locked by another run, holds files
    the run would overwrite without ``--force``, or a write failed (e.g. a full disk)."""


class ResultFileError(AttnAuditError):
    """A result file given to --load is missing, corrupt, malformed or from a newer schema."""

    exit_code = ExitCode.USAGE


def one_line(text: str, limit: int = 600) -> str:
    """``text`` as one printable line: control characters (newlines, ESC, ...) shown as escapes,
    cut to ``limit`` characters. Used for every message and every string from a loaded file that
    reaches a terminal or a Markdown report."""
    out = []
    for ch in str(text):
        code = ord(ch)
        if code < 0x20 or 0x7F <= code < 0xA0 or code in (0x2028, 0x2029) or 0x202A <= code <= 0x202E \
                or 0x2066 <= code <= 0x2069:
            out.append(repr(ch)[1:-1] if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    s = "".join(out)
    return s if len(s) <= limit else s[: limit - 3] + "..."
