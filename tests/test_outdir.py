"""Nothing in --out is overwritten without --force (--load included), a second run into the same
--out is refused, and the default --out stays under ./attn-audit-out/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from attn_audit.cli import main, planned_files
from attn_audit.errors import ExitCode, OutputError
from attn_audit.outdir import OutLock, check_out_dir, default_out, slug
from tests.synthetic import make_result


@pytest.fixture
def audit_json(tmp_path):
    return str(make_result(plan=True).save(tmp_path / "in" / "audit.json"))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("existing", ["audit.json", "report.md", "report.html", "minference.json",
                                      "duo/config.json", "duo/full_attention_heads.tsv"])
def test_load_never_overwrites_any_file_it_would_write(tmp_path, audit_json, existing, capsys):
    out = tmp_path / "out"
    (out / existing).parent.mkdir(parents=True, exist_ok=True)
    (out / existing).write_text("the user's file")
    before = _snapshot(out)
    formats = "json,md,html" if existing == "report.html" else "json,md"  # the HTML page takes seconds
    args = ["--load", audit_json, "--format", formats, "--export", "minference,duo", "--out", str(out)]
    assert main(args) == ExitCode.CANNOT_RUN
    assert f"already holds {existing}; pass --force" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert main([*args, "--force"]) == ExitCode.OK
    assert (out / existing).read_text() != "the user's file"


def test_load_of_a_parent_audit_with_default_out_stays_in_attn_audit_out(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    make_result().save(work.parent / "audit.json")
    (work / "report.md").write_text("mine")
    monkeypatch.chdir(work)
    assert main(["--load", "../audit.json", "--format", "md"]) == ExitCode.OK
    assert (work / "report.md").read_text() == "mine"
    assert sorted(p.relative_to(work) for p in work.rglob("report.md")) == [
        Path("attn-audit-out/work/report.md"), Path("report.md")]


@pytest.mark.parametrize("name", ["..", ".", "", "../..", "/", "a/../..", ".hidden", "-rf", "x" * 300])
def test_default_out_never_leaves_attn_audit_out(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    out = default_out(name)
    root = (tmp_path / "attn-audit-out").resolve()
    assert out.resolve().parent == root and not slug(name).startswith(".")


def test_resume_without_checkpoint_does_not_replace_a_finished_audit(tmp_path):
    (tmp_path / "audit.json").write_text("{}")
    with pytest.raises(OutputError, match="already holds audit.json"):
        check_out_dir(tmp_path, ["audit.json"], force=False, resume=True)
    (tmp_path / ".checkpoint").mkdir()
    with pytest.raises(OutputError, match="already holds audit.json"):  # a folder, but nothing committed
        check_out_dir(tmp_path, ["audit.json"], force=False, resume=True)
    (tmp_path / ".checkpoint" / "manifest.json").write_text("{}")
    check_out_dir(tmp_path, ["audit.json"], force=False, resume=True)  # continuing an interrupted run


def test_a_checkpoint_folder_is_kept_without_resume_or_force(tmp_path):
    (tmp_path / ".checkpoint").mkdir()
    (tmp_path / ".checkpoint" / "mine.txt").write_text("x")
    with pytest.raises(OutputError, match="checkpoint of an interrupted run"):
        check_out_dir(tmp_path, ["audit.json"], force=False, resume=False)
    check_out_dir(tmp_path, ["audit.json"], force=True, resume=False)
    assert (tmp_path / ".checkpoint" / "mine.txt").exists()


def test_a_directory_in_place_of_a_file_is_refused_even_with_force(tmp_path):
    (tmp_path / "report.md").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        check_out_dir(tmp_path, planned_files(["md"], []), force=True, resume=False)
    (tmp_path / "duo").write_text("x")
    with pytest.raises(OutputError, match="duo is not a directory"):
        check_out_dir(tmp_path, planned_files(["terminal"], ["duo"]), force=True, resume=False)


def test_a_second_run_into_a_locked_out_is_refused(tmp_path, audit_json, capsys):
    out = tmp_path / "out"
    lock = OutLock(out).acquire()
    try:
        with pytest.raises(OutputError, match="in use by another attn-audit run"):
            OutLock(out).acquire()
        assert main(["--load", audit_json, "--format", "md", "--out", str(out)]) == ExitCode.CANNOT_RUN
        assert "in use by another attn-audit run" in capsys.readouterr().err
        assert not (out / "report.md").exists()
    finally:
        lock.release()
    assert main(["--load", audit_json, "--format", "md", "--out", str(out)]) == ExitCode.OK
    assert sorted(os.listdir(out)) == ["report.md"]  # the lock file is gone after the run


def test_concurrent_cli_runs_into_one_out_one_is_refused(tmp_path, audit_json):
    """Two real processes: the one that finds --out locked exits 3 and writes nothing."""
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "out"
    hold = textwrap.dedent(f"""
        import sys, time
        from attn_audit.outdir import OutLock
        lock = OutLock(__import__('pathlib').Path({str(out)!r})).acquire()
        print('locked', flush=True)
        sys.stdin.read()
        lock.release()
    """)
    holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run([sys.executable, "-m", "attn_audit", "--load", audit_json, "--format", "md",
                               "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 3 and "in use" in proc.stderr, proc.stderr
        assert not (out / "report.md").exists()
    finally:
        holder.communicate("", timeout=60)


def test_a_refused_run_leaves_no_empty_out_behind(tmp_path):
    bad = tmp_path / "audit.json"
    bad.write_text("{")  # refused after --out was locked (created)
    out = tmp_path / "new"
    assert main(["--load", str(bad), "--format", "md", "--out", str(out)]) == ExitCode.USAGE
    assert not out.exists()


def test_only_rank_0_locks_under_torchrun(tmp_path, audit_json, monkeypatch):
    """torchrun starts every rank with the same --out: the ranks that write nothing take no lock."""
    out = tmp_path / "out"
    lock = OutLock(out).acquire()
    try:
        monkeypatch.setenv("RANK", "1")
        assert main(["--load", audit_json, "--format", "md", "--out", str(out)]) == ExitCode.OK
    finally:
        lock.release()
