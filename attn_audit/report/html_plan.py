"""The HTML report's deployment tables: the plan, ranked heads, layers, KV groups, verification.

The plan table lists the planned heads with their k and FLOPs savings, then every head is ranked;
layers and KV groups are ranked as units; the verification gives the plan's measured quality
cost. Every table is sortable by column (with JS) and keeps the ranked order without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attn_audit.report.formatting import (
    fmt_num,
    fmt_pct,
    head_letter,
    num,
    site_letters,
    sparsity_at,
)
from attn_audit.report.headlines import headline
from attn_audit.report.html_page import Page, e, head_td, reason_td, table, td
from attn_audit.report.predeploy import (
    CONFIG_HEADER,
    RETRIEVAL_HEADER,
    config_lines,
    config_rows,
    retrieval_lines,
    retrieval_rows,
    search_lines,
    speed_lines,
)

if TYPE_CHECKING:
    from attn_audit.result import AuditResult

__all__ = ["config_section", "groups_section", "plan_section", "verify_section"]


def _plan_intro(result: AuditResult) -> str:
    summary = result.data.get("plan_summary")
    if not isinstance(summary, dict):
        return ""
    out = f"<p>{e(summary['text'])}</p>" if isinstance(summary.get("text"), str) else ""
    facts = [
        ("planned attention FLOPs saving", fmt_pct(summary.get("planned_flops_saving"))),
        ("heads planned", f"{summary.get('heads_planned')} of {summary.get('heads_total')}"),
        ("target length, eps", f"{summary.get('target_len')}, eps={summary.get('eps_key')}"),
    ]
    if num(summary.get("attention_speedup_bound")) is not None:
        facts.append(
            ("ideal attention speed-up", f"{fmt_num(summary['attention_speedup_bound'])}x")
        )
    out += (
        '<dl class="facts">'
        + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts)
        + "</dl>"
    )
    excluded = [x for x in summary.get("excluded") or [] if isinstance(x, dict)]
    if excluded:
        rows = [
            "<tr>" + head_td(x) + td(x.get("k"), x.get("k")) + td(x.get("why")) + "</tr>"
            for x in excluded
            if "layer" in x and "head" in x
        ]
        out += (
            f"<details><summary>{len(excluded)} heads left out of the plan, and why</summary>"
            + table("excluded-table", [("head", False), ("k", True), ("why", False)], rows)
            + "</details>"
        )
    return out


def plan_section(page: Page) -> str:
    """The plan's table (when a plan ran) and every head ranked, both sortable."""
    result = page.result
    inner = _plan_intro(result)
    plan = result.data.get("plan") or []
    kernel = _kernel_block(result)
    if kernel:
        inner += kernel
    elif plan:
        inner += _plan_table(plan)
    title = "Sparse-attention plan" if plan or kernel else "Ranked heads (no plan ran)"
    if plan:
        inner += "<h3>All heads, ranked</h3>"
    inner += _ranking_table(page)
    return page.section("plan", title, inner)


def _kernel_block(result: AuditResult) -> str:
    """The kernel plan: the oracle-against-kernel saving plot of every head and the planned heads'
    pattern, budget and why (nothing for audits without ``heads[].patterns``)."""
    from attn_audit.report.kernel import KERNEL_HEADER, kernel_rows, savings_figure

    got = kernel_rows(result, len(result.data.get("plan") or []))
    if got is None:
        return ""
    title, rows = got
    body = []
    for r in rows:
        cells = [td(r[0], int(r[0])), f"<td>{e(r[1])}</td>", td(r[2]), td(r[3]), td(r[4]),
                 td(r[5]), td(r[6]), reason_td(r[7], full=True)]
        body.append("<tr>" + "".join(cells) + "</tr>")
    header = [(h, h in ("#", "kv", "kernel saved", "oracle saved")) for h in KERNEL_HEADER]
    return (f"<p>{e(title)}.</p>"
            + f'<figure class="plot">{savings_figure(result, "kernel-savings")}</figure>'
            + table("kernel-table", header, body, f"{len(rows)} heads; click a column to sort."))


