"""Run configuration: one frozen dataclass, validated before any model is loaded."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from attn_audit.errors import ConfigError

DEVICES = ("cpu", "cuda", "auto")


PRIMARY_EPS = 0.05
# kernel patterns measured per head (attn_audit.rows.patterns; torch-free names here)
PATTERN_NAMES = ("row-topk", "block-oracle", "block-topk", "streaming", "vertical-slash")

# Documented ranges of the integer options (README, "Options and their ranges"). Values beyond
# them are refused with one line before any model loads instead of overflowing a C integer or
# allocating without bound later.
MAX_LENGTH = 1 << 20  # --seq-len, --target-len, --budgets, --sinks, --window, --min-keys, --rows-per-sequence
MAX_COUNT = 1_000_000  # --num-sequences, --verify-sequences, --checkpoint-every
MAX_BATCH = 4096  # --batch-size
MAX_RESERVOIR = 1 << 16  # --reservoir-size
MAX_EPS = 32  # values of --eps (and of --budgets, --seq-len)
MAX_SEED = 2**32 - 1  # --seed (numpy and torch generators take 0..2**32-1)


def check_int(option: str, value: object, lo: int, hi: int) -> int:
    """``value`` if it is an integer (not a bool) in ``[lo, hi]``; else :class:`ConfigError`."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)  # int, numpy integers; not float, str or bool
    except TypeError:
        raise ConfigError(f"{option} {value!r} is not an integer") from None
    if not lo <= number <= hi:
        raise ConfigError(f"{option} {number} is outside the range {lo}..{hi}")
    return number


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

    eps: tail-mass levels in (0, 1), distinct (none: only the budgets' tail masses; an audit needs
        at least one, see :class:`AuditConfig`). Strings are kept as written (``"0.050"``) as the keys of
        ``heads[].sparsity`` in audit.json; floats get their shortest repr. Everything else
        addresses eps by index into this tuple.
    budgets: top-k budgets for the tail mass.
    sinks: leading key positions treated as attention sinks (0 allowed).
    window: local window; key j is local for a query at q if ``q - window < j <= q``.
    min_keys: rows with fewer allowed keys are left out of the aggregates.
    rows_per_sequence: query rows sampled per sequence; None measures every row (``--exact``).
    block_size: kernel tile size of the pattern measurements (``--block-size``).
    patterns: kernel patterns measured per head (``--patterns``; empty: none).
    """

    eps: tuple[float, ...] = (0.01, 0.05, 0.1)
    budgets: tuple[int, ...] = (16, 64, 256)
    sinks: int = 1
    window: int = 64
    min_keys: int = 16
    rows_per_sequence: int | None = 256
    block_size: int = 64
    patterns: tuple[str, ...] = PATTERN_NAMES
    eps_keys: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        raw = tuple(self.eps)
        if len(raw) > MAX_EPS:
            raise ConfigError(f"--eps lists {len(raw)} values; give at most {MAX_EPS}")
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
        budgets = tuple(self.budgets)  # may be empty: the kernels then measure no tail mass
        if len(budgets) > MAX_EPS:
            raise ConfigError(f"--budgets lists {len(budgets)} values; give at most {MAX_EPS}")
        object.__setattr__(self, "budgets", tuple(check_int("--budgets", b, 1, MAX_LENGTH) for b in budgets))
        object.__setattr__(self, "min_keys", check_int("--min-keys", self.min_keys, 1, MAX_LENGTH))
        if self.rows_per_sequence is not None:
            object.__setattr__(self, "rows_per_sequence",
                               check_int("--rows-per-sequence", self.rows_per_sequence, 1, MAX_LENGTH))
        object.__setattr__(self, "sinks", check_int("--sinks", self.sinks, 0, MAX_LENGTH))
        object.__setattr__(self, "window", check_int("--window", self.window, 0, MAX_LENGTH))
        object.__setattr__(self, "block_size", check_int("--block-size", self.block_size, 1, MAX_LENGTH))
        object.__setattr__(self, "patterns", tuple(self.patterns))
        for p in self.patterns:
            if p not in PATTERN_NAMES:
                raise ConfigError(f"--patterns {p!r} is unknown (known: {', '.join(PATTERN_NAMES)}, none)")

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
    max_retrieval_drop: float = 0.0
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
        object.__setattr__(self, "seq_lens", tuple(self.seq_lens))
        object.__setattr__(self, "retrieval_lens", tuple(self.retrieval_lens))
        if not self.seq_lens:
            raise ConfigError("--seq-len is empty; give at least one length (e.g. 512)")
        if not self.measure.eps:
            raise ConfigError("--eps is empty; give values like 0.01,0.05,0.1")
        if len(self.seq_lens) > MAX_EPS:
            raise ConfigError(f"--seq-len lists {len(self.seq_lens)} lengths; give at most {MAX_EPS}")
        object.__setattr__(self, "seq_lens", tuple(check_int("--seq-len", n, 2, MAX_LENGTH) for n in self.seq_lens))
        if len(set(self.seq_lens)) != len(self.seq_lens):
            raise ConfigError(f"--seq-len lists a length twice: {','.join(map(str, self.seq_lens))}")
        check_int("--num-sequences", self.num_sequences, 1, MAX_COUNT)
        check_int("--batch-size", self.batch_size, 1, MAX_BATCH)
        check_int("--seed", self.seed, 0, MAX_SEED)
        check_int("--reservoir-size", self.reservoir_size, 16, MAX_RESERVOIR)
        if self.target_len is not None:
            check_int("--target-len", self.target_len, 2, MAX_LENGTH)
        check_int("--verify-sequences", self.verify_sequences, 1, MAX_COUNT)
        ppl = self.max_ppl_increase
        if isinstance(ppl, bool) or not isinstance(ppl, (int, float)) or not 0.0 < ppl < 10.0:
            raise ConfigError(f"--max-ppl-increase {ppl} must be a number in (0, 10)")
        drop = self.max_retrieval_drop
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop <= 1.0:
            raise ConfigError(f"--max-retrieval-drop {drop} must be a share of passkeys in [0, 1]")
        if not isinstance(self.device, str):
            raise ConfigError(f"--device {self.device!r} is not one of cpu, cuda, cuda:N, auto")
        for ok, msg in [
            (self.verify or not self.measure_speed, "--measure-speed times the verified plan; add --verify"),
            (isinstance(self.retrieval_samples, int) and 0 <= self.retrieval_samples <= MAX_COUNT,
             f"--retrieval-samples {self.retrieval_samples} must be 0 or more"),
            (all(isinstance(n, int) and 64 <= n <= MAX_LENGTH for n in self.retrieval_lens),
             f"--retrieval-len {','.join(map(str, self.retrieval_lens))}: each length must be at least 64 tokens"),
        ]:
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


def parse_patterns(text: str) -> tuple[str, ...]:
    """``--patterns``: "all", "none" or a comma list of :data:`PATTERN_NAMES` (validated by
    :class:`MeasureSpec`)."""
    t = text.strip().lower()
    if t == "all":
        return PATTERN_NAMES
    if t in ("none", ""):
        return ()
    return tuple(x.strip() for x in t.split(",") if x.strip())


def parse_eps(text: str) -> tuple[str, ...]:
    """Split "0.01,0.05" keeping each value as written (they key audit.json); validated by
    :class:`MeasureSpec`."""
    return tuple(x.strip() for x in text.split(",") if x.strip())
