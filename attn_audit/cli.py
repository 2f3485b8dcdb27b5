"""``attn-audit``: a thin command line over :mod:`attn_audit.api`.

Order of work: parse, build and validate the configuration, the checks, the exporters and the
output directory, *then* load the model. A typo fails in milliseconds. torch is imported only
when a model is audited (``--load`` never imports it).
"""

from __future__ import annotations

import argparse
import os
import sys

# numpy's BLAS threads fight torch's for the same cores; the small matrices of the statistics
# run faster single-threaded (eigh of 64x64: 11 ms -> <1 ms under load).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# torch's OpenMP workers busy-wait ~ms after each op by default; the row kernel's threads run
# right after the score matmuls and would share the cores with them (audit 41 s -> 34 s at
# 8 x 1024, forward unchanged). Read by libgomp when torch loads, so it is set here.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
from pathlib import Path
from typing import Any, NoReturn

from attn_audit.errors import AttnAuditError, ConfigError, ExitCode

EXIT_CODES = """exit codes:
  0  the audit ran and every check passed
  1  the audit ran and a --fail-if / --policy check failed
  2  usage or configuration error (bad option, expression, policy, audit.json)
  3  could not run (model, data, capture, output)
  4  nothing was measured (no rows); never counts as a pass
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        sys.stderr.write(f"attn-audit: error: {message} (see attn-audit --help)\n")
        raise SystemExit(int(ExitCode.USAGE))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the tests and the docs)."""
    p = _Parser(
        prog="attn-audit",
        description="Audit a transformer's attention: Gaussianity of Q/K, the norm bound R, exact "
        "(eps,k)-sparsity per head, and a ranked sparse-attention plan.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", help="bundled alias (see --list-models), hub id, local directory or .gguf file")
    g = p.add_argument_group("what to do instead of auditing")
    g.add_argument("--list-models", action="store_true", help="list the bundled model aliases and exit")
    g.add_argument("--list-families", action="store_true", help="list the supported architectures and exit")
    g.add_argument("--load", metavar="AUDIT_JSON", help="re-render, re-gate and re-export a saved audit (no model, no torch)")
    m = p.add_argument_group("model")
    m.add_argument("--revision", help="hub revision (branch, tag or commit)")
    m.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"])
    m.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    m.add_argument("--device-map", choices=["auto", "balanced", "sequential"],
                   help="spread the model over this machine's GPUs with accelerate (combinable with torchrun)")
    m.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code (off by default)")
    m.add_argument("--allow-pickle", action="store_true", help="allow pickle-based weight files (refused by default)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="bundled:fortunes", help="hub name[:config], or a .txt/.jsonl/.json/.csv/.parquet file (default: bundled fortunes)")
    d.add_argument("--split", default="train")
    d.add_argument("--text-column", default="text")
    d.add_argument("--seq-len", default="512", help="tokens per sequence; several lengths comma-separated (e.g. 256,512,1024)")
    d.add_argument("--num-sequences", type=int, default=16, help="sequences per length (default 16)")
    d.add_argument("--batch-size", type=int, default=4)
    d.add_argument("--seed", type=int, default=0)
    s = p.add_argument_group("measurement")
    s.add_argument("--eps", default="0.01,0.05,0.1", help="tail-mass levels (default 0.01,0.05,0.1)")
    s.add_argument("--min-keys", type=int, default=16, help="rows with fewer allowed keys are left out (default 16)")
    s.add_argument("--exact", action="store_true", help="measure every query row (default: a seeded sample of rows)")
    s.add_argument("--rows-per-sequence", type=int, default=256, help="query rows sampled per sequence without --exact (default 256)")
    s.add_argument("--budgets", default="16,64,256", help="top-k budgets for tail mass (default 16,64,256)")
    s.add_argument("--sinks", type=int, default=1, help="leading positions treated as attention sinks (default 1)")
    s.add_argument("--window", type=int, default=64, help="local window size in keys (default 64)")
    s.add_argument("--reservoir-size", type=int, default=2048, help="Q/K tokens sampled per layer for Gaussianity (default 2048)")
    pl = p.add_argument_group("plan, verification, exports and gate")
    pl.add_argument("--target-len", type=int, help="deployment context length for FLOPs savings (default: the longest --seq-len)")
    pl.add_argument("--verify", action="store_true", help="simulate the plan inside the model on held-out sequences")
    pl.add_argument("--max-ppl-increase", type=float, default=0.01, help="quality budget for growing the plan (default 0.01 = 1%%)")
    pl.add_argument("--verify-sequences", type=int, default=4, help="held-out sequences for --verify (default 4)")
    pl.add_argument("--retrieval-samples", type=int, default=4,
                    help="passkey prompts per length and depth for --verify's retrieval check (default 4; 0 = off)")
    pl.add_argument("--retrieval-len", default="",
                    help="lengths of the passkey prompts, comma-separated (default: the target length)")
    pl.add_argument("--measure-speed", action="store_true",
                    help="with --verify: time the plan's attention against the model's dense kernel per layer "
                    "at the target length (compiles FlexAttention; slow on CPU)")
    pl.add_argument("--check-config", metavar="FILE",
                    help="check a third-party pattern config against the model and data: MInference JSON, "
                    "DuoAttention full_attention_heads.tsv (config.json beside it) or flex_plan.json")
    pl.add_argument("--export", action="append", default=[], help="minference and/or duo (repeatable or comma-separated)")
    pl.add_argument("--fail-if", action="append", default=[], metavar="EXPR", help="fail (exit 1) if EXPR holds, e.g. 'planned_flops_saving < 0.3' (repeatable)")
    pl.add_argument("--policy", metavar="TOML", help="named checks from a TOML file ([[check]] name=..., fail_if=...)")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="output directory (default attn-audit-out/<model-slug>)")
    o.add_argument("--format", default="terminal,json,md,html", help="any of terminal,json,md,html (default all)")
    o.add_argument("--force", action="store_true", help="overwrite an existing audit in --out")
    o.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint in --out")
    o.add_argument("--checkpoint-every", type=int, default=16, metavar="N",
                   help="save a checkpoint every N sequences (default 16)")
    o.add_argument("--no-color", action="store_true", help="plain terminal output")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def slug(name: str) -> str:
    """A file-system-safe name for a model id or path."""
    import re

    base = Path(name).name if ("/" in name and Path(name).exists()) else name
    return re.sub(r"[^A-Za-z0-9._-]+", "__", base).strip("_") or "model"


