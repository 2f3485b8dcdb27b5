"""``attn-audit``: a thin command line over :mod:`attn_audit.api`.

Order of work: parse, build and validate the configuration, the checks, the exporters and the
output directory, *then* load the model. A typo fails in milliseconds. torch is imported only
when a model is audited (``--load`` never imports it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# numpy's BLAS threads fight torch's for the same cores; the small matrices of the statistics
# run faster single-threaded (eigh of 64x64: 11 ms -> <1 ms under load).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# torch's OpenMP workers busy-wait ~ms after each op by default; the row kernel's threads run
# right after the score matmuls and would share the cores with them (audit 41 s -> 34 s at
# 8 x 1024, forward unchanged). Read by libgomp when torch loads, so it is set here.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

from attn_audit.config import MAX_COUNT, MAX_LENGTH, check_int
from attn_audit.errors import AttnAuditError, ConfigError, ExitCode, one_line

EXIT_CODES = """exit codes:
  0  the audit ran and every check passed
  1  the audit ran and a --fail-if / --policy check failed
  2  usage or configuration error (bad option, expression, policy, --load file)
  3  could not run (model, data, capture, checkpoint, output directory or files)
  4  nothing was measured (no rows); never counts as a pass
  5  internal error (a bug): one line here, the traceback with --debug
  130 interrupted
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
    s.add_argument("--block-size", type=int, default=64, help="kernel tile size for the pattern coverage (default 64)")
    s.add_argument("--patterns", default="all", help="kernel patterns measured per head: all, none or a comma list of "
                   "row-topk,block-oracle,block-topk,streaming,vertical-slash (default all)")
    s.add_argument("--reservoir-size", type=int, default=2048, help="Q/K tokens sampled per layer for Gaussianity (default 2048)")
    pl = p.add_argument_group("plan, verification, exports and gate")
    pl.add_argument("--target-len", type=int, help="deployment context length for FLOPs savings (default: the longest --seq-len)")
    pl.add_argument("--verify", action="store_true", help="simulate the plan inside the model on held-out sequences")
    pl.add_argument("--max-ppl-increase", type=float, default=0.01, help="quality budget for growing the plan (default 0.01 = 1%%)")
    pl.add_argument("--max-retrieval-drop", type=float, default=0.0,
                    help="passkeys the largest plan may lose, as a share of those the dense model finds (default 0)")
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
    o.add_argument("--force", action="store_true", help="overwrite files in --out that the run writes (audit, reports, exports) and start over from a checkpoint")
    o.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint in --out")
    o.add_argument("--checkpoint-every", type=int, default=16, metavar="N",
                   help="save a checkpoint every N sequences (default 16)")
    o.add_argument("--no-color", action="store_true", help="plain terminal output")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


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
    from attn_audit.config import (
        AuditConfig,
        MeasureSpec,
        parse_eps,
        parse_int_list,
        parse_patterns,
    )

    measure = MeasureSpec(
        eps=parse_eps(ns.eps),
        budgets=parse_int_list(ns.budgets, "--budgets"),
        sinks=ns.sinks,
        window=ns.window,
        min_keys=ns.min_keys,
        rows_per_sequence=None if ns.exact else ns.rows_per_sequence,
        block_size=ns.block_size,
        patterns=parse_patterns(ns.patterns),
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
        max_retrieval_drop=ns.max_retrieval_drop,
        verify_sequences=ns.verify_sequences,
        retrieval_samples=ns.retrieval_samples,
        retrieval_lens=parse_int_list(ns.retrieval_len, "--retrieval-len") if ns.retrieval_len else (),
        check_config=ns.check_config,
        measure_speed=ns.measure_speed,
    )


def planned_files(formats: Iterable[str], exports: Iterable[str]) -> list[str]:
    """The files (relative to ``--out``) a run with these formats and exports writes."""
    from attn_audit.export import EXPORTERS
    from attn_audit.report import file_name

    names = [file_name(f) for f in formats if f != "terminal"]
    for e in exports:
        names.extend(EXPORTERS[e].files)
    return names


def _list_models() -> str:
    from attn_audit.load import ALIASES, DEFAULT_MODEL

    lines = [f"{a.name:24s} {a.description}{'  (default)' if a.name == DEFAULT_MODEL else ''}" for a in ALIASES.values()]
    return "\n".join(lines) + "\n"


