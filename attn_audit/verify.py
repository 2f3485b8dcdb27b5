"""Verify a plan by simulation: apply it inside the model on held-out sequences.

The plan's heads keep only their top-k keys per row (exactly, renormalised), applied through the
same attention interface as the capture. Per head, the relative output error
||o - o_hat|| / ||o|| and the tail mass actually dropped are measured on the dense pass (so each
head's error is its own, not propagated). Model-wide, the perplexity ratio (causal LMs) or the
cosine of final hidden states (encoders) and the top-1 next-token agreement come from sparse
passes. The plan is then grown down the ranking: the largest prefix whose perplexity increase
stays within ``max_ppl_increase`` is found by bisection over prefix sizes (this equals greedy
growth when the increase is monotone in the prefix, which holds in practice; each probe is one
pass over the held-out set). The sink + local-window pattern with the same budget is measured
for the full plan as a comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np
import torch

from attn_audit.capture.interface import (
    AttentionCall,
    attention_probs,
    capturing,
    scores,
)
from attn_audit.config import AuditConfig
from attn_audit.data import batches
from attn_audit.result import AuditResult


def keep_mask(s: torch.Tensor, k: int, pattern: str, sinks: int) -> torch.Tensor:
    """Boolean (…, rows, keys) mask of the keys a sparse head keeps.

    Args:
        s: (…, rows, keys) scores with disallowed keys at -inf (rows are positions 0..rows-1).
        k: keys kept per row.
        pattern: "top-k" (the k largest scores) or "sink-window" (the first ``sinks`` keys and the
            last k - sinks allowed positions).
    """
    allowed = torch.isfinite(s)
    n = s.shape[-1]
    if k >= n:
        return allowed
    if pattern == "top-k":
        idx = torch.topk(s, k, dim=-1).indices
        keep = torch.zeros_like(allowed)
        keep.scatter_(-1, idx, True)
        return keep & allowed
    rows = s.shape[-2]
    i = torch.arange(rows, device=s.device).view(-1, 1)
    j = torch.arange(n, device=s.device).view(1, -1)
    w = max(k - sinks, 1)
    return allowed & ((j < sinks) | (j > i - w))


class _PlanApplier:
    """Attention consumer computing dense or plan-sparse outputs (batch, pos, head, d_head)."""

    def __init__(self, budgets: dict[tuple[int, int], int], pattern: str, sinks: int, measure: bool) -> None:
        self.budgets = budgets
        self.pattern = pattern
        self.sinks = sinks
        self.measure = measure
        self.active: set[tuple[int, int]] = set()
        self.errors: dict[tuple[int, int], list[np.ndarray]] = {}
        self.tails: dict[tuple[int, int], list[np.ndarray]] = {}
        self.mask: torch.Tensor | None = None

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        s = scores(call)  # (b, H, S, S) float32
        p = attention_probs(call)  # with a sink column, rows sum to 1 - sink mass
        groups = call.query.shape[1] // call.key.shape[1]
        v = call.value.float().repeat_interleave(groups, dim=1)  # (b, H, S, d)
        out = p @ v
        for (layer, head), k in self.budgets.items():
            if layer != call.layer:
                continue
            keep = keep_mask(s[:, head], k, self.pattern, self.sinks)
            ph = p[:, head] * keep
            kept = ph.sum(-1, keepdim=True)
            # renormalised over the kept keys and any sink column (whose mass is 1 - the keys' total)
            sink = 1 - p[:, head].sum(-1, keepdim=True) if not call.plain else 0.0
            o_hat = (ph / (kept + sink).clamp_min(1e-30)) @ v[:, head]
            if self.measure:
                o = out[:, head]
                rel = (o - o_hat).norm(dim=-1) / o.norm(dim=-1).clamp_min(1e-12)
                valid = self.mask.bool() if self.mask is not None else torch.ones_like(rel, dtype=torch.bool)
                self.errors.setdefault((layer, head), []).append(rel[valid].cpu().numpy())
                self.tails.setdefault((layer, head), []).append((1 - sink - kept).squeeze(-1)[valid].cpu().numpy())
            if (layer, head) in self.active:
                out[:, head] = o_hat
        return out.transpose(1, 2).to(call.query.dtype).contiguous()


def _model_pass(model: Any, sequences: list[list[int]], applier: _PlanApplier, batch_size: int, pad_id: int,
                causal: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per batch: (logits or last hidden state, attention mask)."""
    device = next(model.parameters()).device
    outs, masks = [], []
    with torch.inference_mode(), capturing(model, applier):
        for _, ids, mask in batches(sequences, batch_size, pad_id):
            applier.mask = mask.to(device)
            res = model(input_ids=ids.to(device), attention_mask=mask.to(device))
            outs.append((res.logits if causal and hasattr(res, "logits") else res.last_hidden_state).float().cpu())
            masks.append(mask)
    return outs, masks


