"""The kernel plan in the reports: per head the pattern chosen, its budget and why, and the
kernel saving beside the per-row top-k oracle bound (no torch)."""

from __future__ import annotations

from typing import Any

from attn_audit.result import AuditResult


def budget_text(entry: dict[str, Any]) -> str:
    """A pattern's budget in a few characters: ``sink+2 blk``, ``4 blk``, ``v128 s128``."""
    p = entry.get("pattern")
    if p == "streaming":
        w = int(entry.get("window_blocks") or 0)
        if w == 0:
            return "sink only" if entry.get("sink_blocks") else "none"
        return ("sink+" if entry.get("sink_blocks") else "") + f"{w} blk"
    if p == "block-topk":
        return f"{entry.get('blocks')} blk"
    if p == "vertical-slash":
        return f"v{entry.get('vertical_size')} s{entry.get('slash_size')}"
    return "-"


def kernel_rows(result: AuditResult, top: int) -> tuple[str, list[list[str]]] | None:
    """(title, rows of [#, head, kv, pattern, budget, kernel saved, oracle saved, why]) for the
    ``top`` heads by kernel saving; None when the audit has no kernel plan."""
    entries = result.data.get("kernel_plan")
    summary = result.data.get("kernel_plan_summary")
    if not entries or not summary:
        return None
    oracle = {(p["layer"], p["head"]): p.get("flops_saving") for p in result.data.get("plan") or []}
    rows = []
    for i, e in enumerate(entries[:top], start=1):
        o = oracle.get((e["layer"], e["head"]))
        rows.append([str(i), f"L{e['layer']}.H{e['head']}", str(e.get("kv_head", "")), e["pattern"],
                     budget_text(e), f"{e['flops_saving']:.0%}", "-" if o is None else f"{o:.0%}",
                     str(e.get("why", ""))])
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary["heads_by_pattern"].items()))
    oracle_all = summary.get("oracle_flops_saving")
    title = (f"Kernel plan at {summary['target_len']} tokens, block {summary['block_size']} "
             f"(eps={summary['eps_key']}): saves {summary['kernel_flops_saving']:.1%} of attention FLOPs"
             + (f" vs {oracle_all:.1%} for the per-row top-k oracle" if oracle_all is not None else "")
             + f"; heads: {counts}")
    return title, rows


KERNEL_HEADER = ["#", "head", "kv", "pattern", "budget", "kernel saved", "oracle saved", "why"]


PATTERN_COLOURS = {"streaming": "#1b9e77", "block-topk": "#d95f02", "vertical-slash": "#7570b3", "dense": "#999999"}


def savings_points(result: AuditResult) -> dict[str, list[tuple[float, float]]]:
    """Per kernel pattern, (oracle top-k saving, kernel saving) of each head (oracle 0 when the
    top-k plan leaves the head dense)."""
    oracle = {(p["layer"], p["head"]): float(p.get("flops_saving") or 0.0) for p in result.data.get("plan") or []}
    out: dict[str, list[tuple[float, float]]] = {}
    for e in result.data.get("kernel_plan") or []:
        out.setdefault(e["pattern"], []).append((oracle.get((e["layer"], e["head"]), 0.0), float(e["flops_saving"])))
    return out


def savings_figure(result: AuditResult, salt: str) -> str:
    """SVG scatter: oracle (per-row top-k) saving against kernel-pattern saving, per head."""
    import matplotlib

    from attn_audit.report.plots import RC, new_figure, svg_text

    fig = new_figure(6.4, 4.2)
    with matplotlib.rc_context(RC):
        ax = fig.add_axes((0.1, 0.13, 0.62, 0.77))
        for name, pts in sorted(savings_points(result).items()):
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, linewidths=0,
                       color=PATTERN_COLOURS.get(name, "#333333"), label=f"{name} ({len(pts)})")
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("oracle saving (per-row top-k, ideal kernel)")
        ax.set_ylabel("kernel saving (whole tiles, estimate included)")
        ax.set_title("attention FLOPs saved per head (dashed: equal)", loc="left")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return svg_text(fig, salt, "oracle against kernel saving per head")
