"""``python -m harness import PATH...``: published llama-bench output -> records (:mod:`harness.sources.published`),
then the cross-device calibration on them (:mod:`harness.analysis.crossgpu`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from harness import schema
from harness.sources.published import ImportError_, import_file

# what a folder of published output holds: llama-bench's formats and llama.cpp load logs
SUFFIXES = (".txt", ".md", ".json", ".jsonl", ".csv", ".sql", ".log")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("import", help="published llama-bench output -> records (weights: published)",
                              description="Read llama-bench output as published (markdown tables, json, jsonl, csv, "
                                          "sql; a <name>.yaml beside each file gives url, date, runtime, build, "
                                          "device) and write one record per row into OUT/records.jsonl. A row's "
                                          "device is llama-bench's own cpu_info (CPU-only backends) or gpu_info "
                                          "(GPU backends) where the row has them, else the one given; a device the "
                                          "catalog does not know is imported under its name and left out of the "
                                          "cross-device fit.")
    p.add_argument("paths", nargs="+", type=Path,
                   help="files or folders (every *.txt, *.md, *.json, *.jsonl, *.csv, *.sql, and *.log: a llama.cpp "
                        "load log)")
    p.add_argument("--out", type=Path, default=Path("results") / "published",
                   help="results folder to write (default results/published; replaced if it holds only an import)")
    for flag in ("url", "date", "build", "backend"):
        p.add_argument(f"--{flag}", help=f"the source's {flag} (over the yaml beside the file)")
    p.add_argument("--runtime", help="the runtime that printed the output: llama.cpp, ik_llama.cpp, ... (over the "
                                     "yaml; llama-bench's csv/json/jsonl/sql default to llama.cpp, a markdown table "
                                     "to unknown)")
    p.add_argument("--device", help="the device the rows ran on, for rows that name none (llama-bench's csv, json, "
                                    "jsonl and sql name it in cpu_info / gpu_info and keep theirs; its markdown "
                                    "table does not). 'cpu': this machine's CPU, named as the harness's own runs "
                                    "name it (env.json's cpu.model)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not list the skipped rows")


def main(args) -> int:
    from harness.config import ConfigError

    files: list[Path] = []
    for p in args.paths:
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"{p}: no such file or folder")
    meta = {k: getattr(args, k) for k in ("url", "device", "date", "build", "backend", "runtime")}
    out = args.out
    if out.exists() and any(x.name not in ("records.jsonl", "import.log") for x in out.iterdir()):
        raise ConfigError(f"--out {out} holds more than an import: choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    all_recs, log_lines = import_files(files, out.name, meta)
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


def import_files(files: list[Path], run_id: str, meta: dict) -> tuple[list[schema.Record], list[str]]:
    """The records of published output files, and the import's log: a line per file (a source that cannot be
    read at all says why), then a line per skipped row with its reason, and one line naming the devices the
    catalog does not know, where any record is on one."""
    recs: list[schema.Record] = []
    lines: list[str] = []
    for f in files:
        try:
            got, skipped, src = import_file(f, run_id, meta)
        except (ImportError_, ValueError, OSError) as e:
            lines.append(f"{f}: not imported: {e}")
            continue
        recs += got
        lines.append(f"{f}: {len(got)} records, {len(skipped)} rows skipped ({src.url})")
        lines += [f"  skipped: {s.why}: {s.line.strip()[:140]}" for s in skipped]
    unknown = [r for r in recs if r.extra.get("catalogued") is False]
    if unknown:
        names = sorted({str(r.gpu_name) for r in unknown})
        lines.append(f"{len(unknown)} records are on devices the catalog does not know ({', '.join(names)}): "
                     "imported, without a spec bandwidth, so they stay out of the cross-device fit")
    return recs, lines


def read_folder(folder: Path) -> tuple[list[schema.Record], list[str]]:
    """Every source in a folder of published output (data/published/): its records and the import's log."""
    return import_files(sorted(x for x in folder.iterdir() if x.suffix in SUFFIXES), "published", {})