def _list_families() -> str:
    """The committed sweep table (no torch): each model_type's status, then the summary."""
    from attn_audit.report.families import render_text
    from attn_audit.load import families

    return render_text(families())


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (see ``EXIT_CODES``)."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    locks: list[Any] = []
    try:
        return _main(ns, locks)
    except AttnAuditError as exc:
        if ns.debug:
            raise
        return _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("attn-audit: interrupted\n")
        return int(ExitCode.INTERRUPTED)
    except MemoryError:
        if ns.debug:
            raise
        return _fail("out of memory; lower --num-sequences, --seq-len or --batch-size", ExitCode.CANNOT_RUN)
    except OSError as exc:  # a full disk, a vanished file, a permission changed mid-run
        if ns.debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        return _fail(f"{exc.strerror or exc}{where}", ExitCode.CANNOT_RUN)
    except Exception as exc:  # noqa: BLE001 - a bug: one line and its own code, never 1
        if ns.debug:
            raise
        return _fail(f"internal error ({type(exc).__name__}: {exc}); this is a bug in attn-audit, rerun "
                     "with --debug for the traceback", ExitCode.INTERNAL)
    finally:
        for lock in locks:
            lock.release()


def _fail(message: str, code: ExitCode) -> int:
    """Write ``message`` as one line (control characters escaped, at most 600 characters)."""
    sys.stderr.write(f"attn-audit: error: {one_line(message, 600)}\n")
    return int(code)


def _main(ns: argparse.Namespace, locks: list[Any]) -> int:
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
    from attn_audit.export import parse_export_names
    from attn_audit.outdir import OutLock, check_out_dir, default_out

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
    check_int("--checkpoint-every", ns.checkpoint_every, 1, MAX_COUNT)
    if ns.target_len is not None:
        check_int("--target-len", ns.target_len, 2, MAX_LENGTH)
    if ns.out is not None and not ns.out.strip():
        raise ConfigError("--out is empty; give a directory")
    if ns.load:
        from attn_audit.errors import ResultFileError
        from attn_audit.outdir import regular_file

        regular_file(ns.load, "--load file", ResultFileError)
    else:
        from attn_audit.data import check_local_file, is_local

        if is_local(ns.dataset):  # a missing or unreadable file is reported before the model loads
            check_local_file(ns.dataset)
    out = Path(ns.out) if ns.out else default_out(ns.model or Path(ns.load).resolve().parent.name or "audit")
    planned = planned_files(formats, exports)
    writes_files = bool(planned)
    if writes_files:
        check_out_dir(out, planned, force=ns.force, resume=ns.resume)
        if os.environ.get("RANK", "0") in ("0", ""):  # under torchrun only rank 0 writes, and locks
            locks.append(OutLock(out).acquire())
            check_out_dir(out, planned, force=ns.force, resume=ns.resume)  # again, now that --out is ours
    if ns.model and ns.model.endswith(".gguf") and Path(ns.model).expanduser().is_file():
        from attn_audit.load import check_gguf

        check_gguf(Path(ns.model).expanduser())  # from the header, before torch is imported
    # ---- run or load ----

    if ns.load:
        from attn_audit.api import load_audit

        try:
            result = load_audit(ns.load, target_len=ns.target_len or None)
            return _finish(ns, result, formats, checks, exports, out)
        except AttnAuditError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, ArithmeticError) as exc:
            # the schema checks every field the renderers read; this is the net under it
            from attn_audit.errors import ResultFileError

            raise ResultFileError(
                f"{ns.load} holds a value attn-audit cannot use ({type(exc).__name__}: {exc}); if the file is "
                "an unmodified audit.json this is a bug, rerun with --debug"
            ) from None
    result = _run(ns, config, out if writes_files else None)
    if result is None:  # a torchrun rank other than 0: rank 0 writes everything
        from attn_audit.capture.distributed import shutdown

        shutdown()
        return 0
    code = _finish(ns, result, formats, checks, exports, out)
    if writes_files:
        from attn_audit.capture.checkpoint import Checkpointer

        Checkpointer(out).clear()
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
    if exports and result.model.get("encoder_decoder"):  # known only once the model is loaded: the audit is kept
        from attn_audit.export.base import ENCODER_DECODER

        result.data["exports"] = {"skipped_reason": ENCODER_DECODER}
        sys.stderr.write(f"note: --export {','.join(exports)} not written: {ENCODER_DECODER}\n")
    elif exports:
        written.extend(write_exports(result, exports, out))
    # the reports first, audit.json last: its run block then holds the render time of the others
    t0 = time.perf_counter()
    texts = {fmt: get_renderer(fmt).render(result) for fmt in formats if fmt not in ("terminal", "json")}
    if not ns.load:
        from attn_audit.provenance import add_stage_time

        add_stage_time(result.run, "render", time.perf_counter() - t0)
    for fmt in formats:
        if fmt == "terminal":
            continue
        text = texts[fmt] if fmt in texts else get_renderer(fmt).render(result)
        written.append(atomic_write_text(out / file_name(fmt), text))
    if "terminal" in formats:
        sys.stdout.write(get_renderer("terminal").render(result, no_color=ns.no_color))
    for path in written:
        sys.stderr.write(f"wrote {path}\n")
    sys.stderr.write(one_line(verdict_line(result), 1000) + "\n")
    return int(outcome.exit_code)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
