"""The HTML report's opening and closing: the summary cards, the gate's checks, the provenance.

The summary shows the model, data and run with the gate's verdict and the three headline numbers;
the checks table lists failed checks first; the provenance footer records everything needed to
reproduce the audit (versions, revision, dataset, token hash, settings) and what did not run.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from attn_audit.report.formatting import fmt_num, heads_shape, site_name, site_summary
from attn_audit.report.headlines import (
    NOT_RUN,
    gate_counts,
    gate_state,
    headline,
    left_out,
)
from attn_audit.report.html_page import Page, e, table, td

if TYPE_CHECKING:
    from attn_audit.result import AuditResult

__all__ = ["gate_section", "provenance_footer", "summary_section"]


def summary_section(page: Page) -> str:
    """The opening section: headline cards (gate, saving, quality, Gaussianity), run facts."""
    cards = _headline_cards(page)
    dl = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in _summary_facts(page))
    return (
        f'<section id="summary"><div class="cards">{cards}</div>'
        f'<dl class="facts">{dl}</dl></section>'
    )


def _card(label: str, value: str, detail: str, cls: str = "") -> str:
    """One headline card; a "not run" value greys it out unless ``cls`` says otherwise."""
    cls = cls or ("none" if value == NOT_RUN else "")
    return (
        f'<div class="card {cls}"><div class="k">{e(label)}</div>'
        f'<div class="v">{e(value)}</div><div class="d">{e(detail)}</div></div>'
    )


def _headline_cards(page: Page) -> str:
    """The four cards: gate verdict, planned FLOPs saving, quality cost, Gaussian-looking heads."""
    result = page.result
    run = result.run
    head = headline(result)
    gate_cls = {"PASS": "pass", "FAIL": "fail", "NO DATA": "fail"}.get(gate_state(result), "none")
    gate_word = head["gate"].split(" (")[0]
    gate_detail = head["gate"][len(gate_word) :].strip(" ()")
    flops_v, _, flops_d = head["flops"].partition(" (")
    gauss_v, _, gauss_d = head["gaussian"].partition(" (")
    quality_v, _, quality_d = head["quality"].partition(", ")
    summary = result.data.get("plan_summary") or {}
    return "".join(
        [
            _card(
                "gate verdict", gate_word, gate_detail or "no --fail-if or policy given", gate_cls
            ),
            _card(
                "planned FLOPs saving",
                flops_v,
                (
                    flops_d.rstrip(")") + f", eps={summary.get('eps_key', page.eps)}, "
                    f"n={summary.get('target_len', run.get('seq_len'))}"
                )
                if flops_d
                else "attention FLOPs, planned heads",
            ),
            _card("quality cost", quality_v, quality_d or "measured by the verification run"),
            _card(
                "Gaussian-looking heads",
                gauss_v,
                gauss_d.rstrip(")") + ": Q and K pass" if gauss_d else "Q/K Gaussianity tests",
            ),
        ]
    )


def _summary_facts(page: Page) -> list[tuple[str, str]]:
    """Model, shape, data and run in one line each, and a warning when nothing was measured."""
    result = page.result
    model, run = result.model, result.run
    dataset = run.get("dataset") or {}
    lens = ", ".join(str(n) for n in run.get("seq_lens") or [run.get("seq_len")])
    rows = run.get("rows")
    rows_text = (
        f"sampled, {run.get('rows_per_sequence')} per sequence" if rows == "sampled" else str(rows)
    )
    facts = [
        ("model", f"{model.get('name')} ({model.get('family')}, {model.get('source')})"),
        (
            "shape",
            f"{model.get('num_layers')} layers x {heads_shape(model)}"
            f"{'' if model.get('layer_heads') else ', head_dim ' + str(model.get('head_dim'))}, "
            f"{model.get('dtype')}, "
            f"{'encoder-decoder' if model.get('encoder_decoder') else 'causal' if model.get('causal') else 'bidirectional'}"
            f", {'RoPE' if model.get('rope') else 'no RoPE'}",
        ),
        ("data", f"{dataset.get('spec')}: {run.get('num_sequences')} sequences x {lens} tokens"),
        *([("sites", f"{site_summary(model)}; {run.get('inputs')}")] if site_summary(model) else []),
        (
            "run",
            f"eps {', '.join(run.get('eps_keys') or [])} (primary {page.eps}); rows "
            f"{rows_text}; {fmt_num(run.get('elapsed_s'))} s on {run.get('device')}",
        ),
    ]
    if result.rows_measured == 0:
        facts.append(("warning", "no query row was measured: nothing here is evidence"))
    return facts


def gate_section(page: Page) -> str:
    """The gate's checks, failed first; "" when no gate ran or it had no checks."""
    gate = page.result.data.get("gate")
    state = gate_state(page.result)
    if not isinstance(gate, dict) or state == "no checks":
        return ""
    counts = gate_counts(gate)
    order = {"failed": 0, "unevaluable": 1, "passed": 2}
    checks = sorted(gate.get("checks") or [], key=lambda c: order.get(str(c.get("status")), 1))
    rows = []
    for c in checks:
        status = re.sub(r"[^a-z]", "", str(c.get("status", "")).lower()) or "unevaluable"
        rows.append(
            f'<tr class="{status}">'
            + "".join(
                [
                    td(c.get("status"), None, f"status-{status}"),
                    td(c.get("name")),
                    f'<td class="mono">{e(c.get("expression"))}</td>',
                    td(fmt_num(c.get("value")), c.get("value")),
                    td(c.get("message")),
                ]
            )
            + "</tr>"
        )
    inner = (
        f"<p><strong>{e(state)}</strong>, exit code {e(gate.get('exit_code'))}: "
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['unevaluable']} "
        "unevaluable (an unevaluable check never counts as a pass).</p>"
    )
    if isinstance(gate.get("verdict"), str):
        inner += f'<p class="mono">{e(gate["verdict"])}</p>'
    if not rows:
        return page.section("gate", "Checks", inner)
    inner += table(
        "gate-table",
        [
            ("status", False),
            ("check", False),
            ("expression", False),
            ("value", True),
            ("message", False),
        ],
        rows,
    )
    return page.section("gate", "Checks", inner)


