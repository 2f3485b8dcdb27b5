"""Sweep the installed transformers' registry: does the audit's capture equal each family's eager attention?

For every model_type of the causal-LM and masked-LM (encoder) auto-mappings, plus the text
encoder-decoders T5 and BART families, build a tiny random config with the family's attention
options switched on and compare the captured probabilities with the model's eager
``output_attentions`` to 1e-5 (:func:`attn_audit.capture.families.check_type`). Each type runs in
a worker process with a time limit; a hung or crashed type is recorded and the sweep goes on.

Writes ``attn_audit/families.json`` (read by ``--list-families`` and by the loader's refusals),
``docs/families.md`` and the README block between ``<!-- families:start -->`` and
``<!-- families:end -->``.

    PYTHONPATH=. python scripts/family_sweep.py                 # the full sweep (~15 min on 2 cores)
    PYTHONPATH=. python scripts/family_sweep.py --types llama t5 --no-write
    PYTHONPATH=. python scripts/family_sweep.py --render-only   # regenerate docs from the JSON
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attn_audit.report.families import render_markdown, render_readme, summary_line  # noqa: E402

JSON_PATH = ROOT / "attn_audit" / "families.json"
DOC_PATH = ROOT / "docs" / "families.md"
README = ROOT / "README.md"
EXTRA_TYPES = ("t5", "mt5", "umt5", "bart", "mbart", "pegasus", "marian")


def registry_types() -> list[str]:
    """Causal-LM and masked-LM model types of the installed transformers, plus EXTRA_TYPES."""
    from transformers.models.auto import modeling_auto as ma

    types = set(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    types |= {t for t in EXTRA_TYPES if t in ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES}
    return sorted(types)


def _worker(model_type: str, queue: mp.Queue) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    from attn_audit.capture.families import check_type

    queue.put(check_type(model_type).to_dict())


def run_one(model_type: str, timeout: float) -> dict:
    """check_type in a fresh process (forked after the imports: cheap), killed after ``timeout`` s."""
    queue: mp.Queue = mp.get_context("fork").Queue()
    proc = mp.get_context("fork").Process(target=_worker, args=(model_type, queue))
    t0 = time.perf_counter()
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"status": "cannot build", "reason": f"timed out after {timeout:.0f} s", "sites": 0,
                "max_diff": None, "features": []}
    try:
        res = queue.get(timeout=5)
    except Exception:  # noqa: BLE001 - the worker died (segfault, out of memory)
        res = {"status": "cannot build", "reason": f"worker exited with code {proc.exitcode}", "sites": 0,
               "max_diff": None, "features": []}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def write_readme_block(table: dict) -> None:
    """Replace the README's families block with the summary and the table's link."""
    text = README.read_text()
    start, end = "<!-- families:start -->", "<!-- families:end -->"
    if start not in text or end not in text:
        return
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    block = render_readme(table)
    README.write_text(head + start + "\n" + block + end + tail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="*", help="only these model types (default: the whole registry)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per type")
    ap.add_argument("--jobs", type=int, default=1, help="types checked at once")
    ap.add_argument("--no-write", action="store_true", help="print only; write no files")
    ap.add_argument("--render-only", action="store_true", help="regenerate docs and README from the JSON")
    args = ap.parse_args(argv)
    if args.render_only:
        table = json.loads(JSON_PATH.read_text())
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import torch
        import transformers  # imported once here; the forked workers inherit it

        from attn_audit.capture.families import check_type

        torch.set_num_threads(1)  # no OpenMP pool in the parent: forked workers must not inherit one
        check_type("bert")  # warm transformers' lazy imports once; every forked worker inherits them

        types = args.types or registry_types()
        results = {}
        t0 = time.perf_counter()
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each job forks its own worker process
            for i, (t, r) in enumerate(zip(types, pool.map(lambda t: run_one(t, args.timeout), types))):
                results[t] = r
                print(f"[{i + 1}/{len(types)}] {t:28s} {r['status']:12s} {r.get('seconds', '')}s "
                      f"{r['reason'][:110]}", flush=True)
        results = dict(sorted(results.items()))
        table = {"transformers": transformers.__version__, "tolerance": 1e-5,
                 "elapsed_s": round(time.perf_counter() - t0, 1), "types": results}
        if args.types and JSON_PATH.is_file() and not args.no_write:  # a partial run updates the table
            old = json.loads(JSON_PATH.read_text())
            old["types"].update(results)
            table = {**old, "types": dict(sorted(old["types"].items()))}
    print(summary_line(table))
    if args.no_write:
        return 0
    JSON_PATH.write_text(json.dumps(table, indent=1, sort_keys=False) + "\n")
    DOC_PATH.parent.mkdir(exist_ok=True)
    DOC_PATH.write_text("# Model families\n\n" + render_markdown(table, heading_level=2))
    write_readme_block(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
