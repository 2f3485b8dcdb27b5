"""Display helpers shared by every renderer: numbers, head labels, reasons and verdict letters.

Numbers are formatted here once (a percentage never rounds to 0% or 100% unless it is exactly
that; missing, null and non-finite values read "n/a"), heads are labelled ``L{layer}.H{head}``
and each Gaussianity verdict becomes one letter, so the terminal, Markdown and HTML reports show
the same text for the same value.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attn_audit.result import AuditResult

__all__ = [
    "LETTER_NAMES",
    "printable",
    "VERDICT_LETTERS",
    "fmt_num",
    "fmt_pct",
    "head_label",
    "head_letter",
    "num",
    "short_reason",
    "site_letters",
    "site_name",
    "site_summary",
    "sparsity_at",
]

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


def heads_shape(model: dict[str, Any], query: str = "query heads") -> str:
    """"<H> query heads, <H_kv> KV heads", or where they vary per layer (``model.layer_heads``)
    their ranges and "(varies per layer)"."""
    per_layer = model.get("layer_heads")
    if not per_layer:
        return f"{model.get('num_heads', '?')} {query}, {model.get('num_kv_heads', '?')} KV heads"

    def span(i: int) -> str:
        lo, hi = min(g[i] for g in per_layer), max(g[i] for g in per_layer)
        return str(lo) if lo == hi else f"{lo}-{hi}"

    return f"{span(0)} {query}, {span(1)} KV heads, head_dim {span(2)} (varies per layer)"


SITE_WORDS = {"encoder-self": "encoder self-attention", "decoder-self": "decoder self-attention (causal)",
              "cross": "cross-attention (decoder queries, encoder keys)"}


def head_label(rec: dict[str, Any]) -> str:
    """``L{layer}.H{head}``, zero-based, as shown everywhere in text; an encoder-decoder site adds
    its kind and its layer within its stack, e.g. ``L3.H0 (cross 0)``."""
    label = f"L{rec['layer']}.H{rec['head']}"
    kind = rec.get("site_kind")
    return f"{label} ({kind} {rec.get('stack_layer', '?')})" if isinstance(kind, str) else label


PROJECTION_SITES = ("q_pre_rope", "k_pre_rope")


def site_name(site: str, run: dict[str, Any]) -> str:
    """A Gaussianity site's name with what it is: the projection sites are the q_proj / k_proj
    outputs, pre-RoPE, and pre-norm where QK-norm follows them (``run.extras.pre_norm``)."""
    if site not in PROJECTION_SITES:
        return site
    pre_norm = bool((run.get("extras") or {}).get("pre_norm"))
    return f"{site} ({'pre-norm, pre-RoPE' if pre_norm else 'pre-RoPE'} projections)"


def site_summary(model: dict[str, Any]) -> str | None:
    """Which sites (L indices) are which kind in an encoder-decoder model, one line; None otherwise."""
    kinds = model.get("site_kinds")
    if not isinstance(kinds, list) or not kinds:
        return None
    parts = []
    for kind, words in SITE_WORDS.items():
        sites = [str(k.get("site")) for k in kinds if isinstance(k, dict) and k.get("kind") == kind]
        if sites:
            parts.append(f"{words}: L{', L'.join(sites)}")
    return "encoder-decoder sites: " + "; ".join(parts)


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


def printable(result: AuditResult) -> AuditResult:
    """A copy of ``result`` whose every string (keys included) has its control characters shown as
    escapes (``\\x1b``, ``\\n``), for the terminal and Markdown renderers: a loaded file cannot
    move the cursor, retitle the terminal or break a Markdown line. The HTML escapes on its own."""
    from attn_audit.errors import one_line
    from attn_audit.result import AuditResult

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return one_line(value, 1 << 30)
        if isinstance(value, dict):
            return {clean(k): clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return AuditResult(data=clean(result.data))

