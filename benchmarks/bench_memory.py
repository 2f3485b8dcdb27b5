"""Benchmark: peak RSS does not grow with the number of sequences (the result is streamed).

Runs the real CLI in a fresh process per measurement and prints its peak RSS (VmHWM):

    model=all-minilm-l6-v2 seq_len=128 sequences=16 peak_rss_mb=... seconds=...
    model=all-minilm-l6-v2 seq_len=128 sequences=512 peak_rss_mb=... seconds=...  ratio=1.01

Usage: .venv/bin/python benchmarks/bench_memory.py [--model all-minilm-l6-v2] [--seq-len 128]
       [--counts 16,512] [-- extra attn-audit options]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def child(args: list[str]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from attn_audit.cli import main

    t0 = time.perf_counter()
    code = main(args)
    with open("/proc/self/status") as fh:
        hwm = next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))
    print(json.dumps({"code": code, "peak_rss_mb": round(hwm, 1), "seconds": round(time.perf_counter() - t0, 1)}))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--seq-len", default="128")
    ap.add_argument("--counts", default="16,512")
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    first = None
    for n in (int(x) for x in a.counts.split(",")):
        with tempfile.TemporaryDirectory() as out:
            args = [a.model, "--seq-len", a.seq_len, "--num-sequences", str(n), "--format", "json", "--quiet",
                    "--out", out, *a.extra]
            proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
        first = first or rec["peak_rss_mb"]
        print(f"model={a.model} seq_len={a.seq_len} sequences={n} peak_rss_mb={rec['peak_rss_mb']} "
              f"seconds={rec['seconds']} exit={rec['code']} ratio_to_first={rec['peak_rss_mb'] / first:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
