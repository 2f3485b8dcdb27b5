"""Benchmark of attn_audit.rows.row_metrics against a sort-based reference and a plain
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
* ``row_metrics`` the kernel, eps = (0.01, 0.05, 0.1), budgets (16, 64, 256), 1 sink,

and how the kernel settled the rows: from the histogram bounds alone, by sorting the keys
of the boundary bins, or by the exact sort-based fallback.  Best-of-N is used because the
machine may be shared; the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from attn_audit import rows as rows_mod  # noqa: E402
from attn_audit.rows import RowSpec, reference_row_metrics, row_metrics  # noqa: E402


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


def resolution(sc: torch.Tensor, qp: torch.Tensor, spec: RowSpec) -> tuple[float, float]:
    """Fractions of rows that needed the boundary-bin sort and the exact fallback."""
    seen = {"select": 0, "fallback": 0}
    sel, exact = rows_mod._select, rows_mod._exact_sorted

    def spy_sel(xr, rows, *a, **k):  # type: ignore[no-untyped-def]
        vals, ok = sel(xr, rows, *a, **k)
        fams = a[-1]  # rows with at least one target left to the boundary-bin sort
        seen["select"] += int(torch.stack([f[2].any(1) for f in fams]).any(0).sum())
        return vals, ok

    def spy_exact(x, sp):  # type: ignore[no-untyped-def]
        seen["fallback"] += x.shape[0]
        return exact(x, sp)

    rows_mod._select, rows_mod._exact_sorted = spy_sel, spy_exact
    try:
        row_metrics(sc, qp, spec)
    finally:
        rows_mod._select, rows_mod._exact_sorted = sel, exact
    tot = sc.shape[0] * sc.shape[1]
    return seen["select"] / tot, seen["fallback"] / tot


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
    spec = RowSpec(eps=(0.01, 0.05, 0.1))
    print(
        f"{'shape (G,R,n)':>17} {'s':>2} {'softmax':>8} {'sort':>8} {'reference':>10}"
        f" {'row_metrics':>12} {'x softmax':>9} {'bin-sort':>8} {'fallback':>8}"
    )
    for shape in [(9, 1024, 1024), (9, 256, 4096)]:
        for s in (1.0, 2.0, 4.0):
            sc, qp = make_scores(*shape, s)
            t_rm = best_of(lambda: row_metrics(sc, qp, spec), reps)
            t_sm = best_of(lambda: torch.softmax(sc, -1), reps)
            t_so = best_of(lambda: torch.sort(sc, -1, descending=True), max(1, reps // 3))
            t_ref = float("nan")
            if not args.quick:
                t_ref = best_of(lambda: reference_row_metrics(sc, qp, spec), 1)
            sel, fb = resolution(sc, qp, spec)
            print(
                f"{str(shape):>17} {s:2.0f} {t_sm * 1e3:6.1f}ms {t_so * 1e3:6.1f}ms"
                f" {t_ref * 1e3:8.1f}ms {t_rm * 1e3:10.1f}ms {t_rm / t_sm:9.1f}"
                f" {sel * 100:7.1f}% {fb * 100:7.2f}%",
                flush=True,
            )


if __name__ == "__main__":
    main()
