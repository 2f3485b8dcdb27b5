"""A small, schema-complete synthetic audit result for renderer, gate and export tests.

The numbers are made up (seeded) and say nothing about any model; tests that need real
figures run the real pipeline instead.
"""

from __future__ import annotations

import random
from typing import Any

from attn_audit.result import SCHEMA_VERSION, AuditResult


def make_result(
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seq_len: int = 256,
    eps: tuple[str, ...] = ("0.01", "0.05", "0.1"),
    seed: int = 0,
    name: str = "synthetic/tiny-llama",
    *,
    gaussianity: bool = True,
    qq: bool = False,
    theory: bool = False,
    seq_lens: tuple[int, ...] | None = None,
    plan: bool = False,
    verify: bool = False,
    gate: str | None = None,
    dataset_spec: str = "bundled:fortunes",
) -> AuditResult:
    """Build an AuditResult with every required field filled, for tests.

    The keyword-only options add the optional sections later steps fill (all off by default, and
    drawn from a separate random stream, so the default result never changes):
    ``gaussianity=False`` empties every head's ``gaussianity``; ``qq`` adds QQ points per site;
    ``theory`` adds per-head ``theory`` and ``theory_summary``; ``seq_lens`` (several lengths)
    adds ``by_length`` and ``scaling``; ``plan``, ``verify`` add those blocks; ``gate`` is None,
    "pass" (every check passes) or "fail" (every check fails).
    """
    rng = random.Random(seed)
    group = num_heads // num_kv_heads
    heads: list[dict[str, Any]] = []
    for layer in range(num_layers):
        for head in range(num_heads):
            base = rng.uniform(0.02, 0.9)
            sparsity = {}
            for i, key in enumerate(eps):
                frac = min(1.0, base * (1.6 - 0.3 * i))
                k_mean = frac * seq_len / 2
                sparsity[key] = {
                    "k_mean": k_mean,
                    "k_median": int(k_mean),
                    "k_p90": int(min(seq_len, k_mean * 1.8)),
                    "kfrac_mean": frac,
                    "rows": 240 * 8,
                    "ci": {
                        "k_mean": [k_mean * 0.95, k_mean * 1.05],
                        "kfrac_mean": [frac * 0.95, min(1.0, frac * 1.05)],
                    },
                    "by_position": [
                        {"lo": lo, "hi": 2 * lo, "rows": 8 * lo, "k_mean": k_mean * lo / seq_len,
                         "kfrac_mean": frac}
                        for lo in (16, 32, 64, 128)
                    ],
                }
            verdict = rng.choice(["gaussian-like", "heavy-tailed", "skewed", "outlier-channels"])
            gauss = {
                site: {
                    "verdict": verdict,
                    "is_gaussian": verdict == "gaussian-like",
                    "skewness": rng.uniform(-1, 1),
                    "excess_kurtosis": rng.uniform(-0.5, 6),
                    "anderson": rng.uniform(0.1, 50),
                    "ks_distance": rng.uniform(0.005, 0.1),
                    "n": 2048,
                }
                for site in ("q", "k")
            }
            heads.append(
                {
                    "layer": layer,
                    "head": head,
                    "kv_head": head // group,
                    "sparsity": sparsity,
                    "tail_mass": {"16": rng.uniform(0, 0.5), "64": rng.uniform(0, 0.2), "256": 0.0},
                    "entropy_mean": rng.uniform(0.5, 5),
                    "participation_mean": rng.uniform(1, 60),
                    "sink_mass_mean": rng.uniform(0, 0.9),
                    "local_mass_mean": rng.uniform(0, 0.5),
                    "bulk_mass_mean": rng.uniform(0, 0.5),
                    "R": {
                        "logit_range": rng.uniform(5, 30),
                        "qk_bound": rng.uniform(30, 200),
                        "max_q_norm": rng.uniform(5, 40),
                        "max_k_norm": rng.uniform(5, 40),
                        "scale": 0.125,
                    },
                    "gaussianity": gauss,
                    "flags": ["sink-saturated"] if base < 0.05 else [],
                    "score": 1.0 - base,
                    "rank": 0,
                }
            )
    order = sorted(heads, key=lambda h: (-h["score"], h["layer"], h["head"]))
    ranking = []
    for rank, rec in enumerate(order, start=1):
        rec["rank"] = rank
        ranking.append(
            {
                "layer": rec["layer"],
                "head": rec["head"],
                "kv_head": rec["kv_head"],
                "score": rec["score"],
                "rank": rank,
                "reason": f"needs {rec['sparsity']['0.05']['kfrac_mean']:.0%} of keys at eps=0.05",
            }
        )
    data = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "attn-audit", "version": "0.0.0-test"},
        "model": {
            "name": name,
            "source": "hub",
            "family": "llama",
            "num_layers": num_layers,
            "num_heads": num_heads,
            "num_kv_heads": num_kv_heads,
            "head_dim": 16,
            "causal": True,
            "max_positions": 2048,
            "rope": True,
            "sliding_window": None,
            "dtype": "float32",
            "revision": None,
            "trust_remote_code": False,
        },
        "run": {
            "seq_len": seq_len,
            "seq_lens": [seq_len],
            "num_sequences": 8,
            "eps": [float(e) for e in eps],
            "eps_keys": list(eps),
            "min_keys": 16,
            "rows": "all",
            "rows_per_sequence": None,
            "seed": 0,
            "budgets": [16, 64, 256],
            "sinks": 1,
            "window": 64,
            "batch_size": 4,
            "device": "cpu",
            "sites": ["q_rot", "k_rot"],
            "capture_point": "post-RoPE, before repeat_kv (attention interface)",
            "reservoir_size": 2048,
            "versions": {"attn_audit": "0.0.0-test", "torch": "x", "transformers": "y"},
            "dataset": {
                "spec": dataset_spec,
                "kind": "text",
                "split": None,
                "text_column": "text",
                "documents": 100,
                "tokens": 8 * seq_len,
                "token_hash": "0" * 64,
            },
            "elapsed_s": 1.0,
            "tokens_per_s": 2048.0,
            "nonfinite_rows": 0,
            "created": "2026-01-01T00:00:00+00:00",
        },
        "heads": heads,
        "ranking": ranking,
    }
    _add_optional(
        data,
        random.Random(seed + 7919),
        gaussianity=gaussianity,
        qq=qq,
        theory=theory,
        seq_lens=seq_lens,
        plan=plan,
        verify=verify,
        gate=gate,
    )
    return AuditResult(data=data)


