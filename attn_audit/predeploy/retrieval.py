"""Long-context retrieval check: does the model still find a passkey with the plan installed?

Perplexity misses retrieval failures: a head that drops a few distant keys barely moves the
average loss, but loses the one key a lookup needs. So, as in the passkey test of Mohtashami &
Jaggi (arXiv 2305.16300), a random 5-digit key is hidden at several depths (0 = right after the
instruction, 1 = right before the question) of the dataset's own text, padded to each length,
and asked for at the end::

    <instruction> <text ...> The pass key is 71432. Remember it. 71432 is the pass key. <text ...>
    What is the pass key? The pass key is 71432

A prompt counts as retrieved when greedy decoding after "The pass key is" returns the key's
tokens. That is checked by teacher forcing in one forward: greedy decoding returns the answer
tokens a_1..a_m exactly when each a_t is the argmax after the prompt and a_1..a_{t-1}, so one
pass over the prompt plus the answer decides it, and every position (the whole prefill) runs
through the installed plan.

Small models retrieve only up to some length (SmolLM2-135M: all keys at ~1000 tokens, none at
~3500), so accuracy is first measured on the dense model, per length and depth; the plan is
compared only in the cells where the dense model succeeds (at least :data:`MIN_DENSE_ACCURACY`),
and the result says plainly where the check is uninformative.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MIN_DENSE_ACCURACY = 0.5
INSTRUCTION = ("There is important information hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about it.\n")
QUESTION = "\nWhat is the pass key? The pass key is"

Installer = Callable[[Any], AbstractContextManager[Any]]
"""Installs a plan on a model for the duration of a ``with`` block (the one pluggable step)."""


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt: ``ids`` (exactly ``length`` tokens) end with the ``answer`` tokens."""

    length: int
    depth: float
    key: str
    ids: list[int]
    answer: list[int]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def clean_filler(filler: Sequence[int], tokenizer: Any) -> list[int]:
    """The filler tokens with special ids (EOS/SEP/BOS/PAD separators of the packed stream)
    replaced by a newline, so the text reads as plain prose."""
    special = {getattr(tokenizer, a, None) for a in ("eos_token_id", "sep_token_id", "bos_token_id",
                                                     "pad_token_id", "cls_token_id")} - {None}
    newline = _encode(tokenizer, "\n")
    out: list[int] = []
    for t in filler:
        out.extend(newline if t in special else [int(t)])
    return out


