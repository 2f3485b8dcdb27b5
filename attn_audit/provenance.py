"""Provenance of an audit: the ``run`` block of audit.json (options, rows and sites measured,
dataset, timing) and the library versions it ran with."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from typing import Any

from attn_audit import __version__
from attn_audit.config import AuditConfig
from attn_audit.data import BUNDLED, DataSpec, TokenData, hash_sequences


def versions() -> dict[str, str]:
    import numpy
    import scipy
    import torch
    import transformers

    out = {
        "attn_audit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
    }
    try:
        import datasets

        out["datasets"] = datasets.__version__
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    return out


def capture_point(info: dict[str, Any]) -> str:
    """Where Q/K were read: the attention kernel's input, i.e. after RoPE and after any QK-norm
    (or, in the fallback, that only the model's eager probabilities were read)."""
    if info.get("capture") == "eager-fallback":
        return ("eager output_attentions probabilities (fallback: attention computed outside transformers' "
                "attention interface; no Q/K sites)")
    stage = ("post-QK-norm, post-RoPE" if info.get("qk_norm") else "post-RoPE") if info.get("rope") else (
        "post-QK-norm, attention kernel input (no RoPE)" if info.get("qk_norm") else "attention kernel input (no RoPE)")
    return f"{stage}, before repeat_kv (transformers AttentionInterface)"


def run_block(config: AuditConfig, info: dict[str, Any], model: Any, summaries: dict[int, dict[str, Any]],
               all_data: list[TokenData], spec: DataSpec, elapsed: float) -> dict[str, Any]:
    """The ``run`` block of audit.json: the configuration, the rows and sites measured, the
    dataset and the capture's timing."""
    spec_text = spec.spec
    primary = config.seq_len
    m = config.measure
    tokens = sum(sum(len(s) for s in td.sequences) for td in all_data)
    return {
        "seq_len": primary,
        "seq_lens": list(config.seq_lens),
        "num_sequences": len(all_data[-1].sequences),
        "eps": list(m.eps),
        "eps_keys": list(m.eps_keys),
        "min_keys": m.min_keys,
        "rows": "sampled" if summaries[primary]["rows_sampled"] else "all",
        "rows_per_sequence": summaries[primary]["rows_per_sequence"],
        "seed": config.seed,
        "budgets": list(m.budgets),
        "sinks": m.sinks,
        "window": m.window,
        "batch_size": config.batch_size,
        "device": str(next(model.parameters()).device),
        "sites": [] if info.get("capture") == "eager-fallback" else ["q", "k"],
        "capture": info.get("capture", "interface"),
        "capture_point": capture_point(info),
        "reservoir_size": config.reservoir_size,
        "versions": versions(),
        "dataset": {
            "spec": spec_text,
            "kind": all_data[0].kind,
            "split": spec.split if spec_text not in (BUNDLED, "<in-memory texts>") else None,
            "text_column": spec.text_column,
            "documents": all_data[0].documents,
            "tokens": tokens,
            "token_hash": hash_sequences(all_data),
        },
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
        "nonfinite_rows": int(sum(s["nonfinite_rows"].sum() for s in summaries.values())),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
