"""Kernel patterns of third-party configs as exact keep-masks, their kept attention mass, and an
installer that runs them inside the model.

A :class:`Pattern` says which keys a head attends to, the way the runtime that reads the config
chooses them:

- ``streaming`` (StreamingLLM, DuoAttention streaming heads, MInference ``stream_llm``): the first
  ``sinks`` keys and the last ``window`` keys (the query itself included);
- ``vertical-slash`` (MInference ``vertical_and_slash``, flex plans): the ``vertical`` key columns
  and ``slash`` diagonals with the largest attention of the last 64 queries (MInference's
  online estimate; it always adds the first 30 columns and the 100 most recent diagonals,
  ``forced_vertical`` / ``forced_slash``);
- ``block-topk`` (MInference ``block_sparse``, flex plans): per query block of ``block_size``
  rows, its diagonal block and the other key blocks with the largest mean-pooled Q·K score, up
  to ``blocks`` blocks;
- ``dense``: the model's own attention.

Masks are built per head from the layer's post-RoPE Q and K (the same inputs the runtime sees);
the kept mass of a row is the sum of its exact attention probabilities over the kept keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attn_audit.capture.interface import AttentionCall, allowed_mask, capturing, scores

LAST_Q = 64  # MInference's estimate reads the attention of the last 64 queries


@dataclass(frozen=True)
class Pattern:
    """One head's kernel pattern (sizes in keys, diagonals or blocks; see the module docstring)."""

    kind: str
    sinks: int = 0
    window: int = 0
    vertical: int = 0
    slash: int = 0
    forced_vertical: int = 0
    forced_slash: int = 0
    blocks: int = 0
    block_size: int = 64

    def describe(self) -> str:
        """A short label, e.g. ``streaming(sinks=4, window=256)``."""
        fields = {"streaming": ("sinks", "window"), "vertical-slash": ("vertical", "slash"),
                  "block-topk": ("blocks", "block_size")}.get(self.kind, ())
        return f"{self.kind}({', '.join(f'{f}={getattr(self, f)}' for f in fields)})" if fields else self.kind