def build_prompts(tokenizer: Any, filler: Sequence[int], lengths: Sequence[int], samples: int, seed: int,
                  depths: Sequence[float] = DEPTHS) -> list[PasskeyPrompt]:
    """``samples`` passkey prompts per length and depth, each exactly ``length`` tokens.

    ``filler``: the dataset's token stream (cleaned with :func:`clean_filler`); each prompt reads a
    seeded window of it. Raises ValueError when a length leaves no room for the filler."""
    rng = random.Random(seed)
    head, question = _encode(tokenizer, INSTRUCTION), _encode(tokenizer, QUESTION)
    out = []
    for n in lengths:
        for depth in depths:
            for _ in range(samples):
                key = str(rng.randint(10000, 99999))
                needle = _encode(tokenizer, f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n")
                answer = _encode(tokenizer, " " + key)
                room = n - len(head) - len(needle) - len(question) - len(answer)
                if room < 1 or room > len(filler):
                    raise ValueError(f"length {n} leaves {room} filler tokens (the data has {len(filler)})")
                start = rng.randint(0, len(filler) - room)
                text = list(filler[start:start + room])
                cut = round(depth * room)
                ids = head + text[:cut] + needle + text[cut:] + question + answer
                out.append(PasskeyPrompt(n, float(depth), key, ids, answer))
    return out


def retrieved(model: Any, prompts: Sequence[PasskeyPrompt], batch_size: int) -> list[bool]:
    """Per prompt, whether greedy decoding returns its key (teacher-forced, one forward per batch).

    Prompts of one length run in batches of ``batch_size`` (same length: no padding). Only the
    answer's positions get logits (``logits_to_keep`` where the model takes it): the full
    (batch, n, vocab) logits would be 3 GB for 4 prompts of 4096 tokens of a 49k vocabulary."""
    import inspect

    device = next(model.parameters()).device
    trims = "logits_to_keep" in inspect.signature(model.forward).parameters
    out = [False] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(p.length, []).append(i)
    with torch.inference_mode():
        for n, members in by_length.items():
            keep = max(len(prompts[i].answer) for i in members) + 1
            for start in range(0, len(members), batch_size):
                idx = members[start:start + batch_size]
                ids = torch.tensor([prompts[i].ids for i in idx], device=device)  # (b, n)
                extra = {"logits_to_keep": keep} if trims else {}
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
                first = n - logits.shape[1]  # the position of logits[:, 0]
                for row, i in enumerate(idx):
                    m = len(prompts[i].answer)
                    pred = logits[row, n - m - 1 - first:n - 1 - first].argmax(-1).tolist()  # t predicts t + 1
                    out[i] = pred == prompts[i].answer
    return out


def prepare_retrieval(model: Any, tokenizer: Any, filler: Sequence[int], lengths: Sequence[int], samples: int, *,
                      seed: int = 0, batch_size: int = 4, depths: Sequence[float] = DEPTHS) -> RetrievalProbe:
    """Build the passkey prompts from ``filler`` (the dataset's tokens) and run them on the dense
    model. Raises ValueError when a length cannot hold a prompt."""
    text = clean_filler(filler, tokenizer)
    if text and len(text) < max(lengths):  # a small dataset: read it again (repeats are still filler)
        text = text * (max(lengths) // len(text) + 1)
    prompts = build_prompts(tokenizer, text, lengths, samples, seed, depths)
    return RetrievalProbe(prompts, retrieved(model, prompts, batch_size), tuple(int(n) for n in lengths),
                          tuple(float(d) for d in depths), samples, batch_size)


def retrieval_check(model: Any, tokenizer: Any, filler: Sequence[int], lengths: Sequence[int], samples: int,
                    install_at: Callable[[int], Installer], *, label: str, seed: int = 0, batch_size: int = 4,
                    depths: Sequence[float] = DEPTHS) -> dict[str, Any]:
    """Passkey accuracy of the dense model and under the plan (``install_at(n)`` installs it for
    prompts of ``n`` tokens), per length and depth.

    Returns the ``verify.retrieval`` block: ``cells`` (length, depth, n, dense/plan correct and
    accuracy, ``lost`` = keys the dense model found and the plan did not, ``informative``), and over
    the informative cells ``dense_accuracy``, ``plan_accuracy``, ``lost`` and ``drop`` = lost / samples
    (None when no cell is informative), plus ``uninformative`` sentences."""
    probe = prepare_retrieval(model, tokenizer, filler, lengths, samples, seed=seed, batch_size=batch_size,
                              depths=depths)
    return probe.check(model, install_at, label)


@dataclass
class RetrievalProbe:
    """Passkey prompts and the dense model's outcomes, built once (:func:`prepare_retrieval`), so
    several plans (a plan and its prefixes) are checked against the same keys."""

    prompts: list[PasskeyPrompt]
    dense: list[bool]
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    samples: int
    batch_size: int

    def plan_outcomes(self, model: Any, install_at: Callable[[int], Installer]) -> list[bool]:
        """Per prompt, whether the model finds the key with the plan installed."""
        plan = [False] * len(self.prompts)
        for n in self.lengths:
            idx = [i for i, p in enumerate(self.prompts) if p.length == n]
            with install_at(n)(model):
                for i, ok in zip(idx, retrieved(model, [self.prompts[i] for i in idx], self.batch_size)):
                    plan[i] = ok
        return plan

    def drop(self, model: Any, install_at: Callable[[int], Installer]) -> float | None:
        """Share of the informative cells' keys the dense model found and the plan loses (None: no
        informative cell)."""
        return self.summary(self.plan_outcomes(model, install_at), "")["drop"]

    def check(self, model: Any, install_at: Callable[[int], Installer], label: str) -> dict[str, Any]:
        """The ``verify.retrieval`` block of one plan (see :func:`retrieval_check`)."""
        return self.summary(self.plan_outcomes(model, install_at), label)

    def summary(self, plan: list[bool], label: str) -> dict[str, Any]:
        """Per length and depth cells, and totals over the informative ones."""
        prompts, dense, lengths, depths, samples = self.prompts, self.dense, self.lengths, self.depths, self.samples
        cells = []
        for n in lengths:
            for depth in depths:
                sel = [i for i, p in enumerate(prompts) if p.length == n and p.depth == float(depth)]
                d = sum(dense[i] for i in sel)
                s = sum(plan[i] for i in sel)
                lost = sum(dense[i] and not plan[i] for i in sel)
                cells.append({"length": int(n), "depth": float(depth), "n": len(sel), "dense_correct": d,
                              "plan_correct": s, "lost": lost, "dense_accuracy": d / len(sel),
                              "plan_accuracy": s / len(sel), "informative": d / len(sel) >= MIN_DENSE_ACCURACY})
        good = [c for c in cells if c["informative"]]
        total = sum(c["n"] for c in good)
        uninformative = []
        for n in lengths:
            bad = [c for c in cells if c["length"] == n and not c["informative"]]
            if bad:
                found = sum(c["dense_correct"] for c in bad)
                where = ", ".join(f"{c['depth']:g}" for c in bad)
                uninformative.append(
                    f"length {n}, depth {where}: the dense model found only {found}/{sum(c['n'] for c in bad)} keys, "
                    "so the check says nothing about the plan there")
        return {
            "method": "passkey (5 digits) hidden in the dataset's own text at each depth, asked for at the end; "
                      "retrieved when greedy decoding returns the key (teacher-forced, one forward)",
            "plan": label,
            "lengths": [int(n) for n in lengths],
            "depths": [float(d) for d in depths],
            "samples_per_cell": samples,
            "min_dense_accuracy": MIN_DENSE_ACCURACY,
            "cells": cells,
            "informative_samples": total,
            "dense_accuracy": sum(c["dense_correct"] for c in good) / total if total else None,
            "plan_accuracy": sum(c["plan_correct"] for c in good) / total if total else None,
            "lost": sum(c["lost"] for c in good),
            "drop": sum(c["lost"] for c in good) / total if total else None,
            "uninformative": uninformative,
        }
