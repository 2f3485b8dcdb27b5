"""The Python API: ``audit(model, tokenizer, dataset, config) -> AuditResult``.

:func:`audit` is the pipeline, in order: data -> capture per length -> assemble -> rank and plan
-> verify -> result. :func:`run_audit` loads the model first. The CLI is a thin layer over
:func:`run_audit`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from attn_audit import __version__
from attn_audit.config import AuditConfig
from attn_audit.data import (
    DataSpec,
    TokenData,
    build_sequences,
    hash_sequences,
    pad_id,
    split_long,
)
from attn_audit.errors import ConfigError
from attn_audit.progress import NullProgress, Progress
from attn_audit.result import SCHEMA_VERSION, AuditResult


def audit(
    model: Any,
    tokenizer: Any,
    dataset: DataSpec | str | Sequence[str] | None = None,
    config: AuditConfig | None = None,
    *,
    progress: Progress | None = None,
    name: str | None = None,
    info: dict[str, Any] | None = None,
    checkpoint: Any = None,
) -> AuditResult | None:
    """Audit an already-loaded model.

    Args:
        model: a transformers model whose attention runs through the attention interface.
        tokenizer: its tokenizer.
        dataset: a :class:`DataSpec`, a spec string (file, hub name, "bundled:fortunes"), or a
            list of texts; None means the bundled corpus.
        config: what to measure (defaults: :class:`AuditConfig`).
        progress: an observer for progress (default silent).
        name: the model name recorded in the result.
        info: the model block (as from :func:`attn_audit.load.model_info`); derived if None.
        checkpoint: a :class:`attn_audit.capture.Checkpointer` to save (and resume) progress.

    Returns:
        The :class:`AuditResult`. Under torchrun only rank 0 holds the merged result; the other
        ranks return None.
    """
    from attn_audit.assemble import assemble
    from attn_audit.capture import capture_length, distributed, run_parts
    from attn_audit.capture.loop import FALLBACK, probe_sites
    from attn_audit.load import check_family, model_info
    from attn_audit.provenance import StageClock, announce_work, run_block
    from attn_audit.rank import PlanConfig, rank_and_plan

    config = config or AuditConfig()
    progress = progress or NullProgress()
    check_family(model.config)
    info = info or model_info(model, name or getattr(model.config, "_name_or_path", "model"), "object")
    _check_length(config, info)
    probe_sites(model, info)
    if info["capture"] == FALLBACK:
        sys.stderr.write(f"note: {info['family']} computes attention outside transformers' attention interface; "
                         "auditing its eager output_attentions probabilities (no Q/K sites, slower)\n")
    for line in info.get("skipped_calls") or []:
        sys.stderr.write(f"note: not audited (run by the model as usual): {line}\n")
    if config.check_config and info.get("encoder_decoder"):
        raise ConfigError(f"--check-config: {ENCODER_DECODER_CHECKS}")
    if config.check_config:  # a config that does not fit the model is refused before any work
        from attn_audit.predeploy import read_config

        read_config(config.check_config, info)
    t0 = time.perf_counter()

    # data: deterministic, non-overlapping sequences per length (+ held-out ones for verify)
    all_data, spec = _sequences(dataset, tokenizer, config, info, vocab=getattr(model.config, "vocab_size", None))
    pad = pad_id(tokenizer)
    if checkpoint is not None:  # bound to this run: options, model, weights, data, versions
        from dataclasses import asdict

        held = TokenData(seq_len=0, sequences=[s for td in all_data for s in td.held_out], kind="", documents=0)
        checkpoint.begin(run_parts(info, asdict(config), model, hash_sequences(all_data), held.token_hash()))

    # capture: one pass over each length's sequences (no checkpoint after the last batch of the
    # last length: the audit is written next)
    if distributed.world()[1] == 0:
        announce_work(progress, model, info, config, all_data)
    summaries = {
        td.seq_len: capture_length(model, info, td, config, pad, progress, checkpoint, last=i == len(all_data) - 1)
        for i, td in enumerate(all_data)
    }
    if distributed.world()[1] != 0:
        return None  # only rank 0 assembles and writes
    run = run_block(config, info, model, summaries, all_data, spec, time.perf_counter() - t0)

    # assemble: per-head records; rank and plan
    data = {"schema_version": SCHEMA_VERSION, "tool": {"name": "attn-audit", "version": __version__},
            "model": info, "run": run}
    weights = _projection_weights(model, info, run)
    stages = StageClock(t0)
    stages.lap("capture")  # data, the calibration of the estimate, the capture and the run block
    t1 = time.perf_counter()
    result = assemble(data, summaries, config, weights=weights, clock=stages)
    rank_and_plan(result, PlanConfig(target_len=config.target_len))
    stages.lap("rank")
    result.run["statistics_s"] = round(time.perf_counter() - t1, 3)  # elapsed_s: data + capture

    # verify and the pre-deployment checks: the plan inside the model on held-out sequences,
    # passkeys, the search to a budget, measured speed; someone else's config
    if config.verify or config.check_config:
        from attn_audit.predeploy.stage import run_checks

        run_checks(model, tokenizer, result, all_data, config, info, pad)
    stages.lap("verify")
    stages.record(result.run)
    return result


ENCODER_DECODER_CHECKS = ("encoder-decoder model: the pattern configs and the plan describe one stack's "
                          "self-attention, while this model's sites mix encoder self-, decoder self- and "
                          "cross-attention; it cannot be applied inside the model")


def load_audit(path: str, *, target_len: int | None = None) -> AuditResult:
    """Read a saved audit.json (no torch). With ``target_len``, rank and plan again for that
    deployment length; a file without a plan is planned with the default settings. This and
    :func:`audit` are the only places that plan; exporters and reports read the plan."""
    from attn_audit.rank import PlanConfig, rank_and_plan

    result = AuditResult.load(path)
    if target_len is not None or "plan" not in result.data or "plan_summary" not in result.data:
        rank_and_plan(result, PlanConfig(target_len=target_len))
    return result


def _check_length(config: AuditConfig, info: dict[str, Any]) -> None:
    if info["max_positions"] and config.seq_len > info["max_positions"]:
        raise ConfigError(
            f"--seq-len {config.seq_len} exceeds the model's {info['max_positions']} positions; "
            f"use at most {info['max_positions']}"
        )
    longest = max(config.retrieval_lens, default=0)
    if info["max_positions"] and longest > info["max_positions"]:
        raise ConfigError(f"--retrieval-len {longest} exceeds the model's {info['max_positions']} positions; "
                          f"use at most {info['max_positions']}")


def _sequences(dataset: DataSpec | str | Sequence[str] | None, tokenizer: Any, config: AuditConfig,
               info: dict[str, Any], vocab: int | None) -> tuple[list[TokenData], DataSpec]:
    """Each length's token sequences and the dataset spec they came from."""
    texts: list[str] | None = None
    if dataset is None:
        spec = DataSpec()
    elif isinstance(dataset, DataSpec):
        spec = dataset
    elif isinstance(dataset, str):
        spec = DataSpec(spec=dataset)
    else:
        spec = DataSpec(spec="<in-memory texts>")
        texts = [piece for t in dataset if isinstance(t, str) for piece in split_long(t)]
    all_data = build_sequences(
        spec,
        tokenizer,
        config.seq_lens,
        config.num_sequences,
        config.seed,
        encoder=not info["causal"],
        vocab_size=vocab,
        held_out=config.verify_sequences if config.verify or config.check_config else 0,
        records=("text", texts) if texts is not None else None,
    )
    return all_data, spec