def _topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of a 1-D ``score`` (-inf entries never kept)."""
    keep = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    k = min(k, int((score > float("-inf")).sum()))
    if k > 0:
        keep[torch.topk(score, k).indices] = True
    return keep & (score > float("-inf"))


def _forced(count: int, like: torch.Tensor) -> torch.Tensor:
    """Scores above any attention sum (at most LAST_Q) for the first ``count`` entries, decreasing, so
    a budget smaller than ``count`` keeps the earliest of them (deterministic, unlike ties at inf)."""
    count = min(count, like.shape[0])
    return 1e6 + torch.arange(count, 0, -1, device=like.device, dtype=like.dtype)


def keep_mask(p: Pattern, q: torch.Tensor, k: torch.Tensor, scale: float, allowed: torch.Tensor) -> torch.Tensor:
    """Boolean (L, L) mask of the keys head pattern ``p`` keeps.

    Args:
        q: (L, d) one head's post-RoPE queries of one sequence (valid positions only).
        k: (L, d) the keys of its KV head.
        scale: the softmax scale.
        allowed: (L, L) bool, the keys the model's own mask allows (causal, window, padding).
    """
    n = q.shape[0]
    i = torch.arange(n, device=q.device).view(-1, 1)
    j = torch.arange(n, device=q.device).view(1, -1)
    if p.kind == "dense":
        return allowed
    if p.kind == "streaming":
        return allowed & ((j < p.sinks) | ((i - j).abs() < p.window))
    if p.kind == "vertical-slash":
        last = min(LAST_Q, n)
        s = (q[-last:].float() @ k.float().T) * scale  # (last, L)
        s = s.masked_fill(~allowed[-last:], float("-inf"))
        a = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
        vertical = a.sum(0)  # (L,) per key column
        vertical[: p.forced_vertical] = _forced(p.forced_vertical, vertical)  # the first columns
        # diagonal i - j, shifted by n - 1 to index 0..2n-2; diagonals the estimate never sees are out
        offsets = (i[-last:] - j) + (n - 1)  # (last, L)
        slash = torch.zeros(2 * n - 1, device=q.device).scatter_add_(0, offsets.reshape(-1), a.reshape(-1))
        seen = torch.zeros(2 * n - 1, dtype=torch.bool, device=q.device)
        seen[offsets[allowed[-last:]]] = True
        slash = slash.masked_fill(~seen, float("-inf"))
        forced = _forced(p.forced_slash, slash[n - 1:])
        slash[n - 1:n - 1 + forced.shape[0]] = forced  # the most recent diagonals i - j = 0, 1, ...
        cols, diags = _topk_mask(vertical, p.vertical), _topk_mask(slash, p.slash)
        return allowed & (cols.view(1, -1) | diags[(i - j) + (n - 1)])
    if p.kind == "block-topk":
        b = p.block_size
        nb = (n + b - 1) // b
        pad = nb * b - n
        qp = torch.nn.functional.pad(q.float(), (0, 0, 0, pad)).view(nb, b, -1)
        kp = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).view(nb, b, -1)
        counts = torch.full((nb, 1), float(b), device=q.device)
        counts[-1] = b - pad
        score = (qp.sum(1) / counts) @ (kp.sum(1) / counts).T  # (nb, nb) mean-pooled Q.K
        bi, bj = torch.arange(nb, device=q.device).view(-1, 1), torch.arange(nb, device=q.device).view(1, -1)
        block_allowed = torch.zeros(nb, nb, dtype=torch.bool, device=q.device)  # blocks with an allowed key
        block_allowed[i.expand(n, n)[allowed] // b, j.expand(n, n)[allowed] // b] = True
        score = score.masked_fill(~block_allowed, float("-inf"))
        score = torch.where((bi == bj) & block_allowed, torch.tensor(float("inf"), device=q.device), score)
        chosen = torch.stack([_topk_mask(score[r], p.blocks) for r in range(nb)])  # (nb, nb)
        return allowed & chosen[i // b, j // b]
    raise ValueError(f"unknown pattern kind {p.kind!r}")


def _valid_lengths(call: AttentionCall) -> list[int]:
    """Per sequence of the batch, its valid (unpadded) length: the keys some query may attend to
    (right padding)."""
    allowed = allowed_mask(call)  # broadcastable to (b, H, S, S)
    b, n = call.query.shape[0], call.key.shape[2]
    cols = allowed.any(-2).reshape(allowed.shape[0], -1, n)[:, 0]  # (b or 1, S)
    lengths = cols.sum(-1).tolist()
    return [int(x) for x in (lengths if len(lengths) == b else lengths * b)]


class PatternRunner:
    """Attention consumer: per (layer, query head) pattern, the kept mass of every valid row
    (``measure``) and, with ``replace``, the layer's output with those heads on their pattern
    (probabilities renormalised over the kept keys), (batch, pos, head, d_head)."""

    def __init__(self, patterns: dict[tuple[int, int], Pattern], *, replace: bool, measure: bool) -> None:
        self.patterns = {hk: p for hk, p in patterns.items() if p.kind != "dense"}
        self.replace = replace
        self.measure = measure
        self.lost: dict[tuple[int, int], list[np.ndarray]] = {}

    def __call__(self, call: AttentionCall) -> torch.Tensor | None:
        heads = {h: p for (layer, h), p in self.patterns.items() if layer == call.layer}
        if not heads:
            return None
        s = scores(call)  # (b, H, S, S) float32, -inf where not allowed
        probs = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
        groups = call.query.shape[1] // call.key.shape[1]
        v = call.value.float().repeat_interleave(groups, dim=1)  # (b, H, S, d)
        out = probs @ v if self.replace else None
        for b, n in enumerate(_valid_lengths(call)):
            if n == 0:
                continue
            for h, p in heads.items():
                allowed = torch.isfinite(s[b, h, :n, :n])
                keep = keep_mask(p, call.query[b, h, :n], call.key[b, h // groups, :n], call.scaling, allowed)
                ph = probs[b, h, :n, :n] * keep
                kept = ph.sum(-1)  # (n,)
                if self.measure:
                    self.lost.setdefault((call.layer, h), []).append((1.0 - kept).clamp_min(0).cpu().numpy())
                if out is not None:
                    out[b, h, :n] = (ph / kept.clamp_min(1e-30).unsqueeze(-1)) @ v[b, h, :n]
        return None if out is None else out.transpose(1, 2).to(call.query.dtype).contiguous()


def pattern_installer(patterns: dict[tuple[int, int], Pattern]) -> Any:
    """An installer (``install(model)`` -> context manager) running ``patterns`` in the model."""

    @contextmanager
    def install(model: Any) -> Iterator[None]:
        with capturing(model, PatternRunner(patterns, replace=True, measure=False)):
            yield

    return install


def kept_mass(model: Any, sequences: list[list[int]], patterns: dict[tuple[int, int], Pattern], batch_size: int,
              pad_id: int) -> dict[tuple[int, int], np.ndarray]:
    """Per patterned (layer, head), the attention mass each valid row loses (1 - kept), over
    ``sequences`` with the model's own attention (nothing replaced)."""
    from attn_audit.data import batches

    runner = PatternRunner(patterns, replace=False, measure=True)
    device = next(model.parameters()).device
    with torch.inference_mode(), capturing(model, runner):
        for _, ids, mask in batches(sequences, batch_size, pad_id):
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
    return {hk: np.concatenate(v) for hk, v in runner.lost.items()}
