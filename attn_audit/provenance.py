"""Provenance of an audit: the ``run`` block of audit.json (options, rows and sites measured,
dataset, timing) and the library versions it ran with."""

from __future__ import annotations

import platform
import time
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
        **({"inputs": seq2seq_inputs(info)} if info.get("encoder_decoder") else {}),
    }


def seq2seq_inputs(info: dict[str, Any]) -> str:
    """What an encoder-decoder model was fed (``run.inputs``)."""
    return ("encoder input_ids: the dataset's token sequence; decoder_input_ids: the same sequence shifted right by "
            f"one after decoder_start_token_id {info.get('decoder_start_token_id')} (teacher forcing), with the same "
            "padding mask; cross-attention queries come from the decoder, keys from the encoder")


# --------------------------------------------------------------------------- stage times

STAGES: tuple[str, ...] = ("load", "capture", "statistics", "theory", "rank", "verify", "render")


class StageClock:
    """Wall time per stage of one audit, as contiguous laps (so the stages add up to the total).

    ``lap(stage)`` charges the time since the previous lap (or ``start``) to ``stage``;
    ``record(run)`` writes ``run["stage_s"]`` (every stage of :data:`STAGES`, 0 for those that
    did not run in this call) and ``run["total_s"]``.
    """

    def __init__(self, start: float) -> None:
        self.start = self.last = start
        self.stage_s = dict.fromkeys(STAGES, 0.0)

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stage_s[stage] += now - self.last
        self.last = now

    def record(self, run: dict[str, Any]) -> None:
        run["stage_s"] = {k: round(v, 3) for k, v in self.stage_s.items()}
        run["total_s"] = round(self.last - self.start, 3)


def add_stage_time(run: dict[str, Any], stage: str, seconds: float) -> None:
    """Charge ``seconds`` spent outside :func:`attn_audit.api.audit` (loading the model, rendering
    the reports) to ``stage`` and to the total of a recorded ``run`` block."""
    stage_s = run.setdefault("stage_s", dict.fromkeys(STAGES, 0.0))
    stage_s[stage] = round(stage_s.get(stage, 0.0) + seconds, 3)
    run["total_s"] = round(run.get("total_s", 0.0) + seconds, 3)


# --------------------------------------------------------------------------- the work, announced

# Capture time over the plain forward of the same tokens, measured by benchmarks/bench_audit.py on
# SmolLM2 (2-core CPU): exact rows ~1.7-2.9, the default sampled rows ~1.3-1.5.
CAPTURE_FACTOR = {"exact": 2.5, "sampled": 1.4}


def work_sites(info: dict[str, Any], projections: bool) -> dict[str, int]:
    """Head-sites the statistics assess: Q per query head, K per KV head (and their pre-RoPE
    projections where ``projections``), row logits per query head; each ``layers x heads``."""
    L, H, Hkv = info["num_layers"], info["num_heads"], info["num_kv_heads"]
    sites = {"q": L * H, "k": L * Hkv}
    if projections:
        sites.update(q_pre_rope=L * H, k_pre_rope=L * Hkv)
    sites["row_logits"] = L * H
    return sites


def statistics_seconds_per_site(n: int, d: int, seed: int = 0, batch: int = 4) -> float:
    """CPU seconds per sample of one batched Gaussianity assessment of ``batch`` seeded normal
    (n, d) samples (calibration; the faster of two runs, the first also filling the caches of n).

    CPU time, not wall time: one short call's wall time swings several-fold with other load on
    the machine, while the statistics stage spreads its batches over the cores.
    """
    import numpy as np

    from attn_audit.stats import assess_gaussianity_batch

    x = np.random.default_rng(seed).standard_normal((batch, n, d))
    times = []
    for _ in range(2):
        t0 = time.process_time()
        assess_gaussianity_batch(x, seed=seed)
        times.append(time.process_time() - t0)
    return min(times) / batch


def work_line(tokens: int, heads: int, sites: dict[str, int], exact: bool, forward_s_per_token: float,
              statistics_s_per_site: float, rows_per_sequence: int | None = None) -> str:
    """One line: the work (tokens, heads, head-sites, rows) and the estimated time of the audit.

    ``rows_per_sequence`` names the sampled rows (None: every row is measured although not
    ``exact``, because no sequence is longer than the sample).
    """
    import math

    capture = forward_s_per_token * tokens * CAPTURE_FACTOR["exact" if exact else "sampled"]
    statistics = statistics_s_per_site * sum(sites.values())
    rows = ("exact rows" if exact else f"sampled rows ({rows_per_sequence} per sequence)"
            if rows_per_sequence else "all rows")
    work = (f"audit: {tokens:,} tokens, {heads:,} heads, {sum(sites.values()):,} head-sites "
            f"({', '.join(sites)}), {rows}")
    if not math.isfinite(capture):
        return work
    return (f"{work}; estimate ~{capture + statistics:,.0f} s (capture ~{capture:,.0f} s from a "
            f"{forward_s_per_token * 1e3:.2f} ms/token forward, statistics ~{statistics:,.0f} s)")


def announce_work(progress: Any, model: Any, info: dict[str, Any], config: AuditConfig,
                  all_data: list[TokenData]) -> None:
    """State the work and a time estimate through ``progress.note`` before the capture starts.

    The estimate comes from a short calibration: one plain forward of a few audited tokens
    (:func:`attn_audit.capture.calibrate.forward_seconds_per_token`) and one assessment of a normal
    sample of the reservoir's size. Observers without ``note`` (and silent ones) skip both.
    """
    note = getattr(progress, "note", None)
    if note is None or not getattr(progress, "wants_notes", True):
        return
    from attn_audit.capture.calibrate import forward_seconds_per_token
    from attn_audit.capture.hooks import extras_reason

    tokens = sum(sum(len(s) for s in td.sequences) for td in all_data)
    sites = work_sites(info, extras_reason(model, info) is None)
    per_token = forward_seconds_per_token(model, all_data[-1].sequences)
    n = max(32, min(config.reservoir_size, tokens // max(1, len(all_data))))
    per_site = statistics_seconds_per_site(n, info["head_dim"], config.seed)
    m = config.measure
    sampled = not m.exact and any(len(s) > (m.rows_per_sequence or 0) for td in all_data for s in td.sequences)
    note(work_line(tokens, info["num_layers"] * info["num_heads"], sites, m.exact, per_token, per_site,
                   m.rows_per_sequence if sampled else None))
