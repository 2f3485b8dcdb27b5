"""Texts of the pre-deployment checks shared by every renderer: the passkey retrieval check
(``verify.retrieval``) and the third-party config check (``check_config``), as plain lines and
table rows, so the terminal, Markdown and HTML reports say the same thing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attn_audit.report.formatting import fmt_pct, num

if TYPE_CHECKING:
    from attn_audit.result import AuditResult

__all__ = ["CONFIG_HEADER", "search_lines", "speed_lines", "RETRIEVAL_HEADER", "config_lines", "config_rows", "retrieval_lines", "retrieval_rows"]

RETRIEVAL_HEADER = ["length", "depth", "dense", "plan", "lost", "compared"]


def _retrieval(result: AuditResult) -> dict[str, Any] | None:
    verify = result.data.get("verify")
    block = verify.get("retrieval") if isinstance(verify, dict) else None
    return block if isinstance(block, dict) else None


def retrieval_lines(result: AuditResult) -> list[str]:
    """The retrieval check in sentences (empty when it did not run)."""
    r = _retrieval(result)
    if r is None:
        return []
    if r.get("skipped_reason"):
        return [f"Passkey retrieval check skipped: {r['skipped_reason']}."]
    plan, dense = num(r.get("plan_accuracy")), num(r.get("dense_accuracy"))
    lengths = ", ".join(str(n) for n in r.get("lengths") or [])
    if plan is None or dense is None:
        lines = [f"Passkey retrieval at {lengths} tokens is uninformative: the dense model did not find the "
                 "key at any tested depth, so retrieval with the plan was not compared."]
    else:
        lines = [f"Passkey retrieval at {lengths} tokens with the plan ({r.get('plan', '?')}): "
                 f"{fmt_pct(plan, 0)} vs {fmt_pct(dense, 0)} dense on the "
                 f"{r.get('informative_samples', '?')} prompts where the dense model retrieves; "
                 f"{r.get('lost', '?')} key(s) lost."]
    lines += [str(s) for s in r.get("uninformative") or []]
    return lines


def retrieval_rows(result: AuditResult) -> list[list[str]]:
    """One row per (length, depth): dense and plan correct counts, keys lost, compared or not."""
    r = _retrieval(result)
    if r is None or r.get("skipped_reason"):
        return []
    rows = []
    for c in r.get("cells") or []:
        n = c.get("n", "?")
        rows.append([str(c.get("length", "?")), f"{num(c.get('depth')) or 0:g}", f"{c.get('dense_correct', '?')}/{n}",
                     f"{c.get('plan_correct', '?')}/{n}", str(c.get("lost", "?")),
                     "yes" if c.get("informative") else "no (dense fails)"])
    return rows


CONFIG_HEADER = ["head", "pattern", "lost mass p90", "lost mass mean"]


def _config(result: AuditResult) -> dict[str, Any] | None:
    block = result.data.get("check_config")
    return block if isinstance(block, dict) else None


def config_lines(result: AuditResult) -> list[str]:
    """The third-party config check in sentences (empty when none was checked)."""
    c = _config(result)
    if c is None:
        return []
    losing = c.get("heads_losing") or []
    lines = [f"{c.get('format', '?')} config {c.get('file', '?')}: {c.get('heads_sparse', '?')}/"
             f"{c.get('heads_total', '?')} heads sparse; {len(losing)} lose more than eps={c.get('eps', '?')} "
             f"of their attention mass in 10% of rows (measured on {c.get('sequences', '?')} held-out "
             f"sequences of {c.get('seq_len', '?')} tokens)."]
    assumed = (c.get("settings") or {}).get("assumed")
    if assumed:
        lines.append(f"No config.json beside the TSV: assumed {', '.join(map(str, assumed))} = "
                     + ", ".join(str((c.get('settings') or {}).get(a)) for a in assumed) + ".")
    q = c.get("quality")
    if isinstance(q, dict):
        ratio, cosine, agree = num(q.get("ppl_ratio")), num(q.get("hidden_cosine")), num(q.get("top1_agreement"))
        if ratio is not None:
            lines.append(f"Quality with the config's patterns: {(ratio - 1) * 100:+.2f}% perplexity, "
                         f"top-1 agreement {fmt_pct(agree)}.")
        elif cosine is not None:
            lines.append(f"Quality with the config's patterns: hidden cosine {cosine:.4f}.")
    r = c.get("retrieval")
    if isinstance(r, dict):
        if r.get("skipped_reason"):
            lines.append(f"Passkey retrieval skipped: {r['skipped_reason']}.")
        elif num(r.get("plan_accuracy")) is None:
            lines.append("Passkey retrieval uninformative: the dense model did not find the key at any tested depth.")
        else:
            lines.append(f"Passkey retrieval with the config: {fmt_pct(r.get('plan_accuracy'), 0)} vs "
                         f"{fmt_pct(r.get('dense_accuracy'), 0)} dense; {r.get('lost', '?')} key(s) lost.")
    return lines


def config_rows(result: AuditResult, top: int = 20) -> list[list[str]]:
    """The heads losing the most mass (at most ``top``), worst first."""
    c = _config(result)
    if c is None:
        return []
    heads = sorted((h for h in c.get("heads") or [] if num(h.get("lost_mass_p90")) is not None),
                   key=lambda h: -float(h["lost_mass_p90"]))
    return [[f"L{h.get('layer')}.H{h.get('head')}", str(h.get("pattern", "?")), fmt_pct(h.get("lost_mass_p90"), 2),
             fmt_pct(h.get("lost_mass_mean"), 2)] for h in heads[:top]]


def speed_lines(result: AuditResult) -> list[str]:
    """The measured attention speed of the plan (empty when not measured)."""
    verify = result.data.get("verify")
    sp = verify.get("speed") if isinstance(verify, dict) else None
    if not isinstance(sp, dict):
        return []
    measured, predicted = num(sp.get("attention_speedup")), num(sp.get("predicted_flops_speedup"))
    line = (f"Measured attention speedup at {sp.get('seq_len', '?')} tokens on {sp.get('device', '?')}: "
            f"{measured:.2f}x" if measured is not None else "Measured attention speedup: n/a")
    if sp.get("skipped_reason"):
        return [f"Attention speed not measured: {sp['skipped_reason']}."]
    oracle = num(sp.get("oracle_flops_speedup"))
    bits = [f"kernel FLOPs predict {predicted:.2f}x"] if predicted is not None else []
    bits += [f"oracle top-k bound {oracle:.2f}x"] if oracle is not None else []
    line += f" ({', '.join(bits)})" if bits else ""
    setup = num(sp.get("compile_s"))
    setup = num(sp.get("setup_s")) if setup is None else setup
    lines = [line + f"; plan attention: {sp.get('plan_attention', '?')}; compilation "
             f"{setup or 0:.1f} s apart."]
    heads = sp.get("heads_kept_dense") or []
    if heads:
        shown = ", ".join(f"L{h.get('layer')}.H{h.get('head')}" for h in heads[:12])
        more = f" and {len(heads) - 12} more" if len(heads) > 12 else ""
        lines.append(f"Heads measured slower than dense and kept dense ({len(heads)}): {shown}{more}.")
    kept = sp.get("layers_kept_dense") or []
    if kept:
        lines.append(f"Layers kept dense (mask building + kernel slower than dense): {', '.join(map(str, kept))}.")
    return lines


def search_lines(result: AuditResult) -> list[str]:
    """The largest plan prefix within the quality and passkey budgets, and the prefixes probed
    (empty when no search ran)."""
    verify = result.data.get("verify")
    if not isinstance(verify, dict) or verify.get("largest_plan_heads") is None:
        return []
    heads = len(result.data.get("plan") or [])
    budget = f"perplexity +{fmt_pct(verify.get('max_ppl_increase'))}"
    if verify.get("max_retrieval_drop") is not None:
        budget += f", passkeys lost <= {fmt_pct(verify['max_retrieval_drop'])}"
    saving = num(verify.get("largest_plan_flops_saving"))
    lines = [f"Largest plan within budget ({budget}): the first {verify['largest_plan_heads']} of {heads} "
             f"planned heads, saving {saving:.1%} of the attention FLOPs"
             + (f"; {verify['method']}." if verify.get("method") else ".")]
    probes = [p for p in verify.get("search") or [] if isinstance(p, dict)]
    if probes:
        parts = []
        for p in probes:
            q = (f"ppl x{p['ppl_ratio']:.4f}" if num(p.get("ppl_ratio")) is not None
                 else f"cosine {num(p.get('hidden_cosine')) or 0:.4f}")
            drop = num(p.get("retrieval_drop"))
            parts.append(f"{p['heads']} heads: {q}" + (f", passkeys lost {drop:.0%}" if drop is not None else ""))
        lines.append("Prefixes probed: " + "; ".join(parts) + ".")
    return lines
