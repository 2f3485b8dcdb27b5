"""Audit an already-loaded model from Python (a notebook, or a training loop's eval hook).

Run: .venv/bin/python examples/api_example.py [output-dir]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from attn_audit import AuditConfig, AuditResult, MeasureSpec, audit, render
from attn_audit.load import load_model


def main(out_dir: str = "attn-audit-out/api-example") -> AuditResult:
    # Any supported transformers model works; here the bundled MiniLM encoder.
    loaded = load_model("all-minilm-l6-v2")
    texts = [
        "Attention is naturally sparse when queries and keys look Gaussian.",
        "A few keys carry most of the probability mass in many heads.",
        "Sparse attention saves compute at long context lengths.",
    ] * 20
    config = AuditConfig(seq_lens=(64,), num_sequences=4, measure=MeasureSpec(eps=("0.05", "0.1")))
    result = audit(loaded.model, loaded.tokenizer, texts, config, name="all-MiniLM-L6-v2")
    os.makedirs(out_dir, exist_ok=True)
    path = result.save(os.path.join(out_dir, "audit.json"))
    again = AuditResult.load(path)  # round trip
    print(render(again, "md"))
    top = again.ranking[0]
    print(f"first to make sparse: L{top['layer']}.H{top['head']} - {top['reason']}")
    return again


if __name__ == "__main__":
    main(*sys.argv[1:])
