"""Benchmark: the full exact audit against the plain sdpa forward of the same tokens.

For each length, in one process: load the bundled SmolLM2, time the plain forward (sdpa, no
capture) of the token batch, then the audit of the same batch with every row measured
(``--exact``: capture, exact k_eps of every row, reservoirs, statistics, ranking), then the
forward again (this host's speed drifts over minutes: ``forward_s`` is the mean of the two
forward timings, each the faster of two runs), and print

    seq_len=1024 sequences=8 forward_s=... audit_s=... ratio=<audit / forward> capture_s=...
    statistics_s=... capture_ratio=<capture / forward> ... added_rss_mb=...

Each length gets the same token budget (``--tokens``, default 8192: 8 x 1024, 2 x 4096). The
row kernel is compiled by numba on first use and cached on disk; a tiny warm-up call before the
timed audit keeps that one-time compilation (reported as ``jit_s``) out of the ratio.

``--floor`` also measures a lower bound for any exact engine: the capture again with the row
kernel replaced by a softmax that only writes each row's weights and normaliser (what the
layer output needs anyway, one fused numba pass), plus the same statistics:
``floor_ratio = (floor_capture_s + statistics_s) / forward_s``. No exact k_eps can cost less
than that softmax, so a target below ``floor_ratio`` cannot be met by a faster kernel alone.
It also times the language model's whole forward with its logits (``forward_with_logits_s``,
one run), a more generous baseline than the base model's, and ``floor_ratio_vs_logits``.

``added_rss_mb`` is the process's peak RSS during the audit minus its RSS with the model loaded
and its weights paged in (after a forward, freed heap returned to the OS). ``--flat`` also runs 8 and 64 sequences at one length and prints the
two peak RSS figures (the result is streamed, so they should agree within 10%).

Each line also gives the split by stage (``stage_statistics_s``: sparsity records and
Gaussianity; ``stage_theory_s``; ``stage_rank_s``, from ``run.stage_s``), the number of
Gaussianity assessments (``head_sites``) and ``statistics_ms_per_head_site``. ``--default``
adds the default audit (16 x 512, sampled rows, default options, batch 4, the forward batched
alike) with its ratio to the forward; ``--only-default`` runs that alone; ``--model`` another
bundled alias (a model-size line).

Usage: .venv/bin/python benchmarks/bench_audit.py [--lengths 1024,4096] [--tokens 8192]
       [--flat 1024] [--floor] [--default | --only-default] [--model ALIAS] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI sets them (attn_audit/cli.py)
os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _softmax_floor():  # type: ignore[no-untyped-def]
    """A stand-in for ``row_metrics`` that computes only each row's softmax weights
    exp(s - max) (into ``weights_out``) and their sum: one fused pass, rows in parallel.
    The other fields are filled with valid placeholders so the accumulator runs unchanged."""
    import numba
    import numpy as np
    import torch

    from attn_audit.rows import RowMetrics
    from attn_audit.rows.cpu_stages import _exp_neg

    @numba.njit(parallel=True, fastmath={"nsz", "arcp", "contract", "reassoc"}, cache=True)
    def softmax_rows(x, q_pos, per_head, causal, w, mass, n_keys):  # type: ignore[no-untyped-def]
        for i in numba.prange(x.shape[0]):
            ln = min(x.shape[1], q_pos[i % per_head] + 1) if causal else x.shape[1]
            mx = -np.inf
            for j in range(ln):
                mx = max(mx, x[i, j])
            z = 0.0
            c = 0
            for j in range(ln):
                v = x[i, j]
                ev = _exp_neg(max(np.float64(v) - mx, -300.0)) if v > -np.inf else 0.0
                w[i, j] = ev
                z += ev
                c += 1 if v > -np.inf else 0
            w[i, ln:] = 0.0
            mass[i] = z
            n_keys[i] = c

    def row_metrics(scores, q_pos, spec, weights_out=None, causal=False, **_):  # type: ignore[no-untyped-def]
        g, r, n = scores.shape
        mass = np.empty(g * r)
        n_keys = np.empty(g * r, np.int64)
        w = weights_out if weights_out is not None else torch.empty(g, r, n)
        softmax_rows(scores.reshape(g * r, n).numpy(), q_pos.numpy(), r, causal, w.view(g * r, n).numpy(),
                     mass, n_keys)
        nk = torch.from_numpy(n_keys).view(g, r)
        one, zero = torch.ones(g, r, dtype=torch.float64), torch.zeros(g, r, dtype=torch.float64)
        k = nk[..., None].expand(g, r, len(spec.eps)).contiguous()
        return RowMetrics(n_keys=nk, k_eps=k, k_eps_sinks=k.clone(),
                          tail_mass=torch.zeros(g, r, len(spec.budgets), dtype=torch.float64),
                          participation=one, entropy=zero, sink_mass=zero, local_mass=zero,
                          bulk_mass=one, bulk_mean=zero, bulk_std=one, max_score=zero, max_abs_score=one,
                          n_bulk=nk, mass=torch.from_numpy(mass).view(g, r))

    return row_metrics


def head_sites(result) -> int:  # type: ignore[no-untyped-def]
    """Gaussianity assessments of an audit: one per distinct (site, layer, head) sample (a K site
    is shared by the query heads of its KV group, and assessed once)."""
    seen = set()
    for h in result.heads:
        for site, block in (h.get("gaussianity") or {}).items():
            per_query = site in ("q", "q_pre_rope", "row_logits")
            seen.add((site, h["layer"], h["head"] if per_query else h["kv_head"]))
    return len(seen)


def one(seq_len: int, sequences: int, device: str, batch_size: int, skip_forward: bool = False,
        floor: bool = False, default: bool = False, model: str = "smollm2-135m-instruct") -> dict:
    import torch

    from attn_audit.api import audit
    from attn_audit.config import AuditConfig, MeasureSpec
    from attn_audit.data import DataSpec, batches, build_sequences
    from attn_audit.load import load_model
    from attn_audit.progress import NullProgress
    from attn_audit.rows import row_metrics

    torch.manual_seed(0)
    t0 = time.perf_counter()
    row_metrics(torch.randn(1, 4, 8), torch.arange(4) + 4, MeasureSpec(eps=(0.1,)))  # numba JIT / cache load
    jit = time.perf_counter() - t0
    lm = load_model(model, device=device)
    (td,) = build_sequences(DataSpec(), lm.tokenizer, [seq_len], sequences, 0)
    base = lm.model.base_model

    def forward_s() -> float:
        """The plain forward of the batch: the faster of two runs."""
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            with torch.inference_mode():
                for _, ids, mask in batches(td.sequences, batch_size, 0):
                    base(input_ids=ids.to(device), attention_mask=mask.to(device))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times)

    fwd_before = float("nan") if skip_forward else forward_s()
    # the loaded model, its weights paged in by a forward (or a short one with --flat), the
    # forward's freed activations handed back to the OS
    if skip_forward:
        with torch.inference_mode():
            base(input_ids=torch.tensor([td.sequences[0][:16]], device=device))
    from attn_audit.capture.loop import release_freed_memory

    release_freed_memory()
    rss_loaded = _rss_mb()
    _reset_peak()
    if default:  # the default audit: sampled rows, default options (its own batch size)
        cfg = AuditConfig(seq_lens=(seq_len,), num_sequences=sequences, batch_size=batch_size, device=device)
    else:
        cfg = AuditConfig(seq_lens=(seq_len,), num_sequences=sequences, batch_size=batch_size,
                          measure=MeasureSpec(rows_per_sequence=None), device=device)
    t0 = time.perf_counter()
    res = audit(lm.model, lm.tokenizer, DataSpec(), cfg, info=lm.info, progress=NullProgress())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    aud = time.perf_counter() - t0
    peak = _rss_mb("VmHWM")
    # the host's speed drifts over minutes: the forward is timed before and after the audit and
    # the ratio uses their mean (both are printed)
    fwd_after = float("nan") if skip_forward else forward_s()
    fwd = (fwd_before + fwd_after) / 2
    floor_s = lm_fwd = float("nan")
    if floor:
        # the more generous baseline: the language model's whole forward, logits included
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _, ids, mask in batches(td.sequences, batch_size, 0):
                lm.model(input_ids=ids.to(device), attention_mask=mask.to(device))
        lm_fwd = time.perf_counter() - t0
        import attn_audit.capture.accumulate as accumulate
        from attn_audit.capture import capture_length

        real, accumulate.row_metrics = accumulate.row_metrics, _softmax_floor()
        try:
            accumulate.row_metrics(torch.randn(1, 4, 8), torch.arange(4) + 4, cfg.measure)  # compile
            t0 = time.perf_counter()
            capture_length(lm.model, lm.info, td, cfg, 0, NullProgress())
            floor_s = time.perf_counter() - t0
        finally:
            accumulate.row_metrics = real
    stage = res.run.get("stage_s", {})
    sites = head_sites(res)
    return {
        "model": model,
        "rows": "sampled" if default else "exact",
        "seq_len": seq_len,
        "sequences": sequences,
        "forward_s": round(fwd, 3),
        "forward_before_s": round(fwd_before, 3),
        "forward_after_s": round(fwd_after, 3),
        "audit_s": round(aud, 3),
        "ratio": round(aud / fwd, 3) if fwd == fwd else None,
        # the split: capture (data, forward with the exact kernel) and the statistics, whose cost
        # is fixed per run (Gaussianity of every head's reservoir, theory, ranking)
        "capture_s": res.run["elapsed_s"],
        "statistics_s": res.run["statistics_s"],
        "capture_ratio": round(res.run["elapsed_s"] / fwd, 3) if fwd == fwd else None,
        # the split by stage (run.stage_s) and the Gaussianity cost per assessed head-site
        **{("stage_" + k + "_s"): v for k, v in stage.items() if k in ("statistics", "theory", "rank")},
        "head_sites": sites,
        "statistics_ms_per_head_site": round(1e3 * stage.get("statistics", float("nan")) / max(sites, 1), 2),
        "rss_loaded_mb": round(rss_loaded, 1),
        "peak_rss_mb": round(peak, 1),
        "added_rss_mb": round(peak - rss_loaded, 1),
        "floor_capture_s": round(floor_s, 3) if floor else None,
        "floor_ratio": round((floor_s + res.run["statistics_s"]) / fwd, 3) if floor and fwd == fwd else None,
        "forward_with_logits_s": round(lm_fwd, 3) if floor else None,
        "floor_ratio_vs_logits": round((floor_s + res.run["statistics_s"]) / lm_fwd, 3) if floor else None,
        "jit_s": round(jit, 2),
        "threads": torch.get_num_threads(),
        "device": device,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per length (sequences = tokens / length)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--flat", type=int, default=0, help="also compare peak RSS of 8 vs 64 sequences at this length")
    ap.add_argument("--floor", action="store_true", help="also measure the softmax-only lower bound")
    ap.add_argument("--default", action="store_true",
                    help="also run the default audit (16 x 512, sampled rows, default options, batch 4)")
    ap.add_argument("--only-default", action="store_true", help="run the default audit only")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="bundled alias (a model-size line)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        seq_len, sequences, skip, default, batch = (int(x) for x in args.child.split(":"))
        print(json.dumps(one(seq_len, sequences, args.device, batch, bool(skip), args.floor and not default,
                             bool(default), args.model)))
        return
    runs = [] if args.only_default else [
        (int(n), max(1, args.tokens // int(n)), 0, 0, args.batch_size) for n in args.lengths.split(",") if n]
    if args.default or args.only_default:
        from attn_audit.config import AuditConfig

        d = AuditConfig()
        runs.append((d.seq_len, d.num_sequences, 0, 1, d.batch_size))
    if args.flat:
        runs += [(args.flat, 8, 1, 0, args.batch_size), (args.flat, 64, 1, 0, args.batch_size)]
    for seq_len, sequences, skip, default, batch in runs:
        # a fresh process per measurement, so peak RSS is that run's own
        out = subprocess.run([sys.executable, __file__, "--child", f"{seq_len}:{sequences}:{skip}:{default}:{batch}",
                              "--device", args.device, "--model", args.model]
                             + (["--floor"] if args.floor and not skip else []),
                             capture_output=True, text=True, check=True)
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        print(" ".join(f"{k}={v}" for k, v in rec.items()), flush=True)


if __name__ == "__main__":
    main()