def _projection_weights(model: Any, info: dict[str, Any], run: dict[str, Any]) -> list[Any] | None:
    """Per layer (W_Q, W_K) as numpy arrays where the weight-based R bounds apply; records the
    extra sites in ``run`` (with QK-norm: the pre-norm, pre-RoPE projections, no weight bound)."""
    from attn_audit.capture import projection_weights
    from attn_audit.capture.hooks import extras_reason, weight_bound_reason

    reason, bound_reason = extras_reason(model, info), weight_bound_reason(model, info)
    run["extras"] = {"pre_rope_sites": reason is None, "pre_norm": reason is None and bool(info.get("qk_norm")),
                     "weight_bounds": bound_reason is None, "reason": bound_reason}
    if reason is None:
        run["sites"] = ["q", "k", "q_pre_rope", "k_pre_rope", "x"]
    w = projection_weights(model, info)
    if not w:
        return None
    return [(q.float().cpu().numpy(), k.float().cpu().numpy()) for q, k in w]


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for but no CUDA GPU is available; use --device cpu")
    return device


def run_audit(
    model_name: str,
    dataset: DataSpec | None = None,
    config: AuditConfig | None = None,
    *,
    revision: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
    checkpoint: Any = None,
    device_map: str | None = None,
) -> AuditResult | None:
    """Load ``model_name`` (alias, hub id, local directory or .gguf) and audit it; None on
    torchrun ranks other than 0."""
    from attn_audit.capture import distributed
    from attn_audit.load import load_model

    config = config or AuditConfig()
    device = _resolve_device(config.device)
    size, rank = distributed.init_from_env(device)
    if size > 1 and device.startswith("cuda") and ":" not in device:
        device = f"cuda:{rank % max(1, __import__('torch').cuda.device_count())}"
    t0 = time.perf_counter()
    loaded = load_model(
        model_name,
        revision=revision,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        device_map=device_map,
    )
    load_s = time.perf_counter() - t0
    result = audit(
        loaded.model,
        loaded.tokenizer,
        dataset or DataSpec(),
        config,
        progress=progress,
        info=loaded.info,
        checkpoint=checkpoint,
    )
    if result is not None:
        from attn_audit.provenance import add_stage_time

        add_stage_time(result.run, "load", load_s)
    return result
