"""Result-level texts shared by every renderer: gate state, headline numbers, verdict line.

Also the list of optional steps that did not run (every provenance footer shows it) and the
plain-text lines of the theory check.

:func:`headline` gives the numbers every report opens with (gate verdict, planned FLOPs saving,
quality cost, share of Gaussian-looking heads), each "not run" when its step did not run;
:func:`verdict_line` is the one line the CLI prints on stderr.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attn_audit.report.formatting import fmt_num, fmt_pct, head_label, head_letter, num, site_name

if TYPE_CHECKING:
    from attn_audit.result import AuditResult

__all__ = [
    "NOT_RUN",
    "failed_checks",
    "flops_text",
    "gate_counts",
    "gate_state",
    "gate_text",
    "gaussian_share",
    "gaussian_text",
    "headline",
    "left_out",
    "quality_text",
    "theory_lines",
    "verdict_line",
]

NOT_RUN = "not run"


def gaussian_share(result: AuditResult) -> tuple[int, int] | None:
    """(heads that look Gaussian, heads tested), or None when no head was tested."""
    letters = [head_letter(h) for h in result.heads]
    tested = [v for v in letters if v != "-"]
    if not tested:
        return None
    return sum(v == "G" for v in tested), len(tested)


def gate_counts(gate: dict[str, Any]) -> dict[str, int]:
    """Number of gate checks per status."""
    counts = {"passed": 0, "failed": 0, "unevaluable": 0}
    for check in gate.get("checks") or []:
        status = str(check.get("status", "unevaluable"))
        counts[status] = counts.get(status, 0) + 1
    return counts


def gate_state(result: AuditResult) -> str:
    """The gate's outcome in one word: "PASS", "FAIL", "NO DATA", "no checks" or "not run"."""
    gate = result.data.get("gate")
    if not isinstance(gate, dict):
        return NOT_RUN
    if gate.get("exit_code") == 4:  # ExitCode.NOTHING_MEASURED: never a pass
        return "NO DATA"
    if not gate.get("checks"):
        return "no checks"
    return "PASS" if gate.get("passed") else "FAIL"


def gate_text(result: AuditResult) -> str:
    """The gate's verdict with check counts, e.g. "FAIL (1/3 checks passed, 2 failed)"."""
    state = gate_state(result)
    if state == NOT_RUN:
        return NOT_RUN
    if state == "NO DATA":
        return "NO DATA (no query row was measured)"
    if state == "no checks":
        return "no checks (none configured)"
    counts = gate_counts(result.data["gate"])
    total = sum(counts.values())
    parts = [f"{counts['passed']}/{total} checks passed"]
    if counts["failed"]:
        parts.append(f"{counts['failed']} failed")
    if counts["unevaluable"]:
        parts.append(f"{counts['unevaluable']} unevaluable")
    return f"{state} ({', '.join(parts)})"


def quality_text(result: AuditResult) -> str:
    """The measured quality cost of the plan, or "not run"; with a kernel plan applied
    (``verify.kernel``), the kernel's cost first and the oracle's as its bound."""
    verify = result.data.get("verify")
    if not isinstance(verify, dict):
        return NOT_RUN
    if isinstance(verify.get("skipped_reason"), str):  # asked for, but it cannot apply to this model
        return f"not run ({verify['skipped_reason']})"
    kernel = verify.get("kernel")
    if isinstance(kernel, dict):
        return f"kernel plan {_quality_parts(kernel)}; oracle top-k bound {_quality_parts(verify)}"
    return _quality_parts(verify)


def _quality_parts(verify: dict) -> str:  # type: ignore[type-arg]
    parts = []
    ratio = num(verify.get("ppl_ratio"))
    cosine = num(verify.get("hidden_cosine"))
    if ratio is not None:
        parts.append(f"{(ratio - 1) * 100:+.2f}% perplexity")
    elif cosine is not None:
        parts.append(f"hidden cosine {cosine:.4f}")
    agree = num(verify.get("top1_agreement"))
    if agree is not None:
        parts.append(f"top-1 agreement {fmt_pct(agree)}")
    return ", ".join(parts) if parts else "n/a"


def flops_text(result: AuditResult) -> str:
    """The plan's attention-FLOPs saving with the number of heads planned, or "not run"."""
    summary = result.data.get("plan_summary")
    if not isinstance(summary, dict):
        return NOT_RUN if not result.data.get("plan") else "n/a"
    saving = fmt_pct(summary.get("planned_flops_saving"))
    planned, total = summary.get("heads_planned"), summary.get("heads_total")
    if planned is not None and total is not None:
        return f"{saving} ({planned}/{total} heads)"
    return saving


def gaussian_text(result: AuditResult) -> str:
    """Share of heads whose Q and K look Gaussian, or "not run"."""
    share = gaussian_share(result)
    if share is None:
        return NOT_RUN
    good, tested = share
    return f"{fmt_pct(good / tested, 0)} ({good}/{tested} heads)"


def headline(result: AuditResult) -> dict[str, str]:
    """The four numbers every report opens with, as display strings."""
    return {
        "gate": gate_text(result),
        "flops": flops_text(result),
        "quality": quality_text(result),
        "gaussian": gaussian_text(result),
    }