def _compare(dense: list[torch.Tensor], sparse: list[torch.Tensor], masks: list[torch.Tensor],
             sequences: list[list[int]], causal: bool) -> dict[str, float]:
    if not causal:
        cos, agree, n = 0.0, 0.0, 0
        for d, s, m in zip(dense, sparse, masks):
            sel = m.bool()
            cos += torch.nn.functional.cosine_similarity(d[sel], s[sel], dim=-1).sum().item()
            n += int(sel.sum())
        return {"hidden_cosine": cos / max(n, 1)}
    nll_d = nll_s = agree = 0.0
    n = 0
    off = 0
    for d, s, m in zip(dense, sparse, masks):
        ids = torch.zeros(m.shape, dtype=torch.long)
        for i in range(m.shape[0]):
            seq = sequences[off + i]
            ids[i, : len(seq)] = torch.tensor(seq)
        off += m.shape[0]
        tgt = ids[:, 1:]
        valid = (m[:, 1:] * m[:, :-1]).bool()
        ld = torch.log_softmax(d[:, :-1], -1).gather(-1, tgt[..., None]).squeeze(-1)
        ls = torch.log_softmax(s[:, :-1], -1).gather(-1, tgt[..., None]).squeeze(-1)
        nll_d -= ld[valid].sum().item()
        nll_s -= ls[valid].sum().item()
        agree += (d[:, :-1].argmax(-1) == s[:, :-1].argmax(-1))[valid].sum().item()
        n += int(valid.sum())
    n = max(n, 1)
    return {
        "ppl_dense": math.exp(nll_d / n),
        "ppl_sparse": math.exp(nll_s / n),
        "ppl_ratio": math.exp((nll_s - nll_d) / n),
        "top1_agreement": agree / n,
    }


def _plan_budgets(plan: list[dict[str, Any]], target: int,
                  n: int) -> tuple[dict[tuple[int, int], int], list[tuple[int, int]]]:
    """Keys kept per row by each plan head at length ``n`` (its ``k`` when the plan was made for ``n``, else
    its key fraction ``kfrac`` of ``n``; at most ``n``), keyed by (layer, head), and the heads in plan order."""
    budgets: dict[tuple[int, int], int] = {}
    order: list[tuple[int, int]] = []
    for entry in plan:
        k = int(entry["k"]) if target == n else max(1, math.ceil(float(entry.get("kfrac") or 1.0) * n))
        budgets[(entry["layer"], entry["head"])] = min(k, n)
        order.append((entry["layer"], entry["head"]))
    return budgets, order


def _cost(metrics: dict[str, float], causal: bool) -> float:
    """The quality a sparse pass lost: ppl_ratio - 1 (causal LMs) or 1 - hidden_cosine (encoders)."""
    return metrics["ppl_ratio"] - 1.0 if causal else 1.0 - metrics["hidden_cosine"]


def _largest_prefix(probe: Callable[[int], dict[str, Any]], full: dict[str, Any], heads: int,
                    ok: Callable[[dict[str, Any]], bool]) -> tuple[int, dict[int, dict[str, Any]]]:
    """The largest number of plan heads (a prefix of the ranking) whose metrics are ``ok``, found
    by bisection, and the metrics of every prefix size probed.

    ``probe(m)`` measures the model with the first ``m`` heads sparse; ``full`` is ``probe(heads)``.
    """
    lo, hi = 0, heads
    probes = {heads: full}
    if heads and not ok(full):
        while hi - lo > 1:
            mid = (lo + hi) // 2
            probes[mid] = probe(mid)
            if ok(probes[mid]):
                lo = mid
            else:
                hi = mid
        best = lo
    else:
        best = heads
    return best, probes


def _head_errors(dense_app: _PlanApplier, budgets: dict[tuple[int, int], int]) -> list[dict[str, Any]]:
    """Per plan head, sorted by (layer, head): its budget and the mean and 99th percentile of the relative
    output error and of the dropped tail mass over the valid rows of the dense (measuring) pass."""
    heads = []
    for (layer, head), errs in dense_app.errors.items():
        e = np.concatenate(errs)
        t = np.concatenate(dense_app.tails[(layer, head)])
        heads.append({
            "layer": layer, "head": head, "k": budgets[(layer, head)],
            "rel_error_mean": float(e.mean()), "rel_error_p99": float(np.quantile(e, 0.99)),
            "tail_mass_mean": float(t.mean()), "tail_mass_p99": float(np.quantile(t, 0.99)),
        })
    heads.sort(key=lambda h: (h["layer"], h["head"]))
    return heads


