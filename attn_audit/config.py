"""Run configuration: one frozen dataclass, validated before any model is loaded."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from attn_audit.errors import ConfigError

DEVICES = ("cpu", "cuda", "auto")


PRIMARY_EPS = 0.05


def primary_eps_index(eps: Sequence[float]) -> int:
    """Index of the eps that ranks heads and sizes plans: 0.05 when audited, else the middle one."""
    for i, e in enumerate(eps):
        if math.isclose(float(e), PRIMARY_EPS):
            return i
    return len(eps) // 2


@dataclass(frozen=True)
class MeasureSpec:
    """What is measured on every query row: one object, built once from the options, validated
    here, and passed unchanged to the accumulator and the row kernels.

    eps: tail-mass levels in (0, 1). Strings are kept as written (``"0.050"``) as the keys of
        ``heads[].sparsity`` in audit.json; floats get their shortest repr. Everything else
        addresses eps by index into this tuple.
    budgets: top-k budgets for the tail mass.
    sinks: leading key positions treated as attention sinks (0 allowed).
    window: local window; key j is local for a query at q if ``q - window < j <= q``.
    min_keys: rows with fewer allowed keys are left out of the aggregates.
    rows_per_sequence: query rows sampled per sequence; None measures every row (``--exact``).
    """

    eps: tuple[float, ...] = (0.01, 0.05, 0.1)
    budgets: tuple[int, ...] = (16, 64, 256)
    sinks: int = 1
    window: int = 64
    min_keys: int = 16
    rows_per_sequence: int | None = 256
    eps_keys: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        raw = tuple(self.eps)
        if not raw:
            raise ConfigError("--eps is empty; give values like 0.01,0.05,0.1")
        keys = tuple(e.strip() if isinstance(e, str) else repr(float(e)) for e in raw)
        values = []
        for k in keys:
            try:
                v = float(k)
            except ValueError:
                raise ConfigError(f"--eps {k!r} is not a number; use values like 0.01,0.05,0.1") from None
            if not 0.0 < v < 1.0:
                raise ConfigError(f"--eps {k} is outside (0, 1); use values like 0.01,0.05,0.1")
            values.append(v)
        if len(set(values)) != len(values):
            raise ConfigError(f"--eps lists a value twice: {','.join(keys)}")
        object.__setattr__(self, "eps", tuple(values))
        object.__setattr__(self, "eps_keys", keys)
        object.__setattr__(self, "budgets", tuple(int(b) for b in self.budgets))
        for b in self.budgets:
            if b < 1:
                raise ConfigError(f"--budgets {b} must be a positive number of keys")
        checks = [
            (self.min_keys >= 1, f"--min-keys {self.min_keys} must be at least 1"),
            (self.rows_per_sequence is None or self.rows_per_sequence >= 1,
             f"--rows-per-sequence {self.rows_per_sequence} must be at least 1"),
            (self.sinks >= 0, f"--sinks {self.sinks} must be 0 or more"),
            (self.window >= 0, f"--window {self.window} must be 0 or more"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def exact(self) -> bool:
        """Every query row is measured."""
        return self.rows_per_sequence is None

    @property
    def primary_eps(self) -> int:
        """Index of the primary eps (:func:`primary_eps_index`)."""
        return primary_eps_index(self.eps)


@dataclass(frozen=True)
class AuditConfig:
    """Everything an audit needs besides the model and the data; validated on construction."""

    seq_lens: tuple[int, ...] = (512,)
    num_sequences: int = 16
    batch_size: int = 4
    seed: int = 0
    measure: MeasureSpec = field(default_factory=MeasureSpec)
    reservoir_size: int = 2048
    device: str = "cpu"
    target_len: int | None = None
    verify: bool = False
    max_ppl_increase: float = 0.01
    verify_sequences: int = 4
    retrieval_samples: int = 4
    retrieval_lens: tuple[int, ...] = ()
    check_config: str | None = None
    measure_speed: bool = False

    @property
    def seq_len(self) -> int:
        """The primary length (the longest), whose figures fill ``heads[].sparsity``."""
        return max(self.seq_lens)

    def __post_init__(self) -> None:
        """Raise :class:`ConfigError` on the first bad value."""
        object.__setattr__(self, "seq_lens", tuple(int(n) for n in self.seq_lens))
        object.__setattr__(self, "retrieval_lens", tuple(int(n) for n in self.retrieval_lens))
        if not self.seq_lens:
            raise ConfigError("--seq-len is empty; give at least one length (e.g. 512)")
        for n in self.seq_lens:
            if n < 2:
                raise ConfigError(f"--seq-len {n} is too short; use at least 2 tokens (e.g. 512)")
        if len(set(self.seq_lens)) != len(self.seq_lens):
            raise ConfigError(f"--seq-len lists a length twice: {','.join(map(str, self.seq_lens))}")
        checks = [
            (self.num_sequences >= 1, f"--num-sequences {self.num_sequences} must be at least 1"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size} must be at least 1"),
            (self.reservoir_size >= 16, f"--reservoir-size {self.reservoir_size} must be at least 16"),
            (0.0 < self.max_ppl_increase < 10.0, f"--max-ppl-increase {self.max_ppl_increase} must be in (0, 10)"),
            (self.target_len is None or self.target_len >= 2, f"--target-len {self.target_len} must be at least 2"),
            (self.verify_sequences >= 1, f"--verify-sequences {self.verify_sequences} must be at least 1"),
            (self.verify or not self.measure_speed, "--measure-speed times the verified plan; add --verify"),
            (self.retrieval_samples >= 0, f"--retrieval-samples {self.retrieval_samples} must be 0 or more"),
            (all(n >= 64 for n in self.retrieval_lens),
             f"--retrieval-len {','.join(map(str, self.retrieval_lens))}: each length must be at least 64 tokens"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", self.device):
            raise ConfigError(f"--device {self.device} is not one of cpu, cuda, cuda:N, auto")


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """Parse "256,512" into (256, 512), naming ``option`` on error."""
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{option} {text!r} is not a comma-separated list of integers") from None
    if not vals:
        raise ConfigError(f"{option} is empty; give at least one value")
    return vals


def parse_eps(text: str) -> tuple[str, ...]:
    """Split "0.01,0.05" keeping each value as written (they key audit.json); validated by
    :class:`MeasureSpec`."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def check_out_dir(out: Path, *, force: bool, resume: bool) -> None:
    """Fail early if ``out`` cannot be written or holds an audit we would overwrite."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    if (out / "audit.json").exists() and not (force or resume):
        raise ConfigError(f"--out {out} already holds an audit.json; pass --force to overwrite or --resume")
    probe = out
    while not probe.exists():
        probe = probe.parent
    import os

    if not os.access(probe, os.W_OK):
        raise ConfigError(f"--out {out} is not writable; choose another directory")
