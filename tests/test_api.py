"""The Python API: audit() on an already-loaded model, save/load/render, and the example runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from attn_audit import AuditConfig, AuditResult, audit, render
from tests.helpers import ENV, ROOT, run_python


def test_import_does_not_pull_torch():
    code = "import attn_audit, attn_audit.result, attn_audit.gate, attn_audit.report, attn_audit.export, attn_audit.rank, sys; print('torch' in sys.modules)"
    assert run_python(code).stdout.strip() == "False"


def test_audit_on_loaded_model_round_trips(tmp_path, minilm):
    cfg = AuditConfig(seq_lens=(48,), num_sequences=3, reservoir_size=64)
    result = audit(minilm.model, minilm.tokenizer, ["a few words of text here, " * 40] * 3, cfg, name="mini")
    assert isinstance(result, AuditResult)
    assert result.model["name"] == "mini" and result.run["dataset"]["spec"] == "<in-memory texts>"
    path = result.save(tmp_path / "audit.json")
    again = AuditResult.load(path)
    assert again.to_dict() == json.loads(path.read_text())
    for fmt in ("md", "json", "terminal", "html"):
        assert len(render(again, fmt)) > 100


def test_smollm2_audit_with_weight_based_r_round_trips(tmp_path, smollm2):
    """A causal LM with known projections carries R's note (a string) beside its numbers; the saved
    audit loads back and re-plans (attn-audit --load) unchanged."""
    from attn_audit.api import load_audit

    cfg = AuditConfig(seq_lens=(48,), num_sequences=2, reservoir_size=64)
    result = audit(smollm2.model, smollm2.tokenizer, ["a few words of text here, " * 40] * 3, cfg, name="smol")
    assert any(isinstance((h.get("R") or {}).get("note"), str) for h in result.heads)
    path = result.save(tmp_path / "audit.json")
    again = AuditResult.load(path)
    assert again.to_dict() == json.loads(path.read_text())
    replanned = load_audit(str(path), target_len=48)
    assert replanned.data["plan"] == result.data["plan"]


@pytest.mark.slow
def test_api_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "api_example.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "first to make sparse: L" in proc.stdout
    assert (tmp_path / "audit.json").is_file()


def test_device_map_auto_loads_and_audits():
    """accelerate's device map (all layers on the CPU here) goes through the same capture."""
    from attn_audit.load import load_model

    loaded = load_model("all-minilm-l6-v2", device_map="auto")
    cfg = AuditConfig(seq_lens=(32,), num_sequences=2, reservoir_size=32)
    result = audit(loaded.model, loaded.tokenizer, ["words " * 200], cfg, info=loaded.info)
    assert result.rows_measured > 0