def oracle_installer(budgets: dict[tuple[int, int], int], sinks: int) -> Callable[[Any], AbstractContextManager[Any]]:
    """An installer (``install(model)`` -> a context manager) that runs each (layer, head) of
    ``budgets`` on its exact top-k keys per row, renormalised: the oracle bound no kernel beats."""

    def install(model: Any) -> AbstractContextManager[Any]:
        app = _PlanApplier(budgets, "top-k", sinks, measure=False)
        app.active = set(budgets)
        return capturing(model, app)

    return install


KERNEL_LABEL = "kernel patterns run by FlexAttention (apply_plan)"
ORACLE_LABEL = "oracle top-k simulation, an upper bound"


COMPILE_FROM = 2048
"""From this length on the pre-deployment checks run the plan with compiled FlexAttention: eager
FlexAttention computes every (query, key) score and evaluates the mask on the whole grid (in
bounded query chunks, but the work is quadratic), while the compiled kernel skips the tiles the
plan drops; one compilation per shape (tens of seconds on CPU) is then the smaller cost."""


def kernel_installer(result: AuditResult, heads: int | None = None,
                     compile: bool = False) -> Callable[[Any], AbstractContextManager[Any]]:
    """An installer that runs ``result``'s kernel plan (``plan[]``: each head's block pattern; with
    ``heads``, only its first ``heads`` entries) inside the model with
    :func:`attn_audit.apply.apply_plan`, and restores the model after. Eager FlexAttention by
    default (the same kept keys as the compiled kernel, without the compile time); ``compile``:
    the compiled kernel."""
    from attn_audit.export.flex import flex_plan_of

    plan = flex_plan_of(result, heads)

    @contextmanager
    def install(model: Any) -> Iterator[None]:
        from attn_audit.apply import apply_plan, remove_plan

        apply_plan(model, plan, compile=compile)
        try:
            yield
        finally:
            remove_plan(model)

    return install


def has_kernel_plan(result: AuditResult) -> bool:
    """The result plans at least one head onto a kernel pattern."""
    return (result.data.get("plan_summary") or {}).get("kind") == "kernel" and bool(result.data.get("plan"))


def plan_installer(result: AuditResult, n: int) -> tuple[Callable[[Any], AbstractContextManager[Any]], str]:
    """The one pluggable step of the pre-deployment checks: ``(install, label)`` where
    ``install(model)`` is a context manager that runs ``result``'s plan inside the model at length ``n``:
    the kernel plan through FlexAttention where the audit measured patterns (compiled from
    :data:`COMPILE_FROM` tokens on), else the oracle top-k simulation (:func:`oracle_installer`),
    labelled as the bound it is."""
    if has_kernel_plan(result):
        return kernel_installer(result, compile=n >= COMPILE_FROM), KERNEL_LABEL
    plan = result.data.get("plan") or []
    target = (result.data.get("plan_summary") or {}).get("target_len") or n
    budgets, _ = _plan_budgets(plan, target, n)
    return oracle_installer(budgets, int(result.run.get("sinks", 1))), ORACLE_LABEL


def verify_plan(model: Any, result: AuditResult, held_out: list[list[int]], config: AuditConfig, pad_id: int) -> None:
    """Fill ``result.data["verify"]`` by simulating the plan on ``held_out`` sequences."""
    plan = result.data.get("plan") or []
    causal = bool(result.model["causal"])
    if not held_out:
        result.data["verify"] = {"skipped_reason": "no held-out sequences were left after the audited ones"}
        return
    n = max(len(s) for s in held_out)
    target = (result.data.get("plan_summary") or {}).get("target_len") or n
    budgets, order = _plan_budgets(plan, target, n)
    sinks = int(result.run.get("sinks", 1))
    bs = config.batch_size
    dense_app = _PlanApplier(budgets, "top-k", sinks, measure=True)
    dense, masks = _model_pass(model, held_out, dense_app, bs, pad_id, causal)

    def probe(m: int, pattern: str = "top-k") -> dict[str, float]:
        """Model-wide metrics (vs the dense pass) with the plan's first ``m`` heads kept to ``pattern``."""
        app = _PlanApplier({h: budgets[h] for h in order[:m]}, pattern, sinks, measure=False)
        app.active = set(order[:m])
        sparse, _ = _model_pass(model, held_out, app, bs, pad_id, causal)
        return _compare(dense, sparse, masks, held_out, causal)

    full = probe(len(order)) if order else ({"ppl_ratio": 1.0, "top1_agreement": 1.0} if causal else {"hidden_cosine": 1.0})
    window = probe(len(order), "sink-window") if order else None
    heads = _head_errors(dense_app, budgets)
    result.data["verify"] = {
        "pattern": "top-k (exact per row, renormalised)",
        "sequences": len(held_out),
        "seq_len": n,
        "held_out": True,
        **full,
        "sink_window": window,
        "heads": heads,
        "max_ppl_increase": config.max_ppl_increase,
        "quality_metric": "ppl_ratio - 1" if causal else "1 - hidden_cosine",
        "label": ORACLE_LABEL,
    }
    if has_kernel_plan(result):  # the plan a kernel runs, applied to the model; searched by search_plan
        kernel = quality_under(kernel_installer(result), model, held_out, bs, pad_id, causal)
        result.data["verify"]["kernel"] = {"label": KERNEL_LABEL, **kernel, "heads": len(plan)}
        return
    best, probes = _largest_prefix(probe, full, len(order),
                                   lambda m: _cost(m, causal) <= config.max_ppl_increase)
    result.data["verify"].update(
        largest_plan_heads=best,
        largest_plan_flops_saving=sum(float(e.get("flops_saving_model") or 0.0) for e in plan[:best]),
        largest_plan=probes.get(best),
        method="bisection over prefixes of the oracle top-k plan (greedy growth down the ranking)",
    )


