"""Report renderers: turn an :class:`~attn_audit.result.AuditResult` into text.

A renderer is a small class with a ``name``, a ``file_extension`` and
``render(result, **options) -> str`` (the shape pyinstrument uses). Renderers see only the result
(never the model), so ``attn-audit --load audit.json`` re-renders without torch. The registry maps
short names to lazy ``"module:Class"`` strings: importing this package imports only the standard
library, and matplotlib (HTML) or rich (terminal) load only when that format is chosen.

The small helpers below (labels, number formatting, the three headline numbers, the verdict line)
are shared by every renderer so that the terminal, Markdown and HTML reports always agree.

Formats: ``terminal`` (rich text, the default on stdout), ``json`` (``audit.json``, the result
itself), ``md`` (a GitHub-flavoured pull-request comment) and ``html`` (one self-contained page).
"""

from __future__ import annotations

import importlib
import math
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Protocol

from attn_audit.errors import ConfigError

if TYPE_CHECKING:
    from attn_audit.result import AuditResult

__all__ = [
    "FORMATS",
    "RENDERERS",
    "Renderer",
    "file_name",
    "for_path",
    "get_renderer",
    "headline",
    "verdict_line",
]

FORMATS: tuple[str, ...] = ("terminal", "json", "md", "html")

#: Format name -> "module:Class", imported only when asked for.
RENDERERS: dict[str, str] = {
    "terminal": "attn_audit.report.terminal:TerminalRenderer",
    "json": "attn_audit.report.jsonfmt:JsonRenderer",
    "md": "attn_audit.report.markdown:MarkdownRenderer",
    "html": "attn_audit.report.html:HtmlRenderer",
}

#: File written for each format inside the output directory.
_FILE_NAMES: dict[str, str] = {
    "terminal": "report.txt",
    "json": "audit.json",
    "md": "report.md",
    "html": "report.html",
}

#: Extra spellings accepted by :func:`get_renderer` and :func:`for_path`.
_ALIASES: dict[str, str] = {"markdown": "md", "text": "terminal", "txt": "terminal", "htm": "html"}


class Renderer(Protocol):
    """What every renderer provides."""

    name: str
    file_extension: str

    def render(self, result: AuditResult, **options: Any) -> str:
        """Return the whole report as one string."""
        ...


