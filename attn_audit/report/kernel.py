"""The kernel plan in the reports: per planned head the pattern chosen, its budget and why, and the
kernel saving beside the per-row top-k oracle bound (no torch)."""

from __future__ import annotations

from attn_audit.rank.kernel import budget_text
from attn_audit.result import AuditResult


def is_kernel_plan(result: AuditResult) -> bool:
    """The plan runs kernel patterns (the audit measured ``heads[].patterns``)."""
    return (result.data.get("plan_summary") or {}).get("kind") == "kernel"


def kernel_rows(result: AuditResult, top: int) -> tuple[str, list[list[str]]] | None:
    """(title, rows of [#, head, kv, pattern, budget, kernel saved, oracle saved, why]) for the
    first ``top`` planned heads, in plan order; None when the plan is not a kernel plan."""
    if not is_kernel_plan(result):
        return None
    summary = result.data["plan_summary"]
    plan = result.data.get("plan") or []
    rows = []
    for i, e in enumerate(plan[:top], start=1):
        o = e.get("oracle_flops_saving")
        rows.append([str(i), f"L{e['layer']}.H{e['head']}", str(e.get("kv_head", "")), e["pattern"],
                     budget_text(e), f"{e['flops_saving']:.0%}", "-" if o is None else f"{o:.0%}",
                     str(e.get("reason", ""))])
    counts = ", ".join(f"{k} {v}" for k, v in sorted((summary.get("heads_by_pattern") or {}).items()))
    oracle_all = summary.get("oracle_flops_saving")
    title = (f"Kernel plan at {summary['target_len']} tokens, block {summary.get('block_size')} "
             f"(eps={summary['eps_key']}): {len(plan)} of {summary.get('heads_total')} heads"
             + (f" ({counts})" if counts else "")
             + f", top {min(top, len(plan))} shown; saves {summary['planned_flops_saving']:.1%} of attention FLOPs"
             + (f" vs {oracle_all:.1%} for the per-row top-k oracle bound" if oracle_all is not None else ""))
    return title, rows


KERNEL_HEADER = ["#", "head", "kv", "pattern", "budget", "kernel saved", "oracle saved", "why"]


PATTERN_COLOURS = {"streaming": "#1b9e77", "block-topk": "#d95f02", "vertical-slash": "#7570b3", "dense": "#999999"}


def savings_points(result: AuditResult) -> dict[str, list[tuple[float, float]]]:
    """Per kernel pattern (``dense`` for heads the plan leaves dense), (oracle top-k saving, kernel
    saving) of each measured head, from the ranking."""
    out: dict[str, list[tuple[float, float]]] = {}
    for e in result.ranking:
        if e.get("pattern") is None or e.get("oracle_flops_saving") is None:
            continue
        name = e["pattern"] if e.get("planned") else "dense"
        out.setdefault(name, []).append((float(e["oracle_flops_saving"]), float(e["flops_saving"]) if e.get("planned") else 0.0))
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