def search_plan(model: Any, result: AuditResult, held_out: list[list[int]], config: AuditConfig, pad_id: int,
                retrieval: Any = None) -> None:
    """The largest prefix of the kernel plan (in ranking order) that, applied in the model with
    FlexAttention, keeps the held-out quality cost within ``--max-ppl-increase`` and loses at most
    ``--max-retrieval-drop`` of the passkeys the dense model finds (``retrieval``: a
    :class:`~attn_audit.predeploy.retrieval.RetrievalProbe`, or None to judge by quality alone).
    Bisection over prefix sizes; fills ``verify.largest_plan*`` and ``verify.search``."""
    verify = result.data["verify"]
    plan = result.data.get("plan") or []
    causal = bool(result.model["causal"])
    bs = config.batch_size
    dense, masks = _plain_pass(model, held_out, bs, pad_id, causal)

    def probe(m: int) -> dict[str, Any]:
        with kernel_installer(result, m)(model):
            sparse, _ = _plain_pass(model, held_out, bs, pad_id, causal)
        metrics: dict[str, Any] = _compare(dense, sparse, masks, held_out, causal)
        if retrieval is not None:
            metrics["retrieval_drop"] = retrieval.drop(model, lambda n: kernel_installer(result, m, compile=n >= COMPILE_FROM))
        return metrics

    def ok(metrics: dict[str, Any]) -> bool:
        drop = metrics.get("retrieval_drop")
        return _cost(metrics, causal) <= config.max_ppl_increase and (
            drop is None or drop <= config.max_retrieval_drop + 1e-12)

    kernel = {k: v for k, v in verify["kernel"].items() if k not in ("label", "heads")}
    full_retrieval = verify.get("retrieval") or {}
    if retrieval is not None:
        kernel["retrieval_drop"] = full_retrieval.get("drop")
    best, probes = _largest_prefix(probe, kernel, len(plan), ok)
    verify.update(
        largest_plan_heads=best,
        largest_plan_flops_saving=sum(float(e.get("flops_saving_model") or 0.0) for e in plan[:best]),
        largest_plan=probes.get(best),
        max_retrieval_drop=config.max_retrieval_drop if retrieval is not None else None,
        method=("bisection over prefixes of the kernel plan applied with FlexAttention (greedy growth down "
                "the ranking): held-out quality" + (" and passkeys" if retrieval is not None else "")),
        search=[{"heads": m, **probes[m]} for m in sorted(probes)],
    )


def _plain_pass(model: Any, sequences: list[list[int]], batch_size: int, pad_id: int,
                causal: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per batch: (logits or last hidden state, attention mask) from the model as it is installed."""
    device = next(model.parameters()).device
    outs, masks = [], []
    with torch.inference_mode():
        for _, ids, mask in batches(sequences, batch_size, pad_id):
            res = model(input_ids=ids.to(device), attention_mask=mask.to(device))
            outs.append((res.logits if causal and hasattr(res, "logits") else res.last_hidden_state).float().cpu())
            masks.append(mask)
    return outs, masks


def quality_under(install: Callable[[Any], AbstractContextManager[Any]], model: Any, sequences: list[list[int]],
                  batch_size: int, pad_id: int, causal: bool) -> dict[str, float]:
    """Model-wide quality with a plan installed (``install(model)``, see :func:`plan_installer`)
    against the model's own attention on ``sequences``: ``ppl_dense``, ``ppl_sparse``, ``ppl_ratio``,
    ``top1_agreement`` (causal LMs) or ``hidden_cosine`` (encoders)."""
    dense, masks = _plain_pass(model, sequences, batch_size, pad_id, causal)
    with install(model):
        sparse, _ = _plain_pass(model, sequences, batch_size, pad_id, causal)
    return _compare(dense, sparse, masks, sequences, causal)