def _add_optional(
    data: dict[str, Any],
    rng: random.Random,
    *,
    gaussianity: bool,
    qq: bool,
    theory: bool,
    seq_lens: tuple[int, ...] | None,
    plan: bool,
    verify: bool,
    gate: str | None,
) -> None:
    """Fill the optional sections of ``data`` in place (see :func:`make_result`)."""
    heads: list[dict[str, Any]] = data["heads"]
    run = data["run"]
    eps_keys: list[str] = run["eps_keys"]
    primary = "0.05" if "0.05" in eps_keys else eps_keys[len(eps_keys) // 2]
    seq_len = run["seq_len"]
    if not gaussianity:
        for rec in heads:
            rec["gaussianity"] = {}
    if qq and gaussianity:
        for rec in heads:
            for block in rec["gaussianity"].values():
                tail = 1.0 + max(0.0, block["excess_kurtosis"]) / 6
                block["qq"] = [
                    [t, t * (tail if abs(t) > 1 else 1.0) + rng.gauss(0, 0.03)]
                    for t in (-2.5 + 0.25 * i for i in range(21))
                ]
    if theory:
        for rec in heads:
            rec["theory"] = {
                "k_pred": {
                    key: rec["sparsity"][key]["k_mean"] * rng.uniform(0.6, 1.6) for key in eps_keys
                },
                "log_ratio_median": {key: rng.uniform(-0.5, 0.5) for key in eps_keys},
                "sigma_median": rng.uniform(0.5, 4),
                "large_sigma_share": rng.uniform(0, 0.3),
            }
        data["theory_summary"] = {"spearman_R_kfrac": [0.42, 0.31, 0.52], "rows": 1234}
    if seq_lens and len(seq_lens) > 1:
        run["seq_lens"] = sorted(set(seq_lens) | {seq_len})
        for rec in heads:
            c_exp = rng.uniform(0.3, 1.0)
            base = rec["sparsity"][primary]["k_mean"]
            by_length = {}
            for n in run["seq_lens"]:
                factor = (n / seq_len) ** c_exp
                by_length[str(n)] = {
                    "sparsity": {
                        key: {
                            **rec["sparsity"][key],
                            "k_mean": rec["sparsity"][key]["k_mean"] * factor,
                            "kfrac_mean": min(
                                1.0, rec["sparsity"][key]["kfrac_mean"] * factor * seq_len / n
                            ),
                        }
                        for key in eps_keys
                    }
                }
            rec["by_length"] = by_length
            rec["scaling"] = {
                "C": c_exp,
                "C_ci": [c_exp - 0.05, c_exp + 0.05],
                "alpha": base / seq_len**c_exp,
            }
    if plan:
        chosen = [r for r in data["ranking"] if r["score"] > 0.5]
        entries = []
        for r in chosen:
            rec = next(h for h in heads if h["layer"] == r["layer"] and h["head"] == r["head"])
            frac = rec["sparsity"][primary]["kfrac_mean"]
            entries.append(
                {
                    "layer": r["layer"],
                    "head": r["head"],
                    "kv_head": r["kv_head"],
                    "k": max(16, int(frac * seq_len)),
                    "pattern": "vertical_and_slash" if frac < 0.2 else "a_shape",
                    "kfrac": frac,
                    "flops_saving": 1.0 - frac,
                    "flops_saving_model": (1.0 - frac) / (len(heads) * 3),
                    "score": r["score"],
                    "reason": r["reason"],
                }
            )
        data["plan"] = entries
        data["plan_summary"] = {
            "target_len": seq_len,
            "eps_key": primary,
            "heads_planned": len(entries),
            "heads_total": len(heads),
            "planned_flops_saving": sum(e["flops_saving"] for e in entries) / len(heads),
        }
    if verify:
        data["verify"] = {
            "ppl_ratio": 1.0123,
            "top1_agreement": 0.981,
            "heads": [
                {
                    "layer": h["layer"],
                    "head": h["head"],
                    "rel_error_mean": rng.uniform(0.001, 0.05),
                    "rel_error_p99": rng.uniform(0.05, 0.2),
                    "tail_mass_mean": rng.uniform(0.001, 0.05),
                }
                for h in heads[:6]
            ],
            "max_ppl_increase": 0.02,
            "largest_plan_heads": max(1, len(heads) // 3),
            "largest_plan_flops_saving": 0.25,
            "max_retrieval_drop": 0.0,
            "method": "bisection over prefixes of the kernel plan",
            "search": [
                {"heads": max(1, len(heads) // 3), "ppl_ratio": 1.004, "top1_agreement": 0.99, "retrieval_drop": 0.0},
                {"heads": max(1, len(heads) // 3) + 1, "ppl_ratio": 1.006, "top1_agreement": 0.99,
                 "retrieval_drop": 0.25},
            ],
        }
    if gate is not None:
        ok = gate == "pass"
        status = "passed" if ok else "failed"
        data["gate"] = {
            "passed": ok,
            "exit_code": 0 if ok else 1,
            "checks": [
                {
                    "name": "min-flops-saving",
                    "expression": "planned_flops_saving >= 0.2",
                    "value": 0.31 if ok else 0.12,
                    "status": status,
                    "message": "planned attention FLOPs saving "
                    + ("0.31 >= 0.2" if ok else "0.12 < 0.2"),
                },
                {
                    "name": "max-ppl-increase",
                    "expression": "ppl_ratio <= 1.02",
                    "value": 1.0123 if ok else 1.05,
                    "status": status,
                    "message": "perplexity ratio " + ("1.0123 <= 1.02" if ok else "1.05 > 1.02"),
                },
                {
                    "name": "gaussian-share",
                    "expression": "gaussian_share >= 0.1",
                    "value": 0.25 if ok else 0.05,
                    "status": status,
                    "message": "share of Gaussian-looking heads "
                    + ("0.25 >= 0.1" if ok else "0.05 < 0.1"),
                },
            ],
        }