def failed_checks(result: AuditResult) -> list[dict[str, Any]]:
    """Gate checks that did not pass (failed first, then unevaluable)."""
    gate = result.data.get("gate")
    if not isinstance(gate, dict):
        return []
    checks = [c for c in gate.get("checks") or [] if c.get("status") != "passed"]
    return sorted(checks, key=lambda c: c.get("status") != "failed")


def left_out(result: AuditResult) -> list[str]:
    """Optional parts of the audit that did not run (shown in every provenance footer)."""
    data = result.data
    out = []
    if not data.get("plan"):
        out.append("plan")
    if not isinstance(data.get("verify"), dict):
        out.append("verification")
    if not isinstance(data.get("gate"), dict):
        out.append("gate")
    if not any(isinstance(h.get("theory"), dict) for h in result.heads):
        out.append("theory")
    if len(result.run.get("seq_lens") or []) < 2:
        out.append("scaling (one length)")
    if gaussian_share(result) is None:
        out.append("Gaussianity tests")
    return out


def _gate_sentence(result: AuditResult) -> str:
    """The first part of the verdict line: the gate's own sentence when it wrote one."""
    gate = result.data.get("gate")
    if isinstance(gate, dict) and isinstance(gate.get("verdict"), str) and gate["verdict"]:
        return " ".join(str(gate["verdict"]).split())
    state = gate_state(result)
    if state == "NO DATA" or (state == NOT_RUN and result.rows_measured == 0):
        return "NO DATA: no query row was measured, so nothing was checked"
    if state in (NOT_RUN, "no checks"):
        return "DONE: no checks ran"
    counts = gate_counts(result.data["gate"])
    total = sum(counts.values())
    if state == "PASS":
        return f"PASS: {counts['passed']}/{total} checks passed"
    bad = failed_checks(result)
    names = ", ".join(str(c.get("name", "?")) for c in bad[:3])
    more = f" +{len(bad) - 3} more" if len(bad) > 3 else ""
    unevaluable = f", {counts['unevaluable']} unevaluable" if counts["unevaluable"] else ""
    return f"FAIL: {counts['failed']} of {total} checks failed{unevaluable} ({names}{more})"


def verdict_line(result: AuditResult) -> str:
    """One line for stderr: the gate's verdict, then the headline numbers, joined by " | ".

    Example: ``FAIL: 1 of 3 checks failed (min-saving) | plan saves 31.2% of attention FLOPs on
    40/270 heads | quality +0.41% perplexity | 12% of heads look Gaussian``. The first part is the
    gate's own sentence when the result holds one; ``NO DATA`` when no row was measured (then
    nothing else follows), ``DONE: no checks ran`` without a gate.
    """
    first = _gate_sentence(result)
    if first.startswith("NO DATA"):
        return first
    parts = [first]
    summary = result.data.get("plan_summary")
    if isinstance(summary, dict):
        parts.append(
            f"plan saves {fmt_pct(summary.get('planned_flops_saving'))} of attention FLOPs on "
            f"{summary.get('heads_planned', '?')}/{summary.get('heads_total', '?')} heads"
        )
    elif result.ranking:
        parts.append(f"no plan; sparsest head {head_label(result.ranking[0])}")
    quality = quality_text(result)
    if quality != NOT_RUN:
        parts.append(f"quality {quality}")
    share = gaussian_share(result)
    if share is not None:
        parts.append(f"{fmt_pct(share[0] / share[1], 0)} of heads look Gaussian")
    return " | ".join(parts)


def theory_lines(result: AuditResult) -> list[str]:
    """Plain-text lines of the theory check (empty when the run has no theory summary).

    Verdict counts per site, the R-sparsity correlation across heads and the median
    log(measured / predicted k); shared by the Markdown and terminal reports.
    """
    summary = result.data.get("theory_summary")
    if not summary:
        return []
    lines: list[str] = []
    counts: dict[str, dict[str, int]] = {}
    for rec in result.heads:
        for site, block in (rec.get("gaussianity") or {}).items():
            verdict = str(block.get("verdict", "?"))
            counts.setdefault(site, {}).setdefault(verdict, 0)
            counts[site][verdict] += 1
    for site in sorted(counts):
        parts = ", ".join(
            f"{n} {v}" for v, n in sorted(counts[site].items(), key=lambda kv: -kv[1])
        )
        lines.append(f"Gaussianity of {site_name(site, result.run)}: {parts} (head records)")
    for name, label in (
        ("spearman_logit_range_kfrac", "empirical logit range R_emp"),
        ("spearman_R_F_kfrac", "R_F from the weights"),
        ("spearman_sigma_median_kfrac", "row logit spread sigma"),
    ):
        val = summary.get(name)
        if val and val[0] is not None:
            lo, hi = (fmt_num(v, 2) for v in val[1:3])
            lines.append(
                f"Spearman rho({label}, k/n) = {val[0]:.2f} [{lo}, {hi}] across heads "
                "(negative: sparser as it grows, as the theory predicts)"
            )
    ratio = summary.get("log_ratio_median_over_heads")
    if ratio is not None:
        lines.append(
            f"median over heads of log(measured k / finite-n Gaussian k) = {ratio:+.2f} "
            f"at eps={summary.get('eps_key')}"
        )
    return lines
