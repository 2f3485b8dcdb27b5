"""Policy files: ``[[check]]`` tables read from TOML; the checks of one gate run (stdlib only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from attn_audit.errors import ConfigError
from attn_audit.gate.checks import Check, parse

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised only on Python 3.10
    tomllib = None  # type: ignore[assignment]


_CHECK_KEYS = {"name", "fail_if", "description"}
_TOP_KEYS = {"check", "name", "description"}
MAX_BYTES = 1 << 20
MAX_CHECKS = 1000


def load_policy(path: str | Path) -> list[Check]:
    """Read ``[[check]]`` tables (``name``, ``fail_if``, ``description``) from a TOML file."""
    p = Path(path)
    if tomllib is None:  # pragma: no cover
        raise ConfigError(f"policy {p}: reading TOML policies needs Python 3.11 or newer")
    from attn_audit.outdir import regular_file

    regular_file(p, "policy file", ConfigError)  # a FIFO would block the read forever
    try:
        if p.stat().st_size > MAX_BYTES:
            raise ConfigError(f"policy file {p} is larger than {MAX_BYTES // 1024} KB")
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except RecursionError:
        raise ConfigError(f"policy file {p} is nested too deeply") from None
    except FileNotFoundError:
        raise ConfigError(f"policy file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {p}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"policy file {p} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"policy file {p} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"policy {p}: unknown top-level key(s) {', '.join(unknown)} (expected [[check]] tables)"
        )
    tables = data.get("check")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"policy {p} defines no [[check]] tables")
    if len(tables) > MAX_CHECKS:
        raise ConfigError(f"policy {p} defines {len(tables)} checks; at most {MAX_CHECKS} are allowed")
    checks: list[Check] = []
    for i, table in enumerate(tables, start=1):
        where = f"policy {p}, check {i}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: each check must be a [[check]] table")
        extra = sorted(set(table) - _CHECK_KEYS)
        if extra:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(extra)} (allowed: name, fail_if, description)"
            )
        name, expr, desc = table.get("name"), table.get("fail_if"), table.get("description", "")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: 'name' must be a non-empty string")
        if not isinstance(expr, str) or not expr.strip():
            raise ConfigError(f"{where} ({name}): 'fail_if' must be a non-empty string")
        if not isinstance(desc, str):
            raise ConfigError(f"{where} ({name}): 'description' must be a string")
        if any(c.name == name for c in checks):
            raise ConfigError(f"{where}: duplicate check name {name!r}")
        try:
            checks.append(parse(expr, name=name.strip(), description=desc))
        except ConfigError as exc:
            raise ConfigError(f"{where} ({name}): {exc}") from None
    return checks


def collect_checks(fail_if: Sequence[str] = (), policy: str | Path | None = None) -> list[Check]:
    """The checks of ``--fail-if`` (in order) followed by those of ``--policy``."""
    checks = [parse(expr) for expr in fail_if]
    if policy is not None:
        checks.extend(load_policy(policy))
    return checks
