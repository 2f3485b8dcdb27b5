"""A short calibration before the capture: the plain forward's time per token on a few of the
audit's own tokens, from which :func:`attn_audit.provenance.announce_work` estimates the run."""

from __future__ import annotations

import time
from typing import Any

import torch

from attn_audit.capture.seq2seq import forward_kwargs

# Tokens of the timed forward (after one untimed warm-up forward of a quarter of them).
CALIBRATION_TOKENS = 128


def forward_seconds_per_token(model: Any, sequences: list[list[int]], tokens: int = CALIBRATION_TOKENS) -> float:
    """Seconds per token of the plain forward (no capture) of the first ``tokens`` ids of ``sequences[0]``.

    One (1, tokens) forward is timed after an untimed (1, tokens // 4) warm-up (first-call costs:
    thread pools, lazy buffers). Returns NaN when there are no tokens.
    """
    ids = (sequences[0] if sequences else [])[:tokens]
    if not ids:
        return float("nan")
    device = next(model.parameters()).device
    base = getattr(model, "base_model", model)
    with torch.inference_mode():
        base(**forward_kwargs(model, torch.tensor([ids[: max(1, len(ids) // 4)]], device=device)))
        t0 = time.perf_counter()
        base(**forward_kwargs(model, torch.tensor([ids], device=device)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / len(ids)
