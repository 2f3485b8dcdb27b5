"""The Python API: ``audit(model, tokenizer, dataset, config) -> AuditResult``.

The CLI is a thin layer over :func:`run_audit`, which loads the model and the data and calls
:func:`audit`. Orchestration only: capture (:mod:`capture`), reduction (:mod:`accumulate`),
figures (:mod:`sparsity`, :mod:`stats`, :mod:`theory`), plan (:mod:`rank`).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

from attn_audit import __version__
from attn_audit.config import AuditConfig
from attn_audit.data import BUNDLED, DataSpec, TokenData, build_sequences
from attn_audit.errors import CaptureError, ConfigError
from attn_audit.result import SCHEMA_VERSION, AuditResult


class Progress(Protocol):
    """Observer for long runs; the CLI attaches a rich progress bar, the API default is silent."""

    def start(self, label: str, total_tokens: int) -> None: ...
    def advance(self, tokens: int) -> None: ...
    def finish(self) -> None: ...


class NullProgress:
    """Progress that reports nothing."""

    def start(self, label: str, total_tokens: int) -> None:
        pass

    def advance(self, tokens: int) -> None:
        pass

    def finish(self) -> None:
        pass


def _versions() -> dict[str, str]:
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


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for but no CUDA GPU is available; use --device cpu")
    return device


def capture_length(
    model: Any,
    info: dict[str, Any],
    data: TokenData,
    config: AuditConfig,
    pad_id: int,
    progress: Progress,
    checkpoint: Any = None,
    last: bool = True,
) -> dict[str, Any]:
    """Run the model over one length's sequences and return the accumulator's summary.

    With a :class:`attn_audit.checkpoint.Checkpointer`, the state is saved every ``every``
    sequences and, when resuming, restored so that finished batches are skipped.
    """
    import torch

    from attn_audit import distributed
    from attn_audit.accumulate import AccumulateConfig, Accumulator

    acc_cfg = AccumulateConfig(
        eps=config.eps, budgets=config.budgets, sinks=config.sinks, window=config.window, min_keys=config.min_keys,
        rows_per_sequence=None if config.exact else config.rows_per_sequence, seed=config.seed,
        reservoir_size=config.reservoir_size,
    )
    acc = Accumulator(info, data.seq_len, len(data.sequences), acc_cfg)
    size, rank = distributed.world()
    lo, hi = distributed.shard(len(data.sequences), size, rank)
    if size > 1:
        checkpoint = None  # checkpoints are for single-process runs
        progress = progress if rank == 0 else NullProgress()
    _capture_shard(model, info["family"], data, lo, hi, config, pad_id, acc, progress, checkpoint, last)
    if size > 1:
        states = distributed.gather_states(acc.state())
        if states is None:
            return {}
        with torch.inference_mode():  # the reservoir buffers were made in inference mode
            for other in states[1:]:
                acc.merge_state(other)
    summary = acc.summary()
    if len(summary["layers_seen"]) != info["num_layers"]:
        raise CaptureError(
            f"captured {len(summary['layers_seen'])} of {info['num_layers']} layers; this model does not "
            "route every attention layer through the attention interface (see --list-families)"
        )
    return summary


def _capture_shard(model: Any, family: str, data: TokenData, lo: int, hi: int, config: AuditConfig, pad_id: int,
                   acc: Any, progress: Progress, checkpoint: Any, last: bool) -> None:
    """Fold this rank's ``data.sequences[lo:hi]`` into ``acc`` in batches of (batch, pos) ids and masks, skipping
    those a resumed checkpoint holds; save every ``checkpoint.every`` sequences and at the length's end unless it
    ends the audit (``last``); progress in tokens; freed memory released after each batch."""
    import torch

    from attn_audit.capture import capturing
    from attn_audit.data import batches
    from attn_audit.hooks import projection_hooks

    device = next(model.parameters()).device
    base = getattr(model, "base_model", model)
    done = 0
    if checkpoint is not None:
        state = checkpoint.load(data.seq_len)
        if state is not None:
            acc.load_state(state)
            done = checkpoint.done(data.seq_len)
    progress.start(f"seq-len {data.seq_len}", sum(len(s) for s in data.sequences[lo:hi]))
    progress.advance(sum(len(s) for s in data.sequences[lo:done]))
    since_save = 0
    with torch.inference_mode(), capturing(model, acc), projection_hooks(model, family, acc.on_projection):
        for local, ids, mask in batches(data.sequences[lo:hi], config.batch_size, pad_id):
            start = lo + local
            if start < done:
                continue
            acc.begin_batch(start, mask.to(device))
            base(input_ids=ids.to(device), attention_mask=mask.to(device))
            progress.advance(int(mask.sum()))
            since_save += ids.shape[0]
            finished = start + ids.shape[0]
            _release_freed_memory()
            at_end = finished == len(data.sequences)
            if checkpoint is not None and not (at_end and last) and (since_save >= checkpoint.every or at_end):
                checkpoint.save(data.seq_len, finished, acc.state())
                since_save = 0
    progress.finish()


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
) -> AuditResult:
    """Audit an already-loaded model.

    Args:
        model: a transformers model of a supported family (see ``--list-families``).
        tokenizer: its tokenizer.
        dataset: a :class:`DataSpec`, a spec string (file, hub name, "bundled:fortunes"), or a
            list of texts; None means the bundled corpus.
        config: what to measure (defaults: :class:`AuditConfig`).
        progress: an observer for progress (default silent).
        name: the model name recorded in the result.
        info: the model block (as from :func:`attn_audit.load.model_info`); derived if None.
        checkpoint: a :class:`attn_audit.checkpoint.Checkpointer` to save (and resume) progress.

    Returns:
        The :class:`AuditResult` (also renderable and savable); under torchrun, None on ranks
        other than 0 (rank 0 holds the merged result).
    """
    from attn_audit.load import check_family, model_info

    config = (config or AuditConfig()).validate()
    progress = progress or NullProgress()
    check_family(getattr(model.config, "text_config", None) or model.config)
    info = info or model_info(model, name or getattr(model.config, "_name_or_path", "model"), "object")
    if info["max_positions"] and config.seq_len > info["max_positions"]:
        raise ConfigError(
            f"--seq-len {config.seq_len} exceeds the model's {info['max_positions']} positions; "
            f"use at most {info['max_positions']}"
        )
    t0 = time.perf_counter()
    spec, texts = _data_spec(dataset)
    vocab = getattr(model.config, "vocab_size", None)
    held = config.verify_sequences if config.verify else 0
    all_data = build_sequences(
        spec,
        tokenizer,
        config.seq_lens,
        config.num_sequences,
        config.seed,
        encoder=not info["causal"],
        vocab_size=vocab,
        held_out=held,
        records=("text", texts) if texts is not None else None,
    )
    pad_id = _pad_id(tokenizer)
    if checkpoint is not None:
        from dataclasses import asdict

        from attn_audit.checkpoint import fingerprint

        checkpoint.begin(fingerprint(info["name"], info["num_layers"], asdict(config), _hash_all(all_data)))
    from attn_audit import distributed

    summaries = {}
    for i, td in enumerate(all_data):
        # no checkpoint after the final batch of the final length: the audit is written next
        summaries[td.seq_len] = capture_length(model, info, td, config, pad_id, progress, checkpoint,
                                               last=i == len(all_data) - 1)
    if distributed.world()[1] != 0:
        return None  # type: ignore[return-value]  # only rank 0 assembles and writes
    elapsed = time.perf_counter() - t0
    from attn_audit.assemble import assemble

    run = _run_block(config, info, model, summaries, all_data, spec, elapsed)
    data = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "attn-audit", "version": __version__},
        "model": info,
        "run": run,
    }
    from attn_audit.hooks import projection_weights

    w = projection_weights(model, info["family"])
    weights = [(q.float().cpu().numpy(), k.float().cpu().numpy()) for q, k in w] if w else None
    if weights is not None:
        run["sites"] = ["q", "k", "q_pre_rope", "k_pre_rope", "x"]
    t1 = time.perf_counter()
    result = assemble(data, summaries, config, weights=weights)
    result.run["statistics_s"] = round(time.perf_counter() - t1, 3)  # elapsed_s: data + capture
    if config.verify:
        from attn_audit.verify import verify_plan

        verify_plan(model, result, all_data[-1].held_out, config, pad_id)
    return result


def _run_block(config: AuditConfig, info: dict[str, Any], model: Any, summaries: dict[int, dict[str, Any]],
               all_data: list[TokenData], spec: DataSpec, elapsed: float) -> dict[str, Any]:
    """The ``run`` block of audit.json: the configuration, the rows and sites measured, the
    dataset and the capture's timing."""
    spec_text = spec.spec
    primary = max(summaries)
    tokens = sum(sum(len(s) for s in td.sequences) for td in all_data)
    return {
        "seq_len": primary,
        "seq_lens": list(config.seq_lens),
        "num_sequences": len(all_data[-1].sequences),
        "eps": list(config.eps),
        "eps_keys": list(config.eps_keys),
        "min_keys": config.min_keys,
        "rows": "sampled" if summaries[primary]["rows_sampled"] else "all",
        "rows_per_sequence": summaries[primary]["rows_per_sequence"],
        "seed": config.seed,
        "budgets": list(config.budgets),
        "sinks": config.sinks,
        "window": config.window,
        "batch_size": config.batch_size,
        "device": str(next(model.parameters()).device),
        "sites": ["q", "k"],
        "capture_point": (
            "post-RoPE, before repeat_kv (transformers AttentionInterface)"
            if info["rope"]
            else "attention kernel input, before repeat_kv (transformers AttentionInterface; no RoPE)"
        ),
        "reservoir_size": config.reservoir_size,
        "versions": _versions(),
        "dataset": {
            "spec": spec_text,
            "kind": all_data[0].kind,
            "split": spec.split if spec_text not in (BUNDLED, "<in-memory texts>") else None,
            "text_column": spec.text_column,
            "documents": all_data[0].documents,
            "tokens": tokens,
            "token_hash": _hash_all(all_data),
        },
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
        "nonfinite_rows": int(sum(s["nonfinite_rows"].sum() for s in summaries.values())),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _data_spec(dataset: DataSpec | str | Sequence[str] | None) -> tuple[DataSpec, list[str] | None]:
    if dataset is None:
        return DataSpec(), None
    if isinstance(dataset, DataSpec):
        return dataset, None
    if isinstance(dataset, str):
        return DataSpec(spec=dataset), None
    texts = [t for t in dataset if isinstance(t, str) and t.strip()]
    return DataSpec(spec="<in-memory texts>"), texts


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS after each batch (glibc only).

    The per-block score tensors have many sizes; glibc's allocator otherwise keeps the freed
    space as fragments and the resident size creeps up with the number of batches.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - probe for glibc
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "sep_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    return 0


def _hash_all(all_data: list[TokenData]) -> str:
    import hashlib

    h = hashlib.sha256()
    for td in all_data:
        h.update(td.token_hash().encode())
    return h.hexdigest()


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
) -> AuditResult:
    """Load ``model_name`` (alias, hub id, local directory or .gguf) and audit it."""
    from attn_audit.load import load_model

    config = (config or AuditConfig()).validate()
    device = _resolve_device(config.device)
    from attn_audit import distributed

    size, rank = distributed.init_from_env(device)
    if size > 1 and device.startswith("cuda") and ":" not in device:
        device = f"cuda:{rank % max(1, __import__('torch').cuda.device_count())}"
    loaded = load_model(
        model_name,
        revision=revision,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        device_map=device_map,
    )
    return audit(
        loaded.model,
        loaded.tokenizer,
        dataset or DataSpec(),
        config,
        progress=progress,
        info=loaded.info,
        checkpoint=checkpoint,
    )