def provenance_footer(result: AuditResult) -> str:
    """The footer: what reproduces the audit (versions, data, settings), what did not run."""
    facts = _source_facts(result) + _capture_facts(result)
    dl = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts)
    return f'<footer id="provenance"><h2>Provenance</h2><dl class="facts">{dl}</dl></footer>'


def _source_facts(result: AuditResult) -> list[tuple[str, str]]:
    """Where the audit's inputs came from: tool and library versions, model, dataset, tokens."""
    model, run = result.model, result.run
    dataset = run.get("dataset") or {}
    versions = run.get("versions") or {}
    tool = result.data.get("tool") or {}
    return [
        ("attn-audit", tool.get("version") or versions.get("attn_audit", "?")),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or "n/a"),
        (
            "model",
            f"{model.get('name')} (source {model.get('source')}, revision "
            f"{model.get('revision') or 'n/a'}, trust_remote_code "
            f"{bool(model.get('trust_remote_code'))})",
        ),
        (
            "dataset",
            f"{dataset.get('spec')} (kind {dataset.get('kind')}, split "
            f"{dataset.get('split') or 'n/a'}, column {dataset.get('text_column') or 'n/a'}"
            f", {dataset.get('documents')} documents, {dataset.get('tokens')} tokens)",
        ),
        ("token hash", f"sha256 {dataset.get('token_hash') or 'n/a'}"),
    ]


def _capture_facts(result: AuditResult) -> list[tuple[str, str]]:
    """How the audit ran: sites captured, rows measured, settings, timing, what did not run."""
    model, run = result.model, result.run
    sites = ", ".join(str(s) for s in run.get("sites") or []) or "none"
    tested = [site_name(s, run) for s in sorted({str(s) for h in result.heads for s in (h.get("gaussianity") or {})})]
    rows = run.get("rows")
    rows_text = (
        "all query rows"
        if rows == "all"
        else f"sampled: {run.get('rows_per_sequence')} rows per sequence (seeded)"
    )
    return [
        (
            "sites captured",
            f"{sites} at {run.get('capture_point')} (model "
            f"{'with' if model.get('rope') else 'without'} RoPE); Gaussianity tested on "
            f"{', '.join(tested) or 'no site'}",
        ),
        (
            "rows",
            f"{rows_text}; reservoir {run.get('reservoir_size')} per head; "
            f"{run.get('nonfinite_rows', 0)} non-finite rows dropped",
        ),
        (
            "settings",
            f"seed {run.get('seed')}, batch {run.get('batch_size')}, device "
            f"{run.get('device')}, min_keys {run.get('min_keys')}, budgets "
            f"{run.get('budgets')}, sinks {run.get('sinks')}, window {run.get('window')}",
        ),
        (
            "timing",
            f"{fmt_num(run.get('elapsed_s'))} s, {fmt_num(run.get('tokens_per_s'))} "
            f"tokens/s, created {run.get('created')}",
        ),
        ("time per stage", _stage_text(run)),
        ("left out", ", ".join(left_out(result)) or "nothing"),
    ]


def _stage_text(run: dict) -> str:
    """"total 41.2 s: load 1.1 s, capture 30.5 s, ..." from ``run.stage_s`` (stages that ran)."""
    stages = run.get("stage_s")
    if not isinstance(stages, dict):
        return "not recorded"
    parts = [f"{name} {fmt_num(sec)} s" for name, sec in stages.items() if sec]
    return f"total {fmt_num(run.get('total_s'))} s: {', '.join(parts) or 'none'}"
