"""Benchmark of attn_audit.rows.dispatch.row_metrics against a sort-based reference and a plain
softmax of the same scores.

Run:  python benchmarks/bench_rows.py [--reps N] [--threads T] [--quick]

Scores are realistic synthetic attention logits: S = Q K^T / 8 with Q, K ~ N(0, s^2) in
d_head = 64 (logit std 1, 4 and 16 for s = 1, 2, 4), a sink column boosted by +8 and a
causal mask (the R query rows are the last R of the n positions).  For every shape and s
it prints the best-of-N wall time of

* ``softmax``     torch.softmax(S, -1), float32 (the floor any exact method pays),
* ``sort``        torch.sort(S, -1, descending=True), float32 (what a naive exact k_eps
                  needs at least),
* ``reference``   reference_row_metrics (float64 softmax, two sorts, cumsum; 1 run),
* ``cpu``         row_metrics with the compiled CPU kernel (attn_audit/rows_cpu.py),
* ``torch``       row_metrics with the vectorised torch kernel (used on GPUs),

both with eps = (0.01, 0.05, 0.1), budgets (16, 64, 256), 1 sink, and the share of rows the
CPU kernel hands to the exact sort-based fallback.  Best-of-N is used because the machine may
be shared; the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from attn_audit.config import MeasureSpec  # noqa: E402
from attn_audit.rows import reference_row_metrics, row_metrics  # noqa: E402


def make_scores(
    g: int, r: int, n: int, s: float, *, seed: int = 0, sink: float = 8.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal scores (g, r, n) float32 for the last r query positions, and q_pos (r,)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(g, r, 64, generator=gen) * s
    k = torch.randn(g, n, 64, generator=gen) * s
    sc = (q @ k.transpose(-1, -2)) / 8.0
    sc[..., 0] += sink
    q_pos = torch.arange(r) + (n - r)
    mask = torch.arange(n)[None, :] > q_pos[:, None]
    sc.masked_fill_(mask, float("-inf"))
    return sc.contiguous(), q_pos


def best_of(fn: Callable[[], object], reps: int) -> float:
    """Smallest wall time (s) of reps calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def fallback_share(sc: torch.Tensor, qp: torch.Tensor, spec: MeasureSpec) -> float:
    """Fraction of rows the CPU kernel hands back to the sort-based reference (rounding margin)."""
    from attn_audit.rows.cpu import rows_kernel

    g, r, n = sc.shape
    out = rows_kernel(sc.reshape(g * r, n).numpy(), qp.numpy(), r, spec.eps, spec.budgets,
                      spec.sinks, spec.window)
    return float(out["redo"].mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=9, help="best of this many runs")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: keep)")
    ap.add_argument("--quick", action="store_true", help="3 runs, no reference")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 3 if args.quick else args.reps
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    spec = MeasureSpec(eps=(0.01, 0.05, 0.1))
    print(
        f"{'shape (G,R,n)':>17} {'s':>2} {'softmax':>8} {'sort':>8} {'reference':>10}"
        f" {'cpu':>8} {'x softmax':>9} {'torch':>8} {'fallback':>8}"
    )
    for shape in [(9, 1024, 1024), (9, 256, 4096)]:
        for s in (1.0, 2.0, 4.0):
            sc, qp = make_scores(*shape, s)
            t_rm = best_of(lambda: row_metrics(sc, qp, spec, backend="cpu"), reps)
            t_tk = best_of(lambda: row_metrics(sc, qp, spec, backend="torch"), max(1, reps // 3))
            t_sm = best_of(lambda: torch.softmax(sc, -1), reps)
            t_so = best_of(lambda: torch.sort(sc, -1, descending=True), max(1, reps // 3))
            t_ref = float("nan")
            if not args.quick:
                t_ref = best_of(lambda: reference_row_metrics(sc, qp, spec), 1)
            fb = fallback_share(sc, qp, spec)
            print(
                f"{str(shape):>17} {s:2.0f} {t_sm * 1e3:6.1f}ms {t_so * 1e3:6.1f}ms"
                f" {t_ref * 1e3:8.1f}ms {t_rm * 1e3:6.1f}ms {t_rm / t_sm:9.1f}"
                f" {t_tk * 1e3:6.1f}ms {fb * 100:7.2f}%",
                flush=True,
            )


if __name__ == "__main__":
    main()