def _formats(text: str) -> list[str]:
    from attn_audit.report import FORMATS

    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name = {"markdown": "md", "text": "terminal"}.get(item, item)
        if name not in FORMATS:
            raise ConfigError(f"--format {item!r} is not one of {', '.join(FORMATS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError("--format is empty; use e.g. terminal,json,md,html")
    return out


def _config(ns: argparse.Namespace) -> Any:
    from attn_audit.config import AuditConfig, MeasureSpec, parse_eps, parse_int_list

    measure = MeasureSpec(
        eps=parse_eps(ns.eps),
        budgets=parse_int_list(ns.budgets, "--budgets"),
        sinks=ns.sinks,
        window=ns.window,
        min_keys=ns.min_keys,
        rows_per_sequence=None if ns.exact else ns.rows_per_sequence,
    )
    return AuditConfig(
        seq_lens=parse_int_list(ns.seq_len, "--seq-len"),
        num_sequences=ns.num_sequences,
        batch_size=ns.batch_size,
        seed=ns.seed,
        measure=measure,
        reservoir_size=ns.reservoir_size,
        device=ns.device,
        target_len=ns.target_len,
        verify=ns.verify,
        max_ppl_increase=ns.max_ppl_increase,
        verify_sequences=ns.verify_sequences,
        retrieval_samples=ns.retrieval_samples,
        retrieval_lens=parse_int_list(ns.retrieval_len, "--retrieval-len") if ns.retrieval_len else (),
        check_config=ns.check_config,
        measure_speed=ns.measure_speed,
    )


def _list_models() -> str:
    from attn_audit.load import ALIASES, DEFAULT_MODEL

    lines = [f"{a.name:24s} {a.description}{'  (default)' if a.name == DEFAULT_MODEL else ''}" for a in ALIASES.values()]
    return "\n".join(lines) + "\n"


def _list_families() -> str:
    from attn_audit.load import SUPPORTED_FAMILIES

    return "\n".join(f"{k:10s} {v}" for k, v in sorted(SUPPORTED_FAMILIES.items())) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (see ``EXIT_CODES``)."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return _main(ns)
    except AttnAuditError as exc:
        if ns.debug:
            raise
        sys.stderr.write(f"attn-audit: error: {exc}\n")
        return int(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("attn-audit: interrupted\n")
        return int(ExitCode.INTERRUPTED)


def _main(ns: argparse.Namespace) -> int:
    if ns.list_models:
        sys.stdout.write(_list_models())
        return 0
    if ns.list_families:
        sys.stdout.write(_list_families())
        return 0
    if ns.load and ns.model:
        raise ConfigError("give either MODEL or --load AUDIT_JSON, not both")
    if not ns.load and not ns.model:
        raise ConfigError("no MODEL given; e.g. attn-audit smollm2-135m-instruct (see --list-models)")
    # ---- everything below is validated before any model is loaded ----
    from attn_audit import gate
    from attn_audit.config import check_out_dir
    from attn_audit.export import parse_export_names

    formats = _formats(ns.format)
    checks = [gate.parse(e) for e in ns.fail_if]
    if ns.policy:
        checks.extend(gate.load_policy(ns.policy))
    exports = parse_export_names(ns.export)
    config = None if ns.load else _config(ns)
    if ns.load and (ns.verify or ns.resume or ns.check_config):
        raise ConfigError("--verify, --check-config and --resume need the model; they cannot be combined with --load")
    if ns.check_config:
        from attn_audit.predeploy.configs import detect_format

        detect_format(ns.check_config)  # a missing or unknown file fails before the model loads
    if ns.resume and ns.force:
        raise ConfigError("--resume continues a run and --force starts over; pass only one")
    if ns.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every {ns.checkpoint_every} must be at least 1")
    out = Path(ns.out) if ns.out else Path("attn-audit-out") / slug(ns.model or Path(ns.load).parent.name or "audit")
    writes_files = any(f != "terminal" for f in formats) or bool(exports)
    if writes_files:
        check_out_dir(out, force=ns.force or bool(ns.load), resume=ns.resume)
    # ---- run or load ----

    if ns.load:
        from attn_audit.api import load_audit

        result = load_audit(ns.load, target_len=ns.target_len or None)
    else:
        result = _run(ns, config, out if writes_files else None)
        if result is None:  # a torchrun rank other than 0: rank 0 writes everything
            from attn_audit.capture.distributed import shutdown

            shutdown()
            return 0
    code = _finish(ns, result, formats, checks, exports, out)
    if not ns.load and writes_files:
        from attn_audit.capture.checkpoint import Checkpointer

        Checkpointer(out).clear()
    if not ns.load:
        from attn_audit.capture.distributed import shutdown

        shutdown()
    return code


def _run(ns: argparse.Namespace, config: Any, out: Path | None) -> Any:
    from attn_audit.api import run_audit
    from attn_audit.capture.checkpoint import Checkpointer
    from attn_audit.data import DataSpec
    from attn_audit.progress import RichProgress

    progress = RichProgress(enabled=not ns.quiet, no_color=ns.no_color)
    return run_audit(
        ns.model,
        DataSpec(spec=ns.dataset, split=ns.split, text_column=ns.text_column),
        config,
        revision=ns.revision,
        dtype=ns.dtype,
        trust_remote_code=ns.trust_remote_code,
        allow_pickle=ns.allow_pickle,
        device_map=ns.device_map,
        progress=progress,
        checkpoint=Checkpointer(out, ns.checkpoint_every, resume=ns.resume) if out is not None else None,
    )


def _finish(ns: argparse.Namespace, result: Any, formats: list[str], checks: list[Any], exports: list[str], out: Path) -> int:
    from attn_audit import gate
    from attn_audit.export import write_exports
    from attn_audit.report import file_name, get_renderer, verdict_line
    from attn_audit.result import atomic_write_text

    outcome = gate.decide(result, checks)
    result.data["gate"] = outcome.to_dict()
    written: list[Path] = []
    if exports:
        written.extend(write_exports(result, exports, out))
    for fmt in formats:
        if fmt == "terminal":
            continue
        text = get_renderer(fmt).render(result)
        written.append(atomic_write_text(out / file_name(fmt), text))
    if "terminal" in formats:
        sys.stdout.write(get_renderer("terminal").render(result, no_color=ns.no_color))
    for path in written:
        sys.stderr.write(f"wrote {path}\n")
    sys.stderr.write(verdict_line(result) + "\n")
    return int(outcome.exit_code)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
