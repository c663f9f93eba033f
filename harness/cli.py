"""Command line: ``python -m harness {run,report,inspect,estimate} ...``.

Exit status: 0 everything measured; 1 some quants failed (their error records say why) or a run could not
start; 2 a mistake in the config or the command line; 130 interrupted (the results folder can be resumed).
User mistakes are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import shlex
import sys
from pathlib import Path
from typing import Any

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
        "in a child process per file, and write results/<run-id>/records.jsonl. llama-bench's test flags (-p, -n, "
        "-d, -r, -fa, -ngl, -b, -ub, -ctk, -ctv, -t, with its comma lists and ranges) override the config."))
    p.add_argument("config", type=Path, nargs="?", help="YAML config, e.g. configs/1b-synthetic.yaml (or --model)")
    p.add_argument("--model", "-m", action="append", type=Path, metavar="FILE.gguf",
                   help="measure this GGUF file (repeat for more), of any quant and architecture llama.cpp loads; "
                        "labelled by the quant its header names. Without a config: llama-bench's defaults "
                        "(pp512, tg128, 5 repetitions)")
    p.add_argument("--out", type=Path, help="results folder to create (default: results/<utc>-<name>)")
    p.add_argument("--resume", type=Path, metavar="RESULTS_DIR",
                   help="finish an interrupted run: measure only the cells missing from its records")
    p.add_argument("--quants", help="comma-separated subset or list of quants, overriding the config")
    _add_llama_bench_flags(p)
    p.add_argument("--rounds", type=int, help="override bench.rounds (passes of the sweep sharing the repetitions)")
    p.add_argument("--rpc", metavar="HOST:PORT[,...]|local",
                   help="override bench.rpc: offload to llama.cpp RPC servers (as llama-bench's --rpc), or 'local' "
                        "for one the harness starts on loopback (the offload path without a GPU; not a GPU's speed)")
    p.add_argument("--timeout", type=float, dest="timeout_s", help="override bench.timeout_s (per model file)")
    p.add_argument("--contexts", help="override bench.contexts (the memory test), e.g. 2048,8192,32768")
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


def run_config(args):
    """The run's Config: the YAML (or, for --model alone, llama-bench's defaults) with the command line's
    overrides, which config.resolved.yaml then records."""
    from harness import config

    overrides: dict[str, Any] = {}
    if args.quants:
        overrides["quants"] = args.quants
    bench, memory_axes = bench_overrides(args)
    overrides.update(bench)
    for key in ("rounds", "timeout_s", "rpc"):
        if getattr(args, key) is not None:
            overrides[f"bench.{key}"] = getattr(args, key)
    if args.contexts is not None:
        try:
            overrides["bench.contexts"] = [int(x) for x in args.contexts.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--contexts must be comma-separated token counts, got {args.contexts!r}") from None
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
    if args.config is None and not args.model:
        raise ConfigError("run needs a config (e.g. configs/1b-synthetic.yaml) or --model FILE.gguf")
    if args.model:
        overrides["model"] = {"source": "local", "files": _label_files(args.model)}

    def make(ov: dict[str, Any]):
        if args.config is None:
            return config.from_dict({"name": "models", "bench": {"rounds": None}}, ov)
        return config.load(args.config, ov)

    if "bench.n_batch" in overrides and "bench.n_ubatch" not in overrides:
        # llama.cpp runs micro-batches of min(n_batch, n_ubatch) tokens, so llama-bench's `-b 128` alone works with
        # its default -ub 512; here the micro-batch is lowered to match, so the config and records say what ran
        base = make({k: v for k, v in overrides.items() if k != "bench.n_batch"}).bench.n_ubatch
        overrides["bench.n_ubatch"] = min(base, overrides["bench.n_batch"])
    cfg = make(overrides)
    if memory_axes and not cfg.bench.contexts:
        flag = memory_axes[0]
        raise ConfigError(f"{_name(flag)} {','.join(getattr(args, flag))}: pp and tg run with one value of it (the "
                          "first); a list is crossed only in the memory test: add --contexts N[,N...], or give one "
                          f"value per run and compare the runs ({COMPARE})")
    return cfg


def _run(args) -> int:
    from harness import schema
    from harness.analysis import summary
    from harness.measure import runner
    from harness.report import cluster_groups, of_group

    cfg = run_config(args)
    if args.cluster:
        from harness.measure import cluster

        run_dir, errors = cluster.run(cfg, args.cluster, out=args.out, resume=args.resume)
    else:
        run_dir, errors = runner.run(cfg, out=args.out, resume=args.resume, progress=not args.no_progress)
    records = schema.read_records(run_dir / "records.jsonl")
    frame = summary.records_frame(records)
    groups = cluster_groups(frame)
    batched_path = run_dir / "batched.jsonl"
    for g in groups or [None]:
        part = frame if g is None else of_group(frame, g)
        if g is not None:
            print(f"device group {g}:")
        if len(part) or not batched_path.is_file():  # a batched-only run has its own table below
            print(summary.text_table(summary.per_quant(part)))
    mem_path = run_dir / "contexts.jsonl"
    if mem_path.is_file():
        print(summary.context_table(summary.records_frame(schema.read_records(mem_path))))
    if batched_path.is_file():
        from harness.report import serving

        print(serving.text_table(summary.records_frame(schema.read_records(batched_path))))
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


# llama-bench's test parameters (tools/llama-bench/llama-bench.cpp), by argparse dest: (its flags, the BenchSpec field,
# what one value is). Each takes a comma list or a range (first-last, first-last+step, first-last*mult), and may be
# given again to add values, as llama-bench parses them; -r is one number.
FLAGS = {
    "n_prompt": (("-p", "--n-prompt"), "n_prompt", "prompt size"),
    "n_gen": (("-n", "--n-gen"), "n_gen", "generation length"),
    "n_depth": (("-d", "--n-depth"), "depths", "KV-cache depth"),
    "n_batch": (("-b", "--batch-size"), "n_batch", "batch size"),
    "n_ubatch": (("-ub", "--ubatch-size"), "n_ubatch", "micro-batch size"),
    "cache_type_k": (("-ctk", "--cache-type-k"), "cache_type_k", "K cache type"),
    "cache_type_v": (("-ctv", "--cache-type-v"), "cache_type_v", "V cache type"),
    "threads": (("-t", "--threads"), "threads", "thread count"),
    "n_gpu_layers": (("-ngl", "--n-gpu-layers"), "n_gpu_layers", "GPU layer count"),
    "flash_attn": (("-fa", "--flash-attn"), "flash_attn", "flash-attention setting"),
    "repetitions": (("-r", "--repetitions"), "repetitions", "repetition count"),
    # llama-batched-bench's (the batched test: bench.batched)
    "npp": (("-npp",), "batched.npp", "prompt size per user"),
    "ntg": (("-ntg",), "batched.ntg", "generation length per user"),
    "npl": (("-npl",), "batched.npl", "user count"),
}
FA_WORDS = {**dict.fromkeys(("on", "enabled", "true", "1"), "on"),  # llama.cpp's is_truthy / is_falsey / is_autoy
            **dict.fromkeys(("off", "disabled", "false", "0"), "off"), **dict.fromkeys(("auto", "-1"), "auto")}
COMPARE = "python -m harness compare RUN RUN"
_RANGE = re.compile(r"(-?\d+)(?:-(\d+)(?:([+*])(\d+))?)?(?:,|$)")  # llama-bench's parse_int_range, one item


def _add_llama_bench_flags(p: argparse.ArgumentParser) -> None:
    helps = {
        "n_prompt": "bench.n_prompt: tokens of the pp test (0 skips it); one value per run",
        "n_gen": "bench.n_gen: tokens of the tg test (0 skips it); one value per run",
        "n_depth": "bench.depths: KV-cache depths each test runs at, e.g. 0,4096 (crossed with pp and tg)",
        "n_batch": "bench.n_batch: logical batch size (the micro-batch follows it down where it is larger)",
        "n_ubatch": "bench.n_ubatch: physical batch size",
        "cache_type_k": "bench.cache_type_k: K cache type (f16, q8_0, q4_0, ...); pp and tg use the first; a list is "
                        "crossed in the memory test (--contexts)",
        "cache_type_v": "bench.cache_type_v: V cache type, as -ctk",
        "threads": "bench.threads: CPU threads; one value per run",
        "n_gpu_layers": "bench.n_gpu_layers: layers to offload (-1 all); one value per run",
        "flash_attn": "bench.flash_attn: on|off|auto (or 1|0|-1); a list is crossed in the memory test (--contexts), "
                      "pp and tg using the first",
        "repetitions": "bench.repetitions: timed repetitions of each test",
        "npp": "bench.batched.npp (llama-batched-bench's): prompt tokens per user, e.g. 128,512",
        "ntg": "bench.batched.ntg: tokens generated per user, e.g. 128",
        "npl": "bench.batched.npl: users decoding at once, e.g. 1,2,4,8,16,32 (the batched test: every npp x ntg x "
               "npl cell, into batched.jsonl)",
    }
    metavars = {"n_depth": "N[,N...]", "cache_type_k": "TYPE[,TYPE...]", "cache_type_v": "TYPE[,TYPE...]",
                "flash_attn": "on|off|auto"}
    for dest, (flags, _, _) in FLAGS.items():  # each given again adds values, as llama-bench's; -r: the last counts
        p.add_argument(*flags, dest=dest, action="store" if dest == "repetitions" else "append",
                       metavar=metavars.get(dest, "N[,N...]" if dest in ("npp", "ntg", "npl") else "N"),
                       help=helps[dest])
    p.add_argument("-pps", dest="pps", action="store_true", default=None,
                   help="bench.batched.pps: one prompt shared by every user (llama-batched-bench's -pps)")
    p.add_argument("-kvu", "--kv-unified", dest="kv_unified", action="store_true", default=None,
                   help="bench.batched.kv_unified: one KV buffer for all users (llama.cpp's -kvu)")


def _name(dest: str) -> str:
    return "/".join(FLAGS[dest][0])


def int_values(dest: str, given: list[str], allow_negative: bool = False) -> list[int]:
    """The integers of llama-bench's list syntax (its parse_int_range), every time the flag was given: "512",
    "128,256", "0-4096+1024" (0, 1024, ..., 4096), "64-512*2" (64, 128, 256, 512); only the first number may be
    negative, and only where `allow_negative` (-ngl). A ConfigError naming the flag for anything else."""
    out: list[int] = []
    for text in given:
        s, pos = re.sub(r"\s+", "", text), 0
        while pos < len(s):
            m = _RANGE.match(s, pos)
            if m is None or (m[1].startswith("-") and not allow_negative):
                break
            first, last, op, step = int(m[1]), int(m[2] or m[1]), m[3] or "+", int(m[4] or 1)
            i = first
            while i <= last:
                out.append(i)
                nxt = i + step if op == "+" else i * step
                if nxt <= i:
                    raise ConfigError(f"{_name(dest)} {text!r}: the range does not grow (step {op}{step} from {i})")
                i = nxt
            pos = m.end()
        if pos < len(s) or not s:
            raise ConfigError(f"{_name(dest)} {text!r}: not a {FLAGS[dest][2]} as llama-bench takes it "
                              "(a number, a comma list, or a range: 64-512*2, 0-4096+1024)")
    if not out:
        raise ConfigError(f"{_name(dest)} {','.join(given)!r}: the range holds no value")
    return out


def fa_values(given: list[str]) -> list[str]:
    """-fa's values as the config spells them (on, off, auto), from what llama-bench takes: on/off/auto, 1/0/-1,
    true/false, enabled/disabled."""
    out = []
    for v in (x.strip() for g in given for x in g.split(",")):
        if v.lower() not in FA_WORDS:
            raise ConfigError(f"{_name('flash_attn')} {v!r}: not one of on, off, auto (or 1, 0, -1 as older "
                              "llama-bench builds take them)")
        out.append(FA_WORDS[v.lower()])
    return out


def bench_overrides(args) -> tuple[dict[str, Any], list[str]]:
    """The bench.* overrides of llama-bench's flags, and the flags given a list that only the memory test crosses
    (pp and tg take the first value). A list for a setting of which the harness measures one value per run is
    refused: a test is keyed by quant, pp/tg and depth (resume, the tables, the calibration), not by the settings
    llama-bench crosses too."""
    out: dict[str, Any] = {}
    memory_axes: list[str] = []
    for dest in ("n_prompt", "n_gen", "n_batch", "n_ubatch", "threads", "n_gpu_layers"):
        given = getattr(args, dest)
        if not given:
            continue
        values = int_values(dest, given, allow_negative=dest == "n_gpu_layers")
        if len(values) > 1:
            raise ConfigError(f"{_name(dest)} {','.join(map(str, values))}: one {FLAGS[dest][2]} per run here (a test "
                              "is keyed by quant, pp/tg and depth); of llama-bench's lists the harness crosses -d, and "
                              f"-ctk/-ctv/-fa in the memory test (--contexts); run once per value and compare the runs "
                              f"({COMPARE})")
        out[f"bench.{FLAGS[dest][1]}"] = values[0]
    if args.n_depth:
        out["bench.depths"] = int_values("n_depth", args.n_depth)
    if args.repetitions is not None:
        try:
            out["bench.repetitions"] = int(args.repetitions)
        except ValueError:
            raise ConfigError(f"{_name('repetitions')} {args.repetitions!r}: not a whole number") from None
    for dest in ("cache_type_k", "cache_type_v"):
        if getattr(args, dest):
            values = [x.strip() for g in getattr(args, dest) for x in g.split(",") if x.strip()]
            out[f"bench.{dest}"] = values
            if len(values) > 1:
                memory_axes.append(dest)
    for dest in ("npp", "ntg", "npl"):
        if getattr(args, dest, None):
            out[f"bench.{FLAGS[dest][1]}"] = int_values(dest, getattr(args, dest))
    for dest in ("pps", "kv_unified"):
        if getattr(args, dest, None):
            out[f"bench.batched.{dest}"] = True
    if args.flash_attn:
        values = fa_values(args.flash_attn)
        out["bench.flash_attn"] = values[0]
        if len(values) > 1:
            out["bench.context_flash_attn"] = values
            memory_axes.append("flash_attn")
    return out, memory_axes


def resume_command(argv: list[str]) -> str:
    """The user's own command with --out / --resume dropped, to resume with: a resumed run must have the same
    settings (the folder's config.resolved.yaml is checked), so every flag the user gave is repeated."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--out", "--resume"):
            skip = True
        elif not a.startswith(("--out=", "--resume=")):
            out.append(a)
    return " ".join(["python -m harness", *map(shlex.quote, out), "--resume RESULTS_DIR"])


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
            hint = (f"; resume with: {resume_command(sys.argv[1:] if argv is None else argv)} "
                    "(the results folder printed at the start)")
        print(f"\ninterrupted: every finished measurement is on disk{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
