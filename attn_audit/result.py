"""The audit result: a versioned, plain-JSON record that every later step reads.

Capture and analysis produce an :class:`AuditResult`; reports, the gate and the runtime exports
only ever see this object (or the ``audit.json`` it was saved to), so ``attn-audit --load`` can
re-render and re-gate without torch or the model. This module imports only the standard library.

Schema (``schema_version`` 1). Keys marked (opt) may be absent.

``model``
    ``name`` (str, as the user gave it), ``source`` ("alias" | "hub" | "local" | "gguf" | "object"),
    ``family`` (config ``model_type``), ``num_layers``, ``num_heads`` (query heads),
    ``num_kv_heads``, ``head_dim``, ``causal`` (bool), ``max_positions`` (int | null),
    ``rope`` (bool), ``sliding_window`` (int | null), ``dtype`` (str), ``revision`` (str | null),
    ``trust_remote_code`` (bool).
``run``
    ``seq_len`` (int, the primary length whose figures fill ``heads[].sparsity``), ``seq_lens``
    (list[int], every length audited), ``num_sequences`` (per length), ``eps`` (list[float]),
    ``eps_keys`` (list[str], the keys used in ``sparsity``, written as the user typed them),
    ``min_keys``, ``rows`` ("all" | "sampled"), ``rows_per_sequence`` (int | null when all),
    ``seed``, ``budgets`` (list[int]), ``sinks`` (int), ``window`` (int), ``batch_size``,
    ``device``, ``sites`` (list[str] of captured sites, e.g. ["q_rot", "k_rot", "q", "k"]),
    ``capture_point`` (str), ``reservoir_size`` (int), ``versions`` (dict name -> version),
    ``dataset`` (dict: ``spec``, ``kind`` ("text" | "input_ids"), ``split``, ``text_column``,
    ``documents``, ``tokens``, ``token_hash`` (sha256 of the audited token ids)),
    ``elapsed_s`` (data and capture), ``statistics_s`` (assembling the statistics), ``tokens_per_s``,
    ``nonfinite_rows`` (int), ``created`` (ISO time), ``stage_s`` (wall seconds per stage: ``load``,
    ``capture``, ``statistics``, ``theory``, ``rank``, ``verify``, ``render``; 0 for a stage not run
    in that call) and ``total_s`` (their sum, as contiguous laps).
``heads``: one record per (layer, query head), ordered by (layer, head):
    ``layer``, ``head``, ``kv_head`` (ints); ``sparsity`` keyed by eps key, each
    ``{k_mean, k_median, k_p90, kfrac_mean, rows, ci: {k_mean: [lo, hi], kfrac_mean: [lo, hi]},
    by_position: [{lo, hi, rows, k_mean, kfrac_mean}]}``; ``tail_mass`` keyed by budget (str)
    -> mean tail mass; ``entropy_mean``, ``participation_mean``, ``sink_mass_mean``,
    ``local_mass_mean``, ``bulk_mass_mean``; ``R`` ``{logit_range, qk_bound, max_q_norm,
    max_k_norm, scale, ...}``; ``gaussianity`` ``{site: {verdict, skewness, excess_kurtosis,
    anderson, ks_distance, ...}}`` keyed by site ("q", "k", and "q_pre_rope", "k_pre_rope"
    where RoPE applies); (opt) ``theory``; (opt) ``by_length`` keyed by seq_len (str) with the
    ``sparsity`` block of that length; (opt) ``scaling`` ``{C, C_ci, alpha, ...}``;
    ``flags`` (list[str]); ``score`` (float) and ``rank`` (int, 1 = first to make sparse).
``ranking``: list of ``{layer, head, kv_head, score, rank, reason}``, best first.
(opt) ``plan``, ``verify``, ``theory_summary``, ``gate``, ``exports``: added by later steps.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attn_audit.config import primary_eps_index
from attn_audit.errors import OutputError, ResultFileError

SCHEMA_VERSION = 1
# Changelog:
#   1 - first version (foundation).

REQUIRED_TOP = ("schema_version", "model", "run", "heads", "ranking")


def finite_or_none(x: Any) -> float | None:
    """``float(x)``, or None where it is NaN or infinite (strict JSON has neither)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _clean(value: Any) -> Any:
    """Recursively turn a value into strict JSON types (NaN/inf become None)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _clean(value.item())
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays
        return _clean(value.tolist())
    return value


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written).

    Raises:
        OutputError: the file cannot be written (a full disk, no permission); the old file stays.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


@dataclass
class AuditResult:
    """An audit as plain data. ``data`` follows the schema in this module's docstring."""

    data: dict[str, Any] = field(default_factory=dict)

    # -- accessors -------------------------------------------------------------------------
    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def run(self) -> dict[str, Any]:
        return self.data["run"]

    @property
    def heads(self) -> list[dict[str, Any]]:
        return self.data["heads"]

    @property
    def ranking(self) -> list[dict[str, Any]]:
        return self.data["ranking"]

    def head(self, layer: int, head: int) -> dict[str, Any]:
        """The record of query head ``head`` in layer ``layer``."""
        for rec in self.heads:
            if rec["layer"] == layer and rec["head"] == head:
                return rec
        raise KeyError(f"no head L{layer}.H{head}")

    @property
    def primary_eps_key(self) -> str:
        """The eps used for ranking and plans: 0.05 when audited, else the middle one."""
        keys: list[str] = self.run["eps_keys"]
        return keys[primary_eps_index([float(k) for k in keys])]

    @property
    def rows_measured(self) -> int:
        """Query rows counted in the aggregates, over all heads (0 means nothing was measured)."""
        key = self.run["eps_keys"][0] if self.run.get("eps_keys") else None
        if key is None:
            return 0
        return sum(int(h["sparsity"].get(key, {}).get("rows", 0) or 0) for h in self.heads)

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A deep copy in strict JSON types."""
        out: dict[str, Any] = _clean(self.data)
        out["schema_version"] = SCHEMA_VERSION
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result atomically to ``path`` (a file, usually ``<out>/audit.json``)."""
        return atomic_write_text(path, self.to_json())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> AuditResult:
        """Validate the top-level shape and schema version, then wrap ``data``."""
        if not isinstance(data, dict):
            raise ResultFileError(f"{source} is not an attn-audit result (top level is not an object)")
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise ResultFileError(f"{source} has no integer schema_version; is it an audit.json?")
        if version > SCHEMA_VERSION:
            raise ResultFileError(
                f"{source} has schema_version {version}, newer than this attn-audit understands "
                f"({SCHEMA_VERSION}); upgrade attn-audit to read it"
            )
        missing = [k for k in REQUIRED_TOP if k not in data]
        if missing:
            raise ResultFileError(f"{source} lacks required field(s) {', '.join(missing)}")
        return cls(data=data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AuditResult:
        """Read an untrusted ``audit.json``: a regular file of at most 256 MB, strict UTF-8 JSON,
        then every field checked (:mod:`attn_audit.schema`); raises :class:`ResultFileError` with
        a one-line reason."""
        from attn_audit import schema
        from attn_audit.outdir import regular_file

        p = regular_file(path, "--load file", ResultFileError)
        try:
            if p.stat().st_size > schema.MAX_BYTES:
                raise ResultFileError(f"{p} is larger than {schema.MAX_BYTES >> 20} MB; is it an audit.json?")
            text = p.read_bytes().decode("utf-8")
        except OSError as exc:
            raise ResultFileError(f"cannot read {p}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ResultFileError(f"{p} is not UTF-8 text (byte {exc.start}); is it an audit.json?") from None

        def no_constant(name: str) -> Any:
            raise ValueError(f"{name} is not strict JSON")

        try:
            data = json.loads(text, parse_constant=no_constant)
        except json.JSONDecodeError as exc:
            raise ResultFileError(
                f"{p} is not valid JSON (line {exc.lineno}); it may be truncated or corrupt, re-run the audit"
            ) from None
        except (ValueError, RecursionError) as exc:
            what = "nests too deeply" if isinstance(exc, RecursionError) else f"is not valid JSON ({exc})"
            raise ResultFileError(f"{p} {what}; is it an audit.json written by attn-audit?") from None
        schema.check_bounds(data, str(p))
        result = cls.from_dict(data, source=str(p))
        schema.validate(result.data, str(p))
        return result