def _canonical(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in RENDERERS:
        known = ", ".join(FORMATS)
        raise ConfigError(f"unknown report format {name!r} (known: {known})")
    return key


def get_renderer(name: str) -> Renderer:
    """The renderer for format ``name`` ("terminal", "json", "md", "html").

    Raises:
        ConfigError: for an unknown name; the message lists the known ones.
    """
    module_name, _, class_name = RENDERERS[_canonical(name)].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    renderer: Renderer = cls()
    return renderer


def file_name(fmt: str) -> str:
    """The file a format is written to: ``report.md``, ``report.html``, ``audit.json``..."""
    return _FILE_NAMES[_canonical(fmt)]


def for_path(path: str) -> str:
    """The format implied by an output path's extension (``-o out.html`` -> ``"html"``)."""
    suffix = PurePath(path).suffix.lstrip(".").lower()
    try:
        return _canonical(suffix)
    except ConfigError:
        raise ConfigError(
            f"cannot tell the report format from {path!r} (use .txt, .json, .md or .html)"
        ) from None


# -- shared helpers ------------------------------------------------------------------------------

NOT_RUN = "not run"

#: Gaussianity verdict -> one letter, and the order in which a head's worst site wins.
VERDICT_LETTERS: dict[str, str] = {
    "gaussian-like": "G",
    "heavy-tailed": "H",
    "skewed": "S",
    "outlier-channels": "O",
    "light-tailed": "L",
}
LETTER_NAMES: dict[str, str] = {
    "G": "gaussian-like",
    "H": "heavy-tailed",
    "S": "skewed",
    "O": "outlier channels",
    "L": "light-tailed",
    "?": "other verdict",
    "-": "not tested or skipped",
}
#: Verdicts that mean "not assessed": evidence neither way (as in attn_audit.rank).
_SKIPPED = frozenset(
    {"skipped", "not-assessed", "insufficient-data", "not-tested", "n/a", "unknown"}
)
_LETTER_SEVERITY = {"-": 0, "G": 1, "?": 2, "L": 3, "S": 4, "H": 5, "O": 6}


def head_label(rec: dict[str, Any]) -> str:
    """``L{layer}.H{head}``, zero-based, as shown everywhere in text."""
    return f"L{rec['layer']}.H{rec['head']}"


def num(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, null, NaN, not a number)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def fmt_pct(value: Any, digits: int = 1) -> str:
    """A fraction as a percentage that never rounds to 0% or 100% unless it is exactly that."""
    x = num(value)
    if x is None:
        return "n/a"
    pct = 100.0 * x
    text = f"{pct:.{digits}f}%"
    step = 10.0**-digits
    if 0 < pct < step:
        return f"<{step:.{digits}f}%"
    if 100 - step < pct < 100:
        return f">{100 - step:.{digits}f}%"
    return text


def fmt_num(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits; "n/a" when missing."""
    x = num(value)
    if x is None:
        return "n/a"
    if x.is_integer() and abs(x) < 1e9:
        return str(int(x))
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}g}"


def _site_letter(block: dict[str, Any]) -> str:
    verdict, flag = block.get("verdict"), block.get("is_gaussian")
    if isinstance(verdict, str) and verdict:
        if verdict in _SKIPPED or verdict.startswith("skip"):
            return "-"
        return VERDICT_LETTERS.get(verdict, "?")
    return {True: "G", False: "?"}.get(flag, "-") if isinstance(flag, bool) else "-"


def site_letters(rec: dict[str, Any]) -> dict[str, str]:
    """One letter per Gaussianity site of a head: G/H/S/O/L, "?" other, "-" skipped."""
    gauss = rec.get("gaussianity") or {}
    if not isinstance(gauss, dict):
        return {}
    return {str(site): _site_letter(b) for site, b in gauss.items() if isinstance(b, dict)}


def head_letter(rec: dict[str, Any]) -> str:
    """A head's combined verdict letter, with the same rule as the gate and the ranking.

    The worst non-Gaussian site wins; otherwise "G" when every site was tested and looks
    Gaussian, and "-" when some site was skipped or none exists (evidence neither way).
    """
    letters = list(site_letters(rec).values())
    bad = [v for v in letters if v not in ("G", "-")]
    if bad:
        return max(bad, key=lambda v: _LETTER_SEVERITY[v])
    return "G" if letters and "-" not in letters else "-"


def short_reason(text: Any, limit: int = 80) -> str:
    """The first clause of a reason (up to the first "; "), cut to ``limit`` characters."""
    first = " ".join(str(text or "").split("; ", 1)[0].split())
    if len(first) <= limit:
        return first
    cut = first[: limit - 3]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip(" ,;:(") + "..."


def sparsity_at(rec: dict[str, Any], eps_key: str) -> dict[str, Any]:
    """The head's sparsity block at ``eps_key`` ({} when missing)."""
    block = (rec.get("sparsity") or {}).get(eps_key)
    return block if isinstance(block, dict) else {}


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
    """The measured quality cost of the plan, or "not run"."""
    verify = result.data.get("verify")
    if not isinstance(verify, dict):
        return NOT_RUN
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
        parts = ", ".join(f"{n} {v}" for v, n in sorted(counts[site].items(), key=lambda kv: -kv[1]))
        lines.append(f"Gaussianity of {site}: {parts} (head records)")
    for name, label in (("spearman_logit_range_kfrac", "empirical logit range R_emp"),
                        ("spearman_R_F_kfrac", "R_F from the weights"),
                        ("spearman_sigma_median_kfrac", "row logit spread sigma")):
        val = summary.get(name)
        if val and val[0] is not None:
            lo, hi = (fmt_num(v, 2) for v in val[1:3])
            lines.append(f"Spearman rho({label}, k/n) = {val[0]:.2f} [{lo}, {hi}] across heads "
                         "(negative: sparser as it grows, as the theory predicts)")
    ratio = summary.get("log_ratio_median_over_heads")
    if ratio is not None:
        lines.append(f"median over heads of log(measured k / finite-n Gaussian k) = {ratio:+.2f} "
                     f"at eps={summary.get('eps_key')}")
    return lines
