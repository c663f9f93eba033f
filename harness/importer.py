"""``python -m harness import PATH...``: published llama-bench output -> records (:mod:`harness.sources.published`),
then the cross-device calibration on them (:mod:`harness.analysis.crossgpu`)."""

from __future__ import annotations

import json
from pathlib import Path

from harness import schema
from harness.sources.published import ImportError_, import_file


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("import", help="published llama-bench output -> records (weights: published)",
                              description="Read llama-bench output as published (markdown tables, json, jsonl, csv; "
                                          "a <name>.yaml beside each file gives url, date, build, device) and write "
                                          "one record per row into OUT/records.jsonl.")
    p.add_argument("paths", nargs="+", type=Path, help="files or folders (every *.txt, *.md, *.json, *.jsonl, *.csv)")
    p.add_argument("--out", type=Path, default=Path("results") / "published",
                   help="results folder to write (default results/published; replaced if it holds only an import)")
    for flag in ("url", "device", "date", "build", "backend"):
        p.add_argument(f"--{flag}", help=f"the source's {flag}, where no yaml beside the file gives it")
    p.add_argument("-q", "--quiet", action="store_true", help="do not list the skipped rows")


def main(args) -> int:
    from harness.config import ConfigError

    files: list[Path] = []
    for p in args.paths:
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in (".txt", ".md", ".json", ".jsonl", ".csv"))
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"{p}: no such file or folder")
    meta = {k: getattr(args, k) for k in ("url", "device", "date", "build", "backend")}
    out = args.out
    if out.exists() and any(x.name not in ("records.jsonl", "import.log") for x in out.iterdir()):
        raise ConfigError(f"--out {out} holds more than an import: choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    all_recs: list[schema.Record] = []
    log_lines: list[str] = []
    for f in files:
        try:
            recs, skipped, src = import_file(f, out.name, meta)
        except (ImportError_, ValueError, OSError) as e:
            log_lines.append(f"{f}: not imported: {e}")
            continue
        all_recs += recs
        log_lines.append(f"{f}: {len(recs)} records, {len(skipped)} rows skipped ({src.url})")
        log_lines += [f"  skipped: {s.why}: {s.line.strip()[:140]}" for s in skipped]
    tmp = out / "records.jsonl.tmp"
    tmp.write_text("".join(r.to_json() + "\n" for r in all_recs))
    tmp.replace(out / "records.jsonl")
    (out / "import.log").write_text("\n".join(log_lines) + "\n")
    for line in log_lines:
        if not (args.quiet and line.startswith("  skipped")):
            print(line)
    gpus = sorted({r.gpu_name for r in all_recs})
    print(f"{len(all_recs)} records from {len(files)} files on {len(gpus)} devices -> {out / 'records.jsonl'}")
    if all_recs:
        from harness.analysis import crossgpu, summary

        cal = crossgpu.calibrate(summary.records_frame(all_recs))
        (out / "crossgpu.json").write_text(json.dumps(cal, indent=2, default=float) + "\n")
        print("\n".join(crossgpu.lines(cal)))
    return 0 if all_recs else 1
