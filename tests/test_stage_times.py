"""Stage times in the run block (they add up to the total) and the work announced before the capture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from attn_audit import AuditConfig, audit
from attn_audit.provenance import (
    STAGES,
    StageClock,
    add_stage_time,
    work_line,
    work_sites,
)


class Recorder:
    """A progress observer that keeps the order of the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def note(self, text: str) -> None:
        self.calls.append(("note", text))

    def start(self, label: str, total_tokens: int) -> None:
        self.calls.append(("start", total_tokens))

    def advance(self, tokens: int) -> None:
        self.calls.append(("advance", tokens))

    def finish(self) -> None:
        self.calls.append(("finish", None))


def _adds_up(run: dict) -> None:
    stages = run["stage_s"]
    assert tuple(stages) == STAGES
    assert all(v >= 0 for v in stages.values())
    assert run["total_s"] > 0
    assert abs(sum(stages.values()) - run["total_s"]) <= 0.05 * run["total_s"], (stages, run["total_s"])


def test_clock_laps_are_contiguous() -> None:
    clock = StageClock(time.perf_counter())
    for stage in ("capture", "statistics", "theory", "rank"):
        clock.lap(stage)
    run: dict = {}
    clock.record(run)
    assert set(run["stage_s"]) == set(STAGES) and run["stage_s"]["load"] == 0.0
    add_stage_time(run, "load", 2.0)
    add_stage_time(run, "render", 0.5)
    assert run["stage_s"]["load"] == 2.0 and run["stage_s"]["render"] == 0.5
    _adds_up(run)


def test_work_line_states_tokens_heads_sites_rows_and_estimate() -> None:
    info = {"num_layers": 30, "num_heads": 9, "num_kv_heads": 3}
    sites = work_sites(info, projections=True)
    assert sum(sites.values()) == 990  # SmolLM2: the 990 assessments of issue 18
    line = work_line(8192, 270, sites, exact=False, forward_s_per_token=2e-3, statistics_s_per_site=0.01,
                     rows_per_sequence=256)
    assert "8,192 tokens" in line and "270 heads" in line and "990 head-sites" in line
    assert "sampled rows (256 per sequence)" in line
    # capture 8192 * 2 ms * 1.4 = 22.9 s, statistics 990 * 10 ms = 9.9 s
    assert "estimate ~33 s" in line and "capture ~23 s" in line and "statistics ~10 s" in line
    assert "exact rows" in work_line(10, 1, {"q": 1}, True, float("nan"), 0.0)
    assert "all rows" in work_line(10, 1, {"q": 1}, False, 1e-3, 0.0)


def test_api_records_stage_times_and_announces_before_capture(minilm) -> None:
    cfg = AuditConfig(seq_lens=(48,), num_sequences=3, reservoir_size=64)
    progress = Recorder()
    result = audit(minilm.model, minilm.tokenizer, ["a few words of text here, " * 40] * 3, cfg, name="mini",
                   progress=progress)
    kinds = [k for k, _ in progress.calls]
    assert kinds[0] == "note" and kinds.count("note") == 1 and "start" in kinds
    text = str(progress.calls[0][1])
    assert "144 tokens" in text and "72 heads" in text and "216 head-sites" in text and "all rows" in text
    assert "estimate ~" in text
    run = result.run
    _adds_up(run)
    assert run["stage_s"]["load"] == 0.0 and run["stage_s"]["render"] == 0.0  # not done by audit()
    assert run["stage_s"]["capture"] > 0 and run["stage_s"]["statistics"] > 0


def test_cli_records_load_and_render_and_prints_the_estimate(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "attn_audit", "all-minilm-l6-v2", "--seq-len", "32",
                           "--num-sequences", "2", "--reservoir-size", "64", "--format", "json,html",
                           "--out", str(out), "--no-color"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before_bar = proc.stderr.split("seq-len 32")[0]
    assert "audit: 64 tokens, 72 heads" in before_bar and "estimate ~" in before_bar
    run = json.loads((out / "audit.json").read_text())["run"]
    _adds_up(run)
    assert run["stage_s"]["load"] > 0 and run["stage_s"]["render"] > 0
    assert "time per stage" in (out / "report.html").read_text()