def _plan_table(plan: list[dict[str, Any]]) -> str:
    """The planned heads in plan order, with their k, savings and the plan's reason."""
    rows = []
    for i, p in enumerate(plan, 1):
        cells = [
            td(i, i),
            head_td(p),
            td(p.get("kv_head"), p.get("kv_head")),
            td(p.get("pattern")),
            td(p.get("k"), p.get("k")),
            td(fmt_pct(p.get("kfrac")), p.get("kfrac")),
            td(fmt_pct(p.get("flops_saving")), p.get("flops_saving")),
            td(fmt_pct(p.get("flops_saving_model"), 2), p.get("flops_saving_model")),
            td(fmt_num(p.get("score")), p.get("score")),
            reason_td(p.get("reason"), full=True),
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = [
        ("#", True),
        ("head", False),
        ("kv", True),
        ("pattern", False),
        ("k", True),
        ("k/n", True),
        ("attention FLOPs saved", True),
        ("model FLOPs saved", True),
        ("score", True),
        ("reason", False),
    ]
    return table("plan-table", header, rows, f"{len(plan)} planned heads; click a column to sort.")


def _ranking_row(page: Page, entry: dict[str, Any], eps_keys: list[str]) -> str:
    """One head of the ranking: k/n at every eps, k, R, Gaussianity, entropy, sinks, reason."""
    rec = page.by_id.get((entry["layer"], entry["head"]), {})
    r = rec.get("R") or {}
    cells = [
        td(entry.get("rank"), entry.get("rank")),
        head_td(entry),
        td(entry.get("kv_head"), entry.get("kv_head")),
    ]
    for key in eps_keys:
        frac = sparsity_at(rec, key).get("kfrac_mean")
        cells.append(td(fmt_pct(frac), frac))
    k_mean = sparsity_at(rec, page.eps).get("k_mean")
    letters = " ".join(f"{s}:{v}" for s, v in site_letters(rec).items())
    cells += [
        td(fmt_num(k_mean), k_mean),
        td(fmt_num(r.get("logit_range")), r.get("logit_range")),
        td(head_letter(rec) + (f" ({letters})" if letters else "")),
        td(fmt_num(rec.get("entropy_mean")), rec.get("entropy_mean")),
        td(fmt_pct(rec.get("sink_mass_mean")), rec.get("sink_mass_mean")),
        td(fmt_num(entry.get("score")), entry.get("score")),
        td(", ".join(map(str, rec.get("flags") or []))),
        reason_td(entry.get("reason"), full=False),
    ]
    return "<tr>" + "".join(cells) + "</tr>"


def _ranking_table(page: Page) -> str:
    """Every head, best candidates first."""
    eps_keys = page.result.run.get("eps_keys") or []
    rows = [_ranking_row(page, entry, eps_keys) for entry in page.result.ranking]
    header = (
        [("rank", True), ("head", False), ("kv", True)]
        + [(f"k/n eps={k}", True) for k in eps_keys]
        + [
            (f"k eps={page.eps}", True),
            ("logit range", True),
            ("Gaussianity", False),
            ("entropy", True),
            ("sink mass", True),
            ("score", True),
            ("flags", False),
            ("reason", False),
        ]
    )
    return table(
        "ranking-table",
        header,
        rows,
        f"All {len(rows)} heads, best candidates first; hover a reason for all of it; "
        "click a column to sort.",
    )


def groups_section(page: Page) -> str:
    """Layers and KV groups ranked as units (what a runtime that shares K/V must pick)."""
    data = page.result.data
    inner = ""
    for key, title, table_id, kv in (
        ("ranking_kv_groups", "KV groups (query heads sharing one K/V head)", "kv-table", True),
        ("ranking_layers", "Layers", "layers-table", False),
    ):
        entries = [x for x in data.get(key) or [] if isinstance(x, dict)]
        if not entries:
            continue
        rows = []
        for x in entries:
            heads = x.get("heads") or []
            cells = [td(x.get("rank"), x.get("rank")), td(x.get("layer"), x.get("layer"))]
            if kv:
                cells.append(td(x.get("kv_head"), x.get("kv_head")))
            cells += [
                td(", ".join(map(str, heads)) if kv else len(heads), None if kv else len(heads)),
                td(x.get("k"), x.get("k")),
                td(fmt_pct(x.get("kfrac")), x.get("kfrac")),
                td(fmt_pct(x.get("flops_saving")), x.get("flops_saving")),
                td(fmt_pct(x.get("mean_head_saving")), x.get("mean_head_saving")),
                td(fmt_num(x.get("score")), x.get("score")),
                td(", ".join(map(str, x.get("flags") or []))),
            ]
            rows.append("<tr>" + "".join(cells) + "</tr>")
        header = [("rank", True), ("layer", True)] + ([("kv", True)] if kv else [])
        header += [
            ("query heads" if kv else "heads", not kv),
            ("k", True),
            ("k/n", True),
            ("FLOPs saved", True),
            ("mean head saving", True),
            ("score", True),
            ("flags", False),
        ]
        rule = next((str(x["rule"]) for x in entries if isinstance(x.get("rule"), str)), "")
        inner += f"<h3>{e(title)}</h3>" + table(table_id, header, rows, rule)
    if not inner:
        return ""
    return page.section("groups", "Layers and KV groups", inner)


def verify_section(page: Page) -> str:
    """The plan's verification: quality cost and per-head output error ("" if none)."""
    verify = page.result.data.get("verify")
    if not isinstance(verify, dict):
        return ""
    facts = [("quality cost", headline(page.result)["quality"])]
    for key, label, fmt in (
        ("ppl_ratio", "perplexity ratio", _fixed4),
        ("hidden_cosine", "hidden-state cosine", _fixed4),
        ("top1_agreement", "top-1 agreement", fmt_pct),
        ("max_ppl_increase", "allowed perplexity increase", fmt_pct),
        ("largest_plan_heads", "largest plan within budget (heads)", str),
        ("largest_plan_flops_saving", "its attention FLOPs saving", fmt_pct),
    ):
        if verify.get(key) is not None:
            facts.append((label, fmt(verify[key])))
    inner = (
        '<dl class="facts">'
        + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts)
        + "</dl>"
    )
    rows = []
    for h in verify.get("heads") or []:
        rows.append(
            "<tr>"
            + "".join(
                [
                    head_td(h),
                    td(fmt_pct(h.get("rel_error_mean"), 2), h.get("rel_error_mean")),
                    td(fmt_pct(h.get("rel_error_p99"), 2), h.get("rel_error_p99")),
                    td(fmt_pct(h.get("tail_mass_mean"), 2), h.get("tail_mass_mean")),
                ]
            )
            + "</tr>"
        )
    if rows:
        inner += table(
            "verify-table",
            [
                ("head", False),
                ("relative error, mean", True),
                ("relative error, p99", True),
                ("tail mass, mean", True),
            ],
            rows,
            "Per-head output error of the planned sparse attention.",
        )
    inner += "".join(f"<p>{e(t)}</p>" for t in search_lines(page.result))
    inner += "".join(f"<p>{e(t)}</p>" for t in speed_lines(page.result))
    inner += _retrieval_html(page)
    return page.section("verify", "Verification", inner)


def _retrieval_html(page: Page) -> str:
    """The passkey retrieval check: its sentences and the per-(length, depth) table."""
    lines = retrieval_lines(page.result)
    if not lines:
        return ""
    out = "<h3>Long-context retrieval (passkey)</h3>" + "".join(f"<p>{e(t)}</p>" for t in lines)
    rows = ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in retrieval_rows(page.result)]
    if rows:
        out += table("retrieval-table", [(h, False) for h in RETRIEVAL_HEADER], rows,
                     "Passkeys found by the dense model and with the plan, per prompt length and depth.")
    return out


def _fixed4(value: Any) -> str:
    x = num(value)
    return "n/a" if x is None else f"{x:.4f}"


def config_section(page: Page) -> str:
    """The --check-config result: what the file asks for, its kept mass, quality and retrieval."""
    lines = config_lines(page.result)
    if not lines:
        return ""
    inner = "".join(f"<p>{e(t)}</p>" for t in lines)
    rows = ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in config_rows(page.result)]
    if rows:
        inner += table("config-table", [(h, False) for h in CONFIG_HEADER], rows,
                       "Heads of the config losing the most attention mass (90th percentile of rows), worst first.")
    return page.section("check-config", "Third-party config check", inner)
