"""One exception base and the documented exit codes.

The CLI catches only :class:`AttnAuditError` and prints its message as one line on stderr; any
other exception is a bug and keeps its traceback. Each subclass carries the exit code it maps to.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes (also listed in ``--help`` and the README)."""

    OK = 0  # the audit ran and every check passed
    CHECK_FAILED = 1  # the audit ran and at least one --fail-if / policy check failed
    USAGE = 2  # usage or configuration error (bad option, bad expression, bad policy)
    CANNOT_RUN = 3  # could not run: model, data, capture, output directory
    NOTHING_MEASURED = 4  # no row was measured; never counts as a pass
    INTERRUPTED = 130  # Ctrl-C


class AttnAuditError(Exception):
    """Base of every error a user can cause; ``str(err)`` is the one-line message."""

    exit_code: ExitCode = ExitCode.CANNOT_RUN


class ConfigError(AttnAuditError):
    """A bad option value or combination (detected before any model is loaded)."""

    exit_code = ExitCode.USAGE


class ModelLoadError(AttnAuditError):
    """The model could not be found or loaded."""


class UnsupportedFamilyError(AttnAuditError):
    """The architecture does not route attention through transformers' attention interface."""


class DatasetError(AttnAuditError):
    """The dataset is missing, empty, lacks the column, or holds too few tokens."""


class CaptureError(AttnAuditError):
    """Capturing Q/K failed or measured nothing."""


class OutputError(AttnAuditError):
    """The output directory cannot be written, or would overwrite an earlier audit."""


class ResultFileError(AttnAuditError):
    """A result file given to --load is missing, corrupt or from a newer schema."""

    exit_code = ExitCode.USAGE


class NothingMeasuredError(AttnAuditError):
    """The run finished but no row was measured."""

    exit_code = ExitCode.NOTHING_MEASURED