def quality_rows(folder: Path) -> list[dict]:
    """Published quality figures of Llama 3.2 1B quants (sources with `format: quality` and their `rows:`), each
    with its source's url, as printed: never measured here (shape-faithful weights carry no quality)."""
    import yaml

    out = []
    for f in sorted(folder.glob("*.yaml")):
        meta = yaml.safe_load(f.read_text()) or {}
        if not isinstance(meta, dict) or meta.get("format") != "quality":  # gpu-bandwidth.yaml is a list
            continue
        for r in meta.get("rows") or []:
            date = meta.get("date")
            out.append({**r, "url": meta.get("url"), "date": str(date) if date else None, "quote": meta.get("quote")})
    return out


def cpu_transfer(calibrations: list[Path]) -> dict:
    """How far one CPU's calibration carries to another CPU: each measured run's calibration (its report folder,
    with summary.csv beside it) predicts every other CPU's measured tg per quant, scaled by the bandwidth ratio as
    `estimate` would; |predicted / measured - 1| per quant, per ordered pair of different CPUs, and over all."""
    import csv

    from harness.analysis import calibration, predict
    from harness.analysis.fit import error_stats

    runs = []
    for p in calibrations:
        cal = calibration.load(p)
        with open(p.parent / "summary.csv") as f:
            tg = {r["quant"]: float(r["tg_tok_s"]) for r in csv.DictReader(f)
                  if r["tg_tok_s"] and int(float(r["n_depth"] or 0)) == 0}
        runs.append((p.parent.name, cal, tg))
    pairs, every = [], []
    for name_a, cal_a, _ in runs:
        for name_b, cal_b, tg_b in runs:
            if cal_a["device"]["name"] == cal_b["device"]["name"]:
                continue
            apes = []
            for q, measured in tg_b.items():
                try:
                    rate, _, _ = predict.predict_tg_tok_s(cal_a, q, 0, cal_b["device"]["bandwidth_gb_s"])
                except calibration.CalibrationError:
                    continue
                apes.append(abs(rate / measured - 1))
            if apes:
                every += apes
                pairs.append({"from": f"{cal_a['device']['name']} ({name_a})",
                              "to": f"{cal_b['device']['name']} ({name_b})", "n": len(apes),
                              **error_stats(np.array(apes))})
    return {"what": "a CPU calibration carried to another CPU by the bandwidth ratio: |predicted / measured - 1| "
                    "of tg per quant", "pairs": pairs,
            "all": error_stats(np.array(every)) if every else None, "n": len(every)}


def build_shipped(folder: Path, sizes_calibration: Path, cpu_calibrations: list[Path] | None = None) -> dict:
    """The cross-device calibration that ships with the package (`estimate` on a GPU uses it by default): the fit
    on every published tg row of `folder`, Llama 3.2 1B's model size per quant from a measured run's
    calibration.json (llama.cpp's own count on the shape-faithful files, whose tensor types are the Hub's), and
    the published rows on the page's GPUs (for the report's "page on GPUs")."""
    from harness.analysis import crossgpu, summary
    from harness.catalog import devices, page

    recs, _ = read_folder(folder)
    df = summary.records_frame(recs)
    cal = crossgpu.calibrate(df)
    sizes_doc = json.loads(sizes_calibration.read_text())
    cal["llama_3_2_1b"] = {
        "model_size_bytes": {q: i["model_size_bytes"] for q, i in sizes_doc["quants"].items()
                             if i.get("model_size_bytes")},
        "tensor_types": {q: i["tensor_types"] for q, i in sizes_doc["quants"].items() if i.get("tensor_types")},
        "source": f"llama_model_size of the shape-faithful files, run {sizes_calibration.parent.name}",
    }
    page_gpus = {devices.lookup(s.device).name for s in page.SPEEDS}
    rows = crossgpu.tg_rows(df)
    cal["page_gpu_rows"] = [
        {k: r[k] for k in ("device", "family", "model", "quant", "bytes", "tok_s", "size_b", "params", "url",
                           "runtime", "build", "over_spec")}
        for _, r in rows[rows.device.isin(page_gpus)].iterrows()]  # every runtime's: the table names each
    cal["quality"] = quality_rows(folder)
    cal["cpu_transfer"] = cpu_transfer(cpu_calibrations or [])
    cal["built_from"] = f"{folder.name}/ ({len(recs)} records)"
    return cal
