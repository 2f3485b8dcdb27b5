"""Pre-deployment checks: the passkey retrieval check (prompts, the dense/plan comparison, a plan
that loses the key failing the gate) and its place in the audit and every report."""

from __future__ import annotations

import json

import pytest

from attn_audit import AuditConfig, MeasureSpec, audit
from attn_audit.data import bundled_texts, token_stream
from attn_audit.gate import decide, parse
from attn_audit.predeploy import build_prompts, retrieval_check
from attn_audit.report import get_renderer
from attn_audit.result import AuditResult
from attn_audit.verify import oracle_installer
from tests.conftest import tiny_model


class _CharTok:
    """One token per character (ids 5..), EOS 1; accepts a string or a list of strings."""

    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        enc = lambda t: [5 + (ord(c) % 200) for c in t]  # noqa: E731
        return {"input_ids": enc(text) if isinstance(text, str) else [enc(t) for t in text]}


class _WordTok(_CharTok):
    """One token per word or newline: short prompts for a tiny model."""

    def __call__(self, text, add_special_tokens=False):
        import re

        enc = lambda t: [5 + sum(map(ord, w)) % 200 for w in re.findall(r"\S+|\n", t)]  # noqa: E731
        return {"input_ids": enc(text) if isinstance(text, str) else [enc(t) for t in text]}


def test_prompts_have_the_length_the_key_at_its_depth_and_the_answer_last():
    tok = _CharTok()
    filler = [5 + (ord(c) % 200) for c in "lorem ipsum dolor sit amet " * 40]
    prompts = build_prompts(tok, filler, [300, 400], samples=2, seed=3, depths=(0.0, 0.5, 1.0))
    assert len(prompts) == 2 * 3 * 2
    for p in prompts:
        assert len(p.ids) == p.length
        assert p.ids[-len(p.answer):] == p.answer == tok(" " + p.key)["input_ids"]
        needle = tok(f"\nThe pass key is {p.key}.")["input_ids"]
        at = next(i for i in range(len(p.ids)) if p.ids[i:i + len(needle)] == needle)
        head = len(tok(
            "There is important information hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about it.\n")["input_ids"])
        room = p.length - len(p.answer) - len(tok("\nWhat is the pass key? The pass key is")["input_ids"]) - head \
            - len(tok(f"\nThe pass key is {p.key}. Remember it. {p.key} is the pass key.\n")["input_ids"])
        assert at == head + round(p.depth * room)
    assert len({p.key for p in prompts}) > 1
    with pytest.raises(ValueError, match="filler"):
        build_prompts(tok, filler[:10], [300], samples=1, seed=0)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_audit_records_retrieval_or_why_not(family):
    """Through the pipeline: a random tiny LM never finds the key, so the check says it is
    uninformative and the gate metric is absent (unevaluable); an encoder is skipped with a reason."""
    model = tiny_model(family)
    cfg = AuditConfig(seq_lens=(32,), num_sequences=2, measure=MeasureSpec(min_keys=4), reservoir_size=32,
                      verify=True, verify_sequences=1, retrieval_samples=1, retrieval_lens=(100,))
    texts = [f"fortune number {i}: the quick brown fox jumps over the lazy dog" for i in range(40)]
    result = audit(model, _WordTok(), texts, cfg, name="tiny")
    r = result.data["verify"]["retrieval"]
    if family == "bert":
        assert "encoder" in r["skipped_reason"]
    else:
        assert r["lengths"] == [100] and len(r["cells"]) == 5 and all(c["n"] == 1 for c in r["cells"])
        assert r["dense_accuracy"] is None and r["drop"] is None and r["uninformative"]
        assert "uninformative" in get_renderer("md").render(result)
        # an informative block (as from the SmolLM2 test below) shows in every report
        r.update(cells=[{**c, "dense_correct": 1, "plan_correct": 0, "lost": 1, "dense_accuracy": 1.0,
                         "plan_accuracy": 0.0, "informative": True} for c in r["cells"]],
                 informative_samples=5, dense_accuracy=1.0, plan_accuracy=0.0, lost=5, drop=1.0, uninformative=[])
        for fmt in ("md", "terminal", "html"):
            text = get_renderer(fmt).render(result, width=200)
            assert "retrieval" in text and "5 key(s) lost" in text, fmt
        assert json.loads(get_renderer("json").render(result))["verify"]["retrieval"]["lost"] == 5
        assert decide(result, [parse("retrieval_drop > 0")]).to_dict()["checks"][0]["status"] == "failed"
        r["drop"] = None
    outcome = decide(result, [parse("retrieval_drop > 0")])
    assert outcome.to_dict()["checks"][0]["status"] == "unevaluable"


@pytest.mark.slow
def test_smollm2_too_small_budget_loses_the_passkey_and_fails_the_gate(smollm2, tmp_path):
    """SmolLM2 finds a 5-digit key in ~480 tokens of fortunes; with every head kept to its 2 largest
    keys per row it loses it (retrieval_drop > 0 fails the gate), with every key kept it loses none."""
    model, tok = smollm2.model, smollm2.tokenizer
    filler, _ = token_stream(bundled_texts(), tok, seed=1, needed=4000)
    heads = [(layer, h) for layer in range(smollm2.info["num_layers"]) for h in range(smollm2.info["num_heads"])]
    sinks = 1

    def check(k: int) -> dict:
        install = oracle_installer({h: k for h in heads}, sinks)
        return retrieval_check(model, tok, filler, [480], 1, lambda n: install, label=f"top-{k}",
                               depths=(0.25, 1.0), seed=0, batch_size=2)

    tiny = check(2)
    assert tiny["dense_accuracy"] == 1.0 and tiny["informative_samples"] == 2
    assert tiny["plan_accuracy"] == 0.0 and tiny["lost"] == 2 and tiny["drop"] == 1.0
    full = check(480)
    assert full["plan_accuracy"] == 1.0 and full["drop"] == 0.0

    for block, status in ((tiny, "failed"), (full, "passed")):
        result = AuditResult({"schema_version": 1, "model": smollm2.info, "run": {}, "heads": [],
                              "verify": {"retrieval": block}})
        gate = decide(result, [parse("retrieval_drop > 0")]).to_dict()
        assert gate["checks"][0]["status"] == status


def test_retrieved_reads_only_the_answer_logits_and_agrees_with_full_logits():
    """``retrieved`` asks the model for the last answer positions only (``logits_to_keep``): a prompt
    whose answer is the model's own greedy continuation (from the full logits) is retrieved, one
    digit changed is not, and a model without ``logits_to_keep`` gives the same verdicts."""
    import torch

    from attn_audit.predeploy.retrieval import PasskeyPrompt, retrieved

    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(3):
        ids = torch.randint(5, 200, (40,), generator=g).tolist()
        with torch.no_grad():
            for _ in range(3):  # greedy: append the model's own next tokens as the answer
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        answer = ids[-3:]
        prompts.append(PasskeyPrompt(43, 0.5, "k", ids, answer))
        wrong = answer[:-1] + [(answer[-1] + 1) % 256]
        prompts.append(PasskeyPrompt(43, 0.5, "k", ids[:-3] + wrong, wrong))
    calls = []

    class Plain(torch.nn.Module):  # no logits_to_keep in its signature
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
            calls.append(out.logits.shape[1])
            return out

    want = [True, False] * 3
    assert retrieved(model, prompts, batch_size=4) == want
    assert retrieved(Plain(), prompts, batch_size=4) == want and calls == [43, 43]
