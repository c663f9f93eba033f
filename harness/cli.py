"""Command line: ``python -m harness {run,report,inspect,estimate} ...``.

Exit status: 0 everything measured; 1 some quants failed (their error records say why) or a run could not
start; 2 a mistake in the config or the command line; 130 interrupted (the results folder can be resumed).
User mistakes are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from harness.config import ConfigError

log = logging.getLogger("harness")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Subcommands other than `run`, each a module with add_parser(subparsers) and main(args) -> int.
COMMANDS = {
    # name: module
    "inspect": "harness.gguf.inspect",
    "report": "harness.report",
    "estimate": "harness.estimate",
    "import": "harness.importer",
    "db": "harness.query",
    "compare": "harness.compare",
    "simulate": "harness.simulate",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2, as for config errors
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="measure every quant of a config", description=(
        "Get each quant's GGUF file (build, download or find it), measure tokens/s and memory with llama.cpp "
        "in a child process per file, and write results/<run-id>/records.jsonl."))
    p.add_argument("config", type=Path, nargs="?", help="YAML config, e.g. configs/1b-synthetic.yaml (or --model)")
    p.add_argument("--model", "-m", action="append", type=Path, metavar="FILE.gguf",
                   help="measure this GGUF file (repeat for more), of any quant and architecture llama.cpp loads; "
                        "labelled by the quant its header names. Without a config: llama-bench's defaults "
                        "(pp512, tg128, 5 repetitions)")
    p.add_argument("--out", type=Path, help="results folder to create (default: results/<utc>-<name>)")
    p.add_argument("--resume", type=Path, metavar="RESULTS_DIR",
                   help="finish an interrupted run: measure only the cells missing from its records")
    p.add_argument("--quants", help="comma-separated subset or list of quants, overriding the config")
    p.add_argument("--repetitions", type=int, help="override bench.repetitions")
    p.add_argument("--rounds", type=int, help="override bench.rounds (passes of the sweep sharing the repetitions)")
    p.add_argument("--threads", type=int, help="override bench.threads")
    p.add_argument("--n-gpu-layers", type=int, dest="n_gpu_layers", help="override bench.n_gpu_layers")
    p.add_argument("--rpc", metavar="HOST:PORT[,...]|local",
                   help="override bench.rpc: offload to llama.cpp RPC servers (as llama-bench's --rpc), or 'local' "
                        "for one the harness starts on loopback (the offload path without a GPU; not a GPU's speed)")
    p.add_argument("--timeout", type=float, dest="timeout_s", help="override bench.timeout_s (per model file)")
    p.add_argument("--contexts", help="override bench.contexts (the memory test), e.g. 2048,8192,32768")
    p.add_argument("--cache-type-k", dest="cache_type_k", help="override bench.cache_type_k, e.g. f16,q8_0,q4_0")
    p.add_argument("--cache-type-v", dest="cache_type_v", help="override bench.cache_type_v")
    p.add_argument("--cache-dir", help="where synthetic models are built (default: $HARNESS_CACHE or "
                                       "~/.cache/harness)")
    p.add_argument("--cluster", metavar="ADDRESS", help="run the sweep on a Ray cluster (auto, ray://host:port or "
                   "host:port): every quant on a node of each of the config's cluster.devices (or every node); "
                   "needs " + "pip install -e '.[cluster]'")
    p.add_argument("--quality", action="store_true", help="also the quality test (quality.enabled): every quant's KL "
                   "divergence and perplexity against the reference, llama-perplexity's protocol (real weights only)")
    p.add_argument("--text", help="quality.text: the text to score on (e.g. wikitext-2's wiki.test.raw)")
    p.add_argument("--quality-chunks", type=int, dest="quality_chunks", help="quality.chunks: at most this many")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")


def _run(args) -> int:
    from harness import config, schema
    from harness.analysis import summary
    from harness.measure import runner
    from harness.report import cluster_groups, of_group

    overrides = {}
    if args.quants:
        overrides["quants"] = args.quants
    for key in ("repetitions", "rounds", "threads", "n_gpu_layers", "timeout_s", "rpc"):
        if getattr(args, key) is not None:
            overrides[f"bench.{key}"] = getattr(args, key)
    if args.contexts is not None:
        try:
            overrides["bench.contexts"] = [int(x) for x in args.contexts.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--contexts must be comma-separated token counts, got {args.contexts!r}") from None
    for key in ("cache_type_k", "cache_type_v"):
        if getattr(args, key) is not None:
            overrides[f"bench.{key}"] = getattr(args, key)
    if args.cache_dir:
        overrides["cache_dir"] = args.cache_dir
    if args.quality or args.text or args.quality_chunks:
        overrides["quality.enabled"] = True
    if args.text:
        overrides["quality.text"] = args.text
    if args.quality_chunks:
        overrides["quality.chunks"] = args.quality_chunks
    if args.out and args.resume:
        raise ConfigError("--out and --resume exclude each other: --resume continues the folder it names")
    if args.model:
        overrides["model"] = {"source": "local", "files": _label_files(args.model)}
    if args.config is None:
        if not args.model:
            raise ConfigError("run needs a config (e.g. configs/1b-synthetic.yaml) or --model FILE.gguf")
        cfg = config.from_dict({"name": "models", "bench": {"rounds": None}}, overrides)
    else:
        cfg = config.load(args.config, overrides)
    if args.cluster:
        from harness.measure import cluster

        run_dir, errors = cluster.run(cfg, args.cluster, out=args.out, resume=args.resume)
    else:
        run_dir, errors = runner.run(cfg, out=args.out, resume=args.resume, progress=not args.no_progress)
    records = schema.read_records(run_dir / "records.jsonl")
    frame = summary.records_frame(records)
    groups = cluster_groups(frame)
    for g in groups or [None]:
        part = frame if g is None else of_group(frame, g)
        if g is not None:
            print(f"device group {g}:")
        print(summary.text_table(summary.per_quant(part)))
    mem_path = run_dir / "contexts.jsonl"
    if mem_path.is_file():
        print(summary.context_table(summary.records_frame(schema.read_records(mem_path))))
    probe_path = run_dir / "probes.jsonl"
    if probe_path.is_file():
        try:
            print(summary.probe_line(summary.records_frame(schema.read_records(probe_path))))
        except schema.SchemaError as e:
            print(f"kernel probes: cannot read {probe_path}: {e}", file=sys.stderr)
    for quant, err in errors.items():
        print(f"{quant}: {err}")
    if not args.no_report and "report" in COMMANDS:
        report = importlib.import_module(COMMANDS["report"])
        try:
            out = report.write_report(run_dir)
            print(f"report: {out}")
        except Exception as e:  # noqa: BLE001 - a report failure must not hide the measurements
            log.exception("report failed")
            print(f"report failed: {e} (the records are intact; retry with python -m harness report {run_dir})",
                  file=sys.stderr)
    print(run_dir)
    return EXIT_FAILED if errors else EXIT_OK


def _label_files(paths: list[Path]) -> dict[str, str]:
    """{label: path} for --model files: the quant each header names (inspect's reasoning), made unique."""
    from harness.config import label_files
    from harness.gguf import inspect

    def say(p):
        label, how = inspect.label_for(p)
        print(f"{p}: {label} (from {how})", file=sys.stderr)
        return label, how

    return label_files(paths, say)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m harness", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run(sub)
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from harness.measure.runner import RunError
    from harness.sources.base import SourceError

    try:
        if args.command == "run":
            return _run(args)
        return importlib.import_module(COMMANDS[args.command]).main(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (RunError, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        hint = ""
        if args.command == "run":
            cluster = f" --cluster {args.cluster}" if getattr(args, "cluster", None) else ""
            what = (str(args.config) if args.config is not None else
                    " ".join(f"--model {m}" for m in (args.model or [])))
            hint = (f"; resume with: python -m harness run {what}{cluster} --resume RESULTS_DIR "
                    "(the results folder printed at the start)")
        print(f"\ninterrupted: every finished measurement is on disk{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
