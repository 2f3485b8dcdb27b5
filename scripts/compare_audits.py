"""Compare two audit.json files numerically, ignoring what legitimately differs between runs.

Usage: python scripts/compare_audits.py NEW/audit.json OLD/audit.json [--rtol 1e-9] [--atol 1e-12]

Walks both JSON trees: the same keys and list lengths, strings / booleans / integers / None equal,
floats within ``rtol`` relative or ``atol`` absolute. Skipped: the run's date, versions and times
(``created``, ``versions``, ``elapsed_s``, ``tokens_per_s``, ``statistics_s``, ``stage_s``,
``total_s`` and any other ``*_s`` key of the ``run`` block). Prints the differences beyond the
tolerance (at most 40), the skipped keys and the largest relative difference; exits 1 if any
difference is beyond the tolerance. No numpy, no torch (plain json).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

SKIP = {"created", "versions", "elapsed_s", "tokens_per_s", "statistics_s", "stage_s", "total_s"}


def compare(new: Any, old: Any, rtol: float, atol: float) -> tuple[list[str], set[str], tuple[float, str]]:
    """(differences beyond tolerance, skipped key paths, (largest relative difference, its path))."""
    diffs: list[str] = []
    skipped: set[str] = set()
    worst = (0.0, "")

    def walk(a: Any, b: Any, path: str) -> None:
        nonlocal worst
        if isinstance(b, dict):
            if not isinstance(a, dict):
                diffs.append(f"{path}: {type(a).__name__} vs dict")
                return
            for k in sorted(set(a) | set(b)):
                if k in SKIP or (path == ".run" and k.endswith("_s")):
                    skipped.add(f"{path}.{k}")
                    continue
                if k not in a or k not in b:
                    diffs.append(f"{path}.{k}: only in {'old' if k in b else 'new'}")
                    continue
                walk(a[k], b[k], f"{path}.{k}")
        elif isinstance(b, list):
            if not isinstance(a, list) or len(a) != len(b):
                diffs.append(f"{path}: list lengths differ")
                return
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}[{i}]")
        elif isinstance(b, float) and isinstance(a, (int, float)) and not isinstance(a, bool):
            if a == b:
                return
            rel = abs(a - b) / max(abs(b), 1e-300)
            if rel > worst[0]:
                worst = (rel, path)
            if abs(a - b) > max(atol, rtol * abs(b)):
                diffs.append(f"{path}: {a!r} vs {b!r} (relative {rel:.2e})")
        elif a != b or type(a) is not type(b):
            diffs.append(f"{path}: {a!r} vs {b!r}")

    walk(new, old, "")
    return diffs, skipped, worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("new")
    ap.add_argument("old")
    ap.add_argument("--rtol", type=float, default=1e-9)
    ap.add_argument("--atol", type=float, default=1e-12)
    args = ap.parse_args()
    with open(args.new, encoding="utf-8") as f:
        new = json.load(f)
    with open(args.old, encoding="utf-8") as f:
        old = json.load(f)
    diffs, skipped, (rel, where) = compare(new, old, args.rtol, args.atol)
    print(f"differences beyond rtol={args.rtol:g} / atol={args.atol:g}: {len(diffs)}")
    for d in diffs[:40]:
        print("  ", d)
    print("skipped:", ", ".join(sorted(skipped)))
    print(f"largest relative difference: {rel:.3e}" + (f" at {where}" if where else ""))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
