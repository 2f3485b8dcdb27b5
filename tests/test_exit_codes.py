"""One error contract: every documented exit code is reachable through the CLI and tested, --help
and the README list the same codes as :class:`ExitCode`, and no error class is dead."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import attn_audit.errors as errors
from attn_audit.cli import EXIT_CODES, main
from attn_audit.errors import AttnAuditError, ExitCode
from tests.synthetic import make_result

ROOT = Path(__file__).resolve().parents[1]


def _err_lines(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [ln for ln in err.splitlines() if ln.strip()]


@pytest.fixture
def audit_json(tmp_path):
    return str(make_result().save(tmp_path / "in" / "audit.json"))


def test_0_and_1_pass_and_failed_check(audit_json, capsys):
    assert main(["--load", audit_json, "--format", "terminal"]) == ExitCode.OK
    assert main(["--load", audit_json, "--format", "terminal", "--fail-if", "planned_flops_saving > -1"]) \
        == ExitCode.CHECK_FAILED


def test_2_usage(audit_json, capsys):
    assert main(["--load", audit_json, "--seed", "-1", "x"]) == ExitCode.USAGE
    assert main(["smollm2-135m-instruct", "--seed", "-1"]) == ExitCode.USAGE
    assert "--seed -1 is outside the range 0..4294967295" in _err_lines(capsys)[-1]


def test_3_output_problems(tmp_path, audit_json, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["--load", audit_json, "--format", "md", "--out", str(tmp_path / "file")]) == ExitCode.CANNOT_RUN
    assert "is not a directory" in _err_lines(capsys)[-1]
    out = tmp_path / "o"
    out.mkdir()
    (out / "report.md").write_text("mine")
    assert main(["--load", audit_json, "--format", "md", "--out", str(out)]) == ExitCode.CANNOT_RUN
    assert "already holds report.md; pass --force" in _err_lines(capsys)[-1]
    assert (out / "report.md").read_text() == "mine"


def test_3_a_failed_write_is_an_output_error(tmp_path, audit_json, monkeypatch, capsys):
    import os

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    assert main(["--load", audit_json, "--format", "json", "--out", str(tmp_path / "o")]) == ExitCode.CANNOT_RUN
    (line,) = _err_lines(capsys)
    assert "No space left on device" in line and "audit.json" in line


def test_4_nothing_measured(tmp_path, capsys):
    result = make_result()
    for h in result.heads:
        for block in h["sparsity"].values():
            block["rows"] = 0
    path = result.save(tmp_path / "audit.json")
    assert main(["--load", str(path), "--format", "terminal"]) == ExitCode.NOTHING_MEASURED


def test_5_an_unexpected_exception_is_one_line_and_its_own_code(audit_json, monkeypatch, capsys):
    from attn_audit import gate

    def bug(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(gate, "decide", bug)
    assert main(["--load", audit_json, "--format", "terminal"]) == ExitCode.INTERNAL
    (line,) = _err_lines(capsys)
    assert "internal error (RuntimeError" in line and "--debug" in line and "\\n" in line
    with pytest.raises(RuntimeError):
        main(["--load", audit_json, "--format", "terminal", "--debug"])


def test_130_interrupted(audit_json, monkeypatch, capsys):
    from attn_audit import gate

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gate, "decide", stop)
    assert main(["--load", audit_json, "--format", "terminal"]) == ExitCode.INTERRUPTED


def test_help_readme_and_enum_list_the_same_codes():
    enum = {int(c) for c in ExitCode}
    help_codes = {int(m) for m in re.findall(r"^\s+(\d+)\s", EXIT_CODES, re.M)}
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| code | meaning |"):]
    table = table[: table.index("\n\n")]
    readme_codes = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert enum == help_codes == readme_codes


def test_no_dead_error_class():
    """Every AttnAuditError subclass is raised somewhere in the package."""
    source = "\n".join(p.read_text() for p in (ROOT / "attn_audit").rglob("*.py"))
    for name, cls in inspect.getmembers(errors, inspect.isclass):
        if issubclass(cls, AttnAuditError) and cls is not AttnAuditError:
            assert re.search(rf"raise {name}\(", source) or re.search(rf"error=?\s*{name}\b|, {name}\)", source), name


def test_spec_validation_uses_the_project_error_types():
    """Specs built in Python (not only from the CLI) raise ConfigError, also a ValueError."""
    from attn_audit.config import AuditConfig, MeasureSpec
    from attn_audit.errors import ConfigError
    from attn_audit.rank import PlanConfig
    from attn_audit.stats.rules import GaussianityThresholds

    for make in (lambda: MeasureSpec(eps=(0.0,)), lambda: MeasureSpec(budgets=(True,)),
                 lambda: AuditConfig(seed=-1), lambda: GaussianityThresholds(kurt_abs=-1.0),
                 lambda: PlanConfig(max_kfrac=2.0)):
        with pytest.raises(ConfigError) as info:
            make()
        assert isinstance(info.value, ValueError) and info.value.exit_code == ExitCode.USAGE
