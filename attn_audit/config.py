"""Run configuration: one frozen dataclass, validated before any model is loaded."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from attn_audit.errors import ConfigError

DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "float16", "bfloat16", "auto")


@dataclass(frozen=True)
class AuditConfig:
    """Everything an audit needs besides the model and the data.

    ``eps_keys`` keeps the eps values as the user wrote them; they key ``sparsity`` in audit.json.
    """

    seq_lens: tuple[int, ...] = (512,)
    num_sequences: int = 16
    batch_size: int = 4
    seed: int = 0
    eps_keys: tuple[str, ...] = ("0.01", "0.05", "0.1")
    min_keys: int = 16
    exact: bool = False
    rows_per_sequence: int = 256
    budgets: tuple[int, ...] = (16, 64, 256)
    sinks: int = 1
    window: int = 64
    reservoir_size: int = 2048
    device: str = "cpu"
    target_len: int | None = None
    verify: bool = False
    max_ppl_increase: float = 0.01
    verify_sequences: int = 4
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def eps(self) -> tuple[float, ...]:
        return tuple(float(e) for e in self.eps_keys)

    @property
    def seq_len(self) -> int:
        """The primary length (the longest), whose figures fill ``heads[].sparsity``."""
        return max(self.seq_lens)

    def validate(self) -> AuditConfig:
        """Raise :class:`ConfigError` on the first bad value; return self."""
        for n in self.seq_lens:
            if n < 2:
                raise ConfigError(f"--seq-len {n} is too short; use at least 2 tokens (e.g. 512)")
        if len(set(self.seq_lens)) != len(self.seq_lens):
            raise ConfigError(f"--seq-len lists a length twice: {','.join(map(str, self.seq_lens))}")
        for e in self.eps:
            if not 0.0 < e < 1.0:
                raise ConfigError(f"--eps {e} is outside (0, 1); use values like 0.01,0.05,0.1")
        for b in self.budgets:
            if b < 1:
                raise ConfigError(f"--budgets {b} must be a positive number of keys")
        checks = [
            (self.num_sequences >= 1, f"--num-sequences {self.num_sequences} must be at least 1"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size} must be at least 1"),
            (self.min_keys >= 1, f"--min-keys {self.min_keys} must be at least 1"),
            (self.rows_per_sequence >= 1, f"--rows-per-sequence {self.rows_per_sequence} must be at least 1"),
            (self.sinks >= 0, f"--sinks {self.sinks} must be 0 or more"),
            (self.window >= 0, f"--window {self.window} must be 0 or more"),
            (self.reservoir_size >= 16, f"--reservoir-size {self.reservoir_size} must be at least 16"),
            (0.0 < self.max_ppl_increase < 10.0, f"--max-ppl-increase {self.max_ppl_increase} must be in (0, 10)"),
            (self.target_len is None or self.target_len >= 2, f"--target-len {self.target_len} must be at least 2"),
            (self.verify_sequences >= 1, f"--verify-sequences {self.verify_sequences} must be at least 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", self.device):
            raise ConfigError(f"--device {self.device} is not one of cpu, cuda, cuda:N, auto")
        return self


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
    """Parse "0.01,0.05" keeping each value as written (it keys audit.json)."""
    keys = tuple(x.strip() for x in text.split(",") if x.strip())
    if not keys:
        raise ConfigError("--eps is empty; give values like 0.01,0.05,0.1")
    for k in keys:
        try:
            v = float(k)
        except ValueError:
            raise ConfigError(f"--eps {k!r} is not a number; use values like 0.01,0.05,0.1") from None
        if not 0.0 < v < 1.0:
            raise ConfigError(f"--eps {k} is outside (0, 1); use values like 0.01,0.05,0.1")
    if len(set(float(k) for k in keys)) != len(keys):
        raise ConfigError(f"--eps lists a value twice: {text}")
    return keys


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
