"""Benchmark: peak RSS of an audit on a 50 MB single-line text file vs ordinary text.

A text file that is one endless line (no paragraph break) used to reach the tokenizer whole:
7.5 GB and 88 s for 252 tokens. Text is now read in 1 MB chunks and tokenized in pieces of at
most 100k characters (attn_audit.data), so the peak should stay within 500 MB of the same audit
on ordinary text. Each case runs the real CLI in a fresh process and reports VmHWM:

    case=ordinary-50mb   peak_rss_mb=...  seconds=...
    case=single-line-50mb peak_rss_mb=... seconds=...  delta_mb=...

Usage: .venv/bin/python benchmarks/bench_hostile.py [--model smollm2-135m-instruct] [--mb 50]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time


def child(args: list[str]) -> None:
    from attn_audit.cli import main

    t0 = time.perf_counter()
    code = main(args)
    with open("/proc/self/status") as fh:
        hwm = next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))
    print(json.dumps({"code": code, "peak_rss_mb": round(hwm, 1), "seconds": round(time.perf_counter() - t0, 1)}))


def write_text(path: str, mb: int, single_line: bool) -> None:
    """``mb`` MB of English-like words: paragraphs of ~60 words, or one line without any break."""
    rng = random.Random(0)
    words = ("the of and to in is was for that with as on by at from this be are an which or have it not "
             "attention head query key value sparse model token layer budget window sink plan").split()
    sep = " " if single_line else "\n\n"
    size = 0
    with open(path, "w") as fh:
        while size < mb << 20:
            para = " ".join(rng.choice(words) for _ in range(60)) + "."
            fh.write(para + sep)
            size += len(para) + len(sep)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--seq-len", default="256")
    a = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case, single in (("ordinary", False), ("single-line", True)):
            data = os.path.join(tmp, f"{case}.txt")
            write_text(data, a.mb, single)
            args = [a.model, "--dataset", data, "--seq-len", a.seq_len, "--num-sequences", "1", "--batch-size", "1",
                    "--format", "json", "--quiet", "--out", os.path.join(tmp, f"out-{case}")]
            proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
            if proc.returncode != 0 or not proc.stdout.strip():
                raise SystemExit(f"{case}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            results[case] = rec
            delta = f" delta_mb={rec['peak_rss_mb'] - results['ordinary']['peak_rss_mb']:.1f}" if single else ""
            print(f"case={case}-{a.mb}mb model={a.model} peak_rss_mb={rec['peak_rss_mb']} seconds={rec['seconds']} "
                  f"exit={rec['code']}{delta}", flush=True)
            os.remove(data)


if __name__ == "__main__":
    main()
