"""The verify stage of an audit: the plan inside the model and the pre-deployment checks, in order.

:func:`run_checks` is what :func:`attn_audit.api.audit` calls after ranking: the oracle and kernel
plans on held-out sequences (:func:`attn_audit.verify.verify_plan`), the passkey check
(``verify.retrieval``), the search for the largest plan prefix within the quality and passkey
budgets (``verify.largest_plan*``), the measured attention speed of that plan (``verify.speed``,
with ``--measure-speed``), and someone else's pattern config (``--check-config``).
"""

from __future__ import annotations

from typing import Any

from attn_audit.config import AuditConfig
from attn_audit.data import TokenData
from attn_audit.errors import ConfigError
from attn_audit.result import AuditResult


def run_checks(model: Any, tokenizer: Any, result: AuditResult, all_data: list[TokenData], config: AuditConfig,
               info: dict[str, Any], pad: int) -> None:
    """Fill ``result.data["verify"]`` (with ``config.verify``) and ``result.data["check_config"]``
    (with ``config.check_config``). ``all_data``: the run's token data per length, the last one's
    held-out sequences verify the plan; ``pad``: the padding id."""
    from attn_audit.capture.loop import FALLBACK

    if config.verify and info.get("encoder_decoder"):
        result.data["verify"] = {"skipped_reason": "encoder-decoder model: the plan mixes encoder self-, decoder self- "
                                 "and cross-attention sites, which apply_plan cannot run inside the model"}
    elif config.verify and info["capture"] == FALLBACK:
        result.data["verify"] = {"skipped_reason": "attention computed outside the interface: the plan cannot be "
                                 "applied inside the model"}
    elif config.verify:
        from attn_audit.verify import has_kernel_plan, search_plan, verify_plan

        verify_plan(model, result, all_data[-1].held_out, config, pad)
        passkeys = _retrieval(model, tokenizer, result, all_data, config, info)
        if has_kernel_plan(result):
            search_plan(model, result, all_data[-1].held_out, config, pad, passkeys)
        if config.measure_speed:
            _speed(model, result, config, all_data, info)

    # someone else's pattern config: measured on the held-out sequences and verified like a plan
    if config.check_config:
        from attn_audit.predeploy.check import check_config

        result.data["check_config"] = check_config(
            model, tokenizer, info, config.check_config, all_data[-1].held_out, _filler(all_data),
            eps=float(result.data.get("plan_summary", {}).get("eps_key") or result.primary_eps_key),
            batch_size=config.batch_size, pad_id=pad, retrieval_samples=config.retrieval_samples,
            retrieval_lens=_retrieval_lens(result, config, info), seed=config.seed)


def _speed(model: Any, result: AuditResult, config: AuditConfig, all_data: list[TokenData],
           info: dict[str, Any]) -> None:
    """``verify.speed``: the kernel plan, as ``apply_plan`` runs it, timed against the model's own
    kernel per layer and head at the target length, on the dataset's own tokens."""
    import torch

    from attn_audit.apply import load_plan
    from attn_audit.export.base import ExportError
    from attn_audit.predeploy.speed import plan_speed

    verify = result.data["verify"]
    try:
        loaded = load_plan(result)
    except ExportError as exc:
        verify["speed"] = {"skipped_reason": f"no kernel plan to time ({exc})"}
        return
    if not loaded.heads:
        verify["speed"] = {"skipped_reason": "the kernel plan keeps every head dense"}
        return
    summary = result.data.get("plan_summary") or {}
    n = int(loaded.source.get("target_len") or summary.get("target_len") or config.seq_len)
    n = min(n, info["max_positions"] or n)
    tokens = _filler(all_data) or [0]
    tokens = (tokens * (n // len(tokens) + 1))[:n]
    best = verify.get("largest_plan_heads")
    prefix = best is not None and 0 < best < len(result.data.get("plan") or [])
    if prefix:  # time the plan the search recommends: its first `best` heads
        from attn_audit.export.flex import flex_plan_of

        source = flex_plan_of(result, best)
    else:
        source = loaded.source
    verify["speed"] = plan_speed(model, source, torch.tensor([tokens]), warmup=1, reps=3,
                                 oracle_flops_saving=summary.get("oracle_flops_saving"),
                                 label="the kernel plan (apply_plan): compiled FlexAttention per head pattern"
                                 + (f", its first {best} heads (the largest plan within budget)" if prefix else ""))
    verify["speed"]["plan_heads"] = best if prefix else len(result.data.get("plan") or [])


def _filler(all_data: list[TokenData]) -> list[int]:
    """The dataset's own tokens (held-out first, then audited) to hide passkeys in."""
    return [t for td in all_data for seq in (*td.held_out, *td.sequences) for t in seq]


def _retrieval_lens(result: AuditResult, config: AuditConfig, info: dict[str, Any]) -> tuple[int, ...]:
    """``--retrieval-len``, else the plan's target length (at most the model's positions)."""
    target = int((result.data.get("plan_summary") or {}).get("target_len") or config.seq_len)
    return config.retrieval_lens or (min(target, info["max_positions"] or target),)


def _retrieval(model: Any, tokenizer: Any, result: AuditResult, all_data: list[TokenData], config: AuditConfig,
               info: dict[str, Any]) -> Any:
    """``verify.retrieval``: passkey accuracy, dense and with the plan installed (causal LMs only).
    Returns the prompts with their dense outcomes (a ``RetrievalProbe``) for the plan search, or
    None where the check did not run."""
    verify = result.data.get("verify")
    if not isinstance(verify, dict) or config.retrieval_samples == 0:
        return None
    if not info["causal"]:
        verify["retrieval"] = {"skipped_reason": "an encoder does not generate, so there is no passkey to ask for"}
        return None
    if all_data[-1].kind != "text":
        verify["retrieval"] = {"skipped_reason": "pre-tokenized data: no text stream to hide a passkey in"}
        return None
    from attn_audit.predeploy.retrieval import prepare_retrieval
    from attn_audit.verify import plan_installer

    lengths = _retrieval_lens(result, config, info)
    label = plan_installer(result, lengths[0])[1]
    try:
        probe = prepare_retrieval(model, tokenizer, _filler(all_data), lengths, config.retrieval_samples,
                                  seed=config.seed, batch_size=config.batch_size)
    except ValueError as exc:  # a length too short to hold the instruction, the key and the question
        if config.retrieval_lens:
            raise ConfigError(f"--retrieval-len: {exc}; use a longer length") from None
        verify["retrieval"] = {"skipped_reason": f"the target length is too short for a passkey prompt ({exc}); "
                                                 "give --retrieval-len"}
        return None
    verify["retrieval"] = probe.check(model, lambda n: plan_installer(result, n)[0], label)
    return probe
