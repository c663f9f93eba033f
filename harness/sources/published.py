"""Published llama.cpp measurements as records: llama-bench output pasted in issues and pull requests (its
markdown tables, and its json / jsonl / csv / sql output), each row one record of the harness's schema with
`weights: "published"`, its source (URL), date, runtime, build and the quoted line.

A source is a pair of files (`data/published/<slug>.txt` with the output exactly as published, and
`<slug>.yaml` with `url`, `date`, `runtime`, `build`, `device`, `backend`, `format`, `quote`, `notes`, and
`columns` where one table's rate columns come from different runtimes or builds), or a single output file with
those given on the command line. Numbers are transcribed, never computed: the record keeps the t/s and its ± as
printed (`extra.ts_sd`), the size with its unit (`extra.size_as_printed`).

Rows are placed or skipped, never guessed: a model string must parse into architecture, size label and a known
quant ("llama 1B Q4_K - Medium" -> llama, 1B, Q4_K_M), the test into pp/tg sizes, the rate into a number, and
the row must name the device it ran on. Every skipped row comes back with its reason. Comparison tables
(`t/s (before)` / `t/s (after)`, `master` / `PR`) give one record per rate column, named in `extra.column`;
repeated rows (the same source, device, model, test, column and rate) are kept once.

The device a row ran on (the record's `gpu_name`; its `device` is the backend, "cpu" for a CPU row):

- the row's own columns first, as llama-bench writes them: with a CPU-only backend ("CPU", "BLAS", "CPU,BLAS")
  `cpu_info` (the CPU's name, e.g. "AMD EPYC"); with a GPU backend `gpu_info` (Metal: else `cpu_info`, the same
  Apple chip); with no backend named, whichever of the two is there. A markdown table carries these only as
  compare-llama-bench.py's "CPU" / "GPU" columns, llama-bench's own table not at all;
- else the device given (the yaml's `device`, or `--device`; `--device cpu` is this machine's CPU, named as
  the harness's own runs name it: :func:`harness.catalog.devices.cpu_model`). Where the row names a device and the
  given one is another, the row's is kept (it is llama-bench's own record of what ran) and the given name is
  noted in `extra.device_given`;
- a row that names no device and is given none is skipped ("device: none named").

A device the catalog (:func:`harness.catalog.devices.find`) knows is named as the catalog names it
(`extra.catalogued` true); any other is imported under its name as printed, `extra.catalogued` false: without a
spec bandwidth it stays out of the cross-device fit, and shows in `harness db` / `compare` like any other.

Runtime and build (`extra.runtime`, `extra.build`) are those of the record's own rate column: the source's
`columns:` entry for that column header ({runtime:, build:}) over the source's top-level `runtime` / `build`
(or `--runtime` / `--build`). llama-bench's csv / json / jsonl / sql rows carry their own build
(`build_commit`, `build_number`: "build: <commit> (<number>)", kept over a given build, which is then noted in
`extra.build_given`), and their runtime is "llama.cpp" unless one is given. A markdown table with no runtime
given has runtime None (unknown): never guessed from the numbers. "unknown" in a yaml is None too.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from pathlib import Path
from typing import Any, NamedTuple

from harness import schema
from harness.catalog import devices

WEIGHTS = "published"
MACHINE_FORMATS = ("json", "jsonl", "csv", "sql")  # llama-bench's own machine-readable output (-o)

# llama.cpp's file-type descriptions (llama_model_ftype_name) as llama-bench prints them -> recipe names
FTYPE_NAMES = {
    "Q4_K - Medium": "Q4_K_M", "Q4_K - Small": "Q4_K_S", "Q5_K - Medium": "Q5_K_M", "Q5_K - Small": "Q5_K_S",
    "Q3_K - Large": "Q3_K_L", "Q3_K - Medium": "Q3_K_M", "Q3_K - Small": "Q3_K_S", "Q2_K - Medium": "Q2_K",
    "Q2_K - Small": "Q2_K_S", "IQ3_S mix - 3.66 bpw": "IQ3_M", "IQ3_S - 3.4375 bpw": "IQ3_S",
    "IQ3_XXS - 3.0625 bpw": "IQ3_XXS", "IQ3_XS - 3.3 bpw": "IQ3_XS", "IQ4_XS - 4.25 bpw": "IQ4_XS",
    "IQ4_NL - 4.5 bpw": "IQ4_NL", "IQ2_M - 2.7 bpw": "IQ2_M", "IQ2_S - 2.5 bpw": "IQ2_S",
    "IQ2_XS - 2.3125 bpw": "IQ2_XS", "IQ2_XXS - 2.0625 bpw": "IQ2_XXS", "IQ1_S - 1.5625 bpw": "IQ1_S",
    "IQ1_M - 1.75 bpw": "IQ1_M",
}
PLAIN_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q8_0", "F16", "BF16", "F32", "MXFP4", "Q4_0_4_4",
               "Q4_0_4_8", "Q4_0_8_8")
BACKENDS = {"cuda": "cuda", "metal": "metal", "vulkan": "vulkan", "rocm": "rocm", "hip": "rocm", "sycl": "sycl",
            "blas": "cpu", "cpu": "cpu", "opencl": "opencl", "mtl": "metal", "blas,metal": "metal"}


class Source(NamedTuple):
    url: str  # where the output was published
    date: str | None  # when, as the source says
    build: str | None  # the build that ran it, as printed ("build: 086a63e3a (7340)")
    device: str | None  # the device given (yaml / --device; --device cpu: this machine's CPU's name)
    backend: str | None  # the backend given, where the table has no backend column
    fmt: str  # md, json, jsonl, csv, sql or log
    quote: str | None  # the source's words introducing the output
    path: str  # the file read
    runtime: str | None = None  # "llama.cpp", "ik_llama.cpp", ...; None or "unknown": not given
    columns: dict[str, dict[str, Any]] = {}  # rate column header -> {runtime:, build:} of that column, where a
    # source's columns come from different runtimes or builds (over the top-level runtime / build)
    device_from: str = "given"  # how `device` was given: "given" (yaml / --device), or "this machine's CPU"


class Skipped(NamedTuple):
    line: str
    why: str


class ImportError_(ValueError):  # noqa: N801 - not the builtin
    """A source that cannot be read at all (no table, unknown format): one line."""


def parse_model(text: str) -> tuple[str, str, str] | None:
    """("llama", "1B", "Q4_K_M") from "llama 1B Q4_K - Medium" (also "llama 7B mostly Q4_0", "LLaMA 7B Q4_0");
    None where the quant is not one llama.cpp names."""
    t = re.sub(r"\s+", " ", text.strip())
    m = re.match(r"^(?P<arch>[A-Za-z][\w.-]*)\s+(?P<size>(?:[\d.]+|\?)[BMK])\s+(?:mostly\s+)?(?P<q>.+?)(?:\s+MoE)?$", t)
    if not m:
        return None
    q = m["q"].strip()
    quant = FTYPE_NAMES.get(q) or (q.upper() if q.upper() in PLAIN_TYPES else None)
    if quant is None:
        return None
    return m["arch"].lower(), m["size"].upper(), quant


def parse_size(text: str) -> tuple[int, str] | None:
    """(bytes, unit as printed) from "636.18 MiB", "4.33 GiB", "1.10 GB"."""
    m = re.match(r"^\s*([\d.,]+)\s*(KiB|MiB|GiB|TiB|KB|MB|GB|TB)\s*$", text)
    if not m:
        return None
    mult = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
    return int(round(float(m[1].replace(",", "")) * mult[m[2]])), m[2]


def parse_params(text: str) -> int | None:
    """1_240_000_000 from "1.24 B" (the printed precision: the exact count is not published)."""
    m = re.match(r"^\s*([\d.]+)\s*([BMK])\s*$", text)
    if not m:
        return None
    return int(round(float(m[1]) * {"B": 1e9, "M": 1e6, "K": 1e3}[m[2]]))


def parse_test(text: str) -> tuple[str, int, int, int] | None:
    """(kind, n_prompt, n_gen, n_depth) from "pp512", "tg128", "pp 512", "tg128 @ d4096"; None for mixed
    tests ("pp4096+tg128") and anything else."""
    m = re.match(r"^\s*(pp|tg)\s*(\d+)\s*(?:@\s*d(\d+))?\s*$", text)
    if not m:
        return None
    n, d = int(m[2]), int(m[3] or 0)
    return (m[1], n, 0, d) if m[1] == "pp" else (m[1], 0, n, d)


def parse_rate(text: str) -> tuple[float, float | None] | None:
    """(t/s, its ± as printed or None) from "762.37 ± 4.41", "762.37 +- 4.41", "762.37"."""
    m = re.match(r"^\s*([\d.,]+)\s*(?:(?:±|\+-|\+/-)\s*([\d.,]+))?\s*$", text)
    if not m:
        return None
    v = float(m[1].replace(",", ""))
    return (v, float(m[2].replace(",", "")) if m[2] else None) if v > 0 else None


def md_rows(text: str) -> list[tuple[str, dict[str, str]]]:
    """The rows of the markdown tables in `text` as (the line, {column: cell}); the header is the line before a
    |---| separator. Lines that are not table rows (prose, a build line) are ignored."""
    lines = text.splitlines()
    out = []
    head: list[str] | None = None
    for i, line in enumerate(lines):
        s = line.strip()
        if not s.startswith("|"):
            head = None if not s else head
            continue
        cells = [c.strip() for c in s.strip("|").split("|")]
        if all(re.fullmatch(r":?-+:?", c) for c in cells if c) and any(cells):  # "|--:|-:|" (fa's is "-:")
            prev = lines[i - 1].strip() if i else ""
            head = [_column(c) for c in prev.strip("|").split("|")] if prev.startswith("|") else None
            continue
        if head is None or cells == head:
            continue
        if len(cells) != len(head):
            out.append((line, {"__error__": f"{len(cells)} cells under a header of {len(head)}"}))
            continue
        out.append((line, dict(zip(head, cells))))
    return out


# llama-bench's column names; compare-llama-bench.py prints them capitalised ("Model", "Test"), and its device
# column is "GPU" or "CPU" (the chip's name: llama-bench's gpu_info / cpu_info)
_COLUMNS = {"model", "size", "params", "backend", "ngl", "fa", "test", "gpu_info", "cpu_info", "threads",
            "n_batch", "n_ubatch", "type_k", "type_v"}
_DEVICE_COLUMNS = {"gpu": "gpu_info", "cpu": "cpu_info"}


def _column(name: str) -> str:
    n = name.strip()
    low = n.lower()
    return low if low in _COLUMNS else _DEVICE_COLUMNS.get(low, n)


def _int(text: str | None) -> int | None:
    return int(text) if text and text.strip().isdigit() else None


def _rate_columns(row: dict[str, str]) -> list[str]:
    return [c for c in row if c == "t/s" or c.startswith("t/s") or c.lower() in ("master", "pr", "avg_ts")]


def _backend(text: str) -> str | None:
    """llama-bench's backend column -> the backend that ran the model: "Metal,BLAS" -> metal, "CUDA" -> cuda
    (BLAS beside a GPU backend only serves the CPU's share)."""
    names = [BACKENDS.get(t.strip().lower()) for t in re.split(r"[,+ ]+", text or "") if t.strip()]
    gpu = [n for n in names if n and n != "cpu"]
    return gpu[0] if gpu else (names[0] if names and names[0] else None)


def _row_device(row: dict[str, str], backend: str | None) -> tuple[str | None, str | None]:
    """(the device the row itself names, the column it is in): with a CPU-only backend its cpu_info, with a GPU
    backend its gpu_info (Metal: else cpu_info, the same chip), with no backend named either; (None, None)
    where the row names none."""
    cpu, gpu = (row.get("cpu_info") or "").strip(), (row.get("gpu_info") or "").strip()
    if backend == "cpu":
        order = [("cpu_info", cpu)]
    elif backend == "metal" or backend is None:
        order = [("gpu_info", gpu), ("cpu_info", cpu)]
    else:
        order = [("gpu_info", gpu)]
    return next(((v, k) for k, v in order if v), (None, None))


def _same_device(a: str, b: str) -> bool:
    da, db = devices.find(a), devices.find(b)
    return (da is not None and da == db) or " ".join(a.lower().split()) == " ".join(b.lower().split())


class _Device(NamedTuple):
    name: str  # the catalog's name, or the name as printed where the catalog does not know it
    as_printed: str  # the name the row (or the given device) says
    catalogued: bool
    came_from: str  # "cpu_info", "gpu_info", or the Source's device_from
    given: str | None  # the given device where the row names another one (noted, not used)


def _device(row: dict[str, str], backend: str | None, src: Source) -> _Device | None:
    """The device a row ran on (the module's docstring says the order); None where nothing names one."""
    name, came_from = _row_device(row, backend)
    given = (src.device or "").strip() or None
    if name is None:
        if given is None:
            return None
        name, came_from = given, src.device_from
    other = given if given is not None and came_from in ("cpu_info", "gpu_info") and not _same_device(name, given) \
        else None
    d = devices.find(name)
    return _Device(d.name if d else name, name, d is not None, came_from, other)


_NO_DEVICE = ("device: none named (no cpu_info / gpu_info, or CPU / GPU column, in the row): give device: in the "
              "yaml or --device (--device cpu: this machine's CPU)")


def _unknown(text: Any) -> str | None:
    t = str(text).strip() if text is not None else ""
    return None if not t or t.lower() == "unknown" else t


def _runtime_build(src: Source, col: str | None, row: dict[str, str]) -> dict[str, Any]:
    """extra's runtime and build of a record from rate column `col` (its `columns:` entry over the source's
    top level; llama-bench's own build fields over both), and the given build where the row's differs."""
    spec = src.columns.get(col, {}) if col is not None else {}
    runtime = spec["runtime"] if "runtime" in spec else src.runtime
    build = spec["build"] if "build" in spec else src.build
    out: dict[str, Any] = {}
    commit = (row.get("build_commit") or "").strip()
    if commit:  # llama-bench's own record of the build that ran it, as it prints it under its table
        number = (row.get("build_number") or "").strip()
        own = f"build: {commit} ({number})" if number else f"build: {commit}"
        if build and commit not in str(build):
            out["build_given"] = build
        build = own
    if runtime is None and src.fmt in MACHINE_FORMATS:
        runtime = "llama.cpp"  # llama-bench's own output: llama.cpp's tool unless the source says another
    return {"runtime": _unknown(runtime), "build": build, **out}


def rows_to_records(rows: list[tuple[str, dict[str, str]]], src: Source, run_id: str
                    ) -> tuple[list[schema.Record], list[Skipped]]:
    recs: list[schema.Record] = []
    skipped: list[Skipped] = []
    seen: set[tuple] = set()
    for line, row in rows:
        if "__error__" in row:
            skipped.append(Skipped(line, row["__error__"]))
            continue
        model = parse_model(row.get("model", ""))
        if model is None:
            skipped.append(Skipped(line, f"model {row.get('model', '')!r}: not 'arch size quant' with a quant "
                                         "llama.cpp names"))
            continue
        test = parse_test(row.get("test", ""))
        if test is None:
            skipped.append(Skipped(line, f"test {row.get('test', '')!r}: not a pp or tg test of one size"))
            continue
        backend_text = (row.get("backend") or src.backend or "").strip()
        backend = _backend(backend_text)
        dev = _device(row, backend, src)
        if dev is None:
            skipped.append(Skipped(line, _NO_DEVICE))
            continue
        size = parse_size(row.get("size", ""))
        if _int(row.get("model_size")):  # llama-bench's csv / json / sql: the exact count, not the rounded print
            size = (int(row["model_size"]), size[1] if size else "")
        params = _int(row.get("model_n_params")) or parse_params(row.get("params", ""))
        ngl = row.get("ngl")
        cols = _rate_columns(row)
        if not cols:
            skipped.append(Skipped(line, "no t/s column"))
            continue
        for col in cols:
            rate = parse_rate(row[col])
            if rate is None:
                skipped.append(Skipped(line, f"{col} {row[col]!r}: not a rate"))
                continue
            key = (src.url, dev.name, row.get("model"), row.get("test"), backend_text, col, rate)
            if key in seen:
                skipped.append(Skipped(line, "duplicate of a row already imported"))
                continue
            seen.add(key)
            kind, n_prompt, n_gen, depth = test
            recs.append(schema.make(
                run_id=run_id, utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), status="ok",
                quant=model[2], weights=WEIGHTS, weights_ref=src.url, model_desc=row.get("model"),
                model_size_bytes=size[0] if size else None, model_n_params=params,
                test=kind, n_prompt=n_prompt, n_gen=n_gen, n_depth=depth, rep=0, tokens_per_s=rate[0],
                n_gpu_layers=int(ngl) if ngl and ngl.lstrip("-").isdigit() else None, device=backend,
                gpu_name=dev.name, n_threads=_int(row.get("threads")), n_batch=_int(row.get("n_batch")),
                n_ubatch=_int(row.get("n_ubatch")), cache_type_k=row.get("type_k") or None,
                cache_type_v=row.get("type_v") or None,
                flash_attn={"1": "on", "0": "off"}.get((row.get("fa") or "").strip()),
                extra={"source": src.url, "date": src.date, **_runtime_build(src, col, row), "quote": src.quote,
                       "line": line.strip(), "file": src.path, "column": col, "ts_sd": rate[1],
                       "size_as_printed": row.get("size"), "params_as_printed": row.get("params"),
                       "backend_as_printed": backend_text or None, "architecture": model[0],
                       "size_label": model[1], **_device_extra(dev)},
            ))
    return recs, skipped


def _device_extra(dev: _Device) -> dict[str, Any]:
    out = {"device_as_printed": dev.as_printed, "device_from": dev.came_from, "catalogued": dev.catalogued}
    return {**out, "device_given": dev.given} if dev.given else out


def sql_items(text: str) -> list[dict[str, Any]]:
    """llama-bench's `-o sql` output (CREATE TABLE, then one INSERT per test), executed by SQLite in memory:
    its rows as dicts. Only CREATE TABLE and INSERT statements are accepted."""
    import sqlite3

    statements = [x.strip() for x in text.split(";\n") if x.strip()]
    bad = [x.split()[0] for x in statements if not re.match(r"(?is)^(CREATE\s+TABLE|INSERT\s+INTO)\b", x)]
    if bad:
        raise ImportError_(f"not llama-bench's sql output: a {bad[0]!r} statement")
    con = sqlite3.connect(":memory:")
    try:
        for x in statements:
            con.execute(x.rstrip(";"))
        out = []
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            cur = con.execute(f'SELECT * FROM "{table}"')
            cols = [c[0] for c in cur.description]
            out += [dict(zip(cols, row)) for row in cur.fetchall()]
        return out
    except sqlite3.Error as e:
        raise ImportError_(f"not llama-bench's sql output: {e}") from None
    finally:
        con.close()


def _mib_gib(n: int) -> str:
    """A size as llama-bench's markdown table prints it: "2.65 MiB" below a GiB, "4.33 GiB" from one."""
    return f"{n / 2**20:.2f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _m_b(n: int) -> str:
    """A parameter count as llama-bench's markdown table prints it: "4.59 M" below a billion, "1.24 B" from one."""
    return f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.2f} B"


def json_rows(text: str, fmt: str) -> list[tuple[str, dict[str, str]]]:
    """llama-bench's json / jsonl / csv / sql output as md_rows-like (line, {column: cell}) pairs, with its
    fields mapped to the markdown table's columns (model_type -> model, avg_ts ± stddev_ts -> t/s, ...)."""
    if fmt == "json":
        items = json.loads(text)
    elif fmt == "jsonl":
        items = [json.loads(x) for x in text.splitlines() if x.strip()]
    elif fmt == "sql":
        items = sql_items(text)
    else:
        items = list(csv.DictReader(io.StringIO(text)))
    out = []
    for it in items:
        n_prompt, n_gen = int(it.get("n_prompt") or 0), int(it.get("n_gen") or 0)
        if n_prompt and n_gen:
            test = f"pp{n_prompt}+tg{n_gen}"
        else:
            test = f"pp{n_prompt}" if n_prompt else f"tg{n_gen}"
        if int(it.get("n_depth") or 0):
            test += f" @ d{it['n_depth']}"
        size, n_params = _int(str(it.get("model_size") or "")), _int(str(it.get("model_n_params") or ""))
        row = {
            # size and params as llama-bench's markdown table prints them, and the exact counts beside them
            "model": str(it.get("model_type", "")), "size": _mib_gib(size) if size else "",
            "params": _m_b(n_params) if n_params else "",
            "model_size": str(size or ""), "model_n_params": str(n_params or ""),
            "backend": str(it.get("backends", "")), "ngl": str(it.get("n_gpu_layers", "")), "test": test,
            "t/s": f"{it.get('avg_ts')} ± {it.get('stddev_ts')}" if it.get("stddev_ts") not in (None, "")
            else str(it.get("avg_ts", "")),
            "gpu_info": str(it.get("gpu_info") or ""), "cpu_info": str(it.get("cpu_info") or ""),
            "build_commit": str(it.get("build_commit") or ""),
            "build_number": "" if it.get("build_number") in (None, "") else str(it["build_number"]),
            "threads": str(it.get("n_threads") or ""), "n_batch": str(it.get("n_batch") or ""),
            "n_ubatch": str(it.get("n_ubatch") or ""), "type_k": str(it.get("type_k") or ""),
            "type_v": str(it.get("type_v") or ""),
            "fa": {"1": "1", "0": "0", "True": "1", "False": "0", "-1": ""}.get(str(it.get("flash_attn")), ""),
        }
        out.append((json.dumps(it) if fmt != "csv" else ",".join(str(v) for v in it.values()), row))
    return out


# print_info / llama_context since early 2025; llm_load_print_meta / llama_new_context_with_model before
_INFO_RE = re.compile(r"^\s*(?:print_info|llm_load_print_meta):\s+(?P<key>file type|model ftype|arch|model type|"
                      r"model params)\s*=\s*(?P<val>.+?)\s*$")
_CTX_RE = re.compile(r"^\s*(?:llama_context|llama_new_context_with_model):\s+(?P<key>n_ctx|n_ubatch|n_batch|"
                     r"flash_attn)\s*=\s*(?P<val>\S+)")
_KV_TYPES_RE = re.compile(r"K \((?P<k>\w+)\):.*V \((?P<v>\w+)\):")


def log_records(text: str, src: Source, run_id: str) -> tuple[list[schema.Record], list[Skipped]]:
    """A llama.cpp load log as published (`format: log`): one memory record (test "mem") per context it
    creates, with the model's buffers, that context's KV, compute and output buffers (bytes per buffer name, as
    llama.cpp logs them), n_ctx, n_ubatch, flash attention and the KV cache types where logged."""
    from harness import llamalog

    lines = [llamalog.strip_prefix(x) for x in text.splitlines()]  # without the tools' timestamps and colours
    info = {m["key"].replace("model ftype", "file type"): m["val"] for m in map(_INFO_RE.match, lines) if m}
    model = parse_model(f"{info.get('arch', '')} {info.get('model type', '')} {info.get('file type', '')}")
    if model is None:
        return [], [Skipped(src.path, "no model the log names (print_info: arch, model type, file type): "
                                      f"{info or 'none of those lines'}")]
    # the device: the given one, else the first GPU ggml-cuda lists in the log ("Device 0: NVIDIA ...")
    cuda = llamalog.cuda_devices(lines)
    dev = _device({"gpu_info": cuda[0][1]} if cuda and not src.device else {}, "cuda" if cuda else None, src)
    if dev is None:
        return [], [Skipped(src.path, _NO_DEVICE)]
    contexts: list[tuple[list[str], list[str]]] = []  # (the context's lines, its model's buffer lines)
    model_lines: list[str] = []
    new_load = False  # a model buffer line after a context: the log loads the model again
    for line in lines:
        if llamalog.parse_buffers([line]).model:
            if new_load:
                model_lines, new_load = [], False
            model_lines.append(line)
        if re.match(r"^\s*(?:llama_context|llama_new_context_with_model):\s+n_ctx\s*=", line):
            contexts.append(([], list(model_lines)))
            new_load = True
        if contexts:
            contexts[-1][0].append(line)
    if not contexts:
        return [], [Skipped(src.path, "no context in the log (no 'llama_context: n_ctx =' line)")]
    recs = []
    off = llamalog.offloaded_layers(lines)
    for i, (ctx, mlines) in enumerate(contexts):
        weights = llamalog.parse_buffers(mlines).model
        b = llamalog.parse_buffers(ctx)
        kv = {m["key"]: m["val"] for m in map(_CTX_RE.match, ctx) if m}
        types = next((m for m in map(_KV_TYPES_RE.search, ctx) if m), None)
        backend = next((BACKENDS.get(re.sub(r"\d+$", "", n).lower()) for n in (*b.kv, *weights)
                        if not llamalog.is_host_buffer(n)), "cpu")
        recs.append(schema.make(
            run_id=run_id, utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), status="ok",
            quant=model[2], weights=WEIGHTS, weights_ref=src.url, model_desc=" ".join(model[:2]) + " " +
            info.get("file type", ""), model_n_params=parse_params(info.get("model params", "")), test="mem",
            n_ctx=_int(kv.get("n_ctx")), n_ubatch=_int(kv.get("n_ubatch")), n_batch=_int(kv.get("n_batch")),
            flash_attn=kv.get("flash_attn"), device=backend or src.backend, gpu_name=dev.name,
            model_buffers=weights, kv_buffers=b.kv, compute_buffers=b.compute, output_buffers=b.output,
            weights_bytes=sum(weights.values()) or None, kv_bytes=sum(b.kv.values()),
            compute_bytes=sum(b.compute.values()), output_bytes=sum(b.output.values()),
            cache_type_k=types["k"] if types else None, cache_type_v=types["v"] if types else None,
            n_layers_offloaded=(off or (None, None))[0], n_layers_offloadable=(off or (None, None))[1],
            extra={"source": src.url, "date": src.date, **_runtime_build(src, None, {}), "quote": src.quote,
                   "file": src.path, "context": i, "gpu_devices_logged": [list(c) for c in cuda],
                   "lines": [x.strip() for x in ctx if "buffer size" in x or _CTX_RE.match(x)],
                   "architecture": model[0], "size_label": model[1], **_device_extra(dev)},
        ))
    return recs, []


def _columns(path: Path, value: Any) -> dict[str, dict[str, Any]]:
    """A yaml's `columns:` as {rate column header: {runtime:, build:}}; anything else is refused."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, dict) and set(v) <= {"runtime", "build"}
                                              for v in value.values()):
        raise ImportError_(f"{path}: columns: must map rate column headers to {{runtime:, build:}}")
    return {str(k).strip(): {f: None if x is None else str(x) for f, x in v.items()} for k, v in value.items()}


def this_cpu() -> str:
    """This machine's CPU, as the harness's own runs name it (what `--device cpu` means)."""
    return devices.cpu_model()


def read_source(path: Path, meta: dict[str, Any] | None = None) -> Source:
    """The source of `path`: the yaml beside it, with `meta` (the command line's flags) over it. A given
    device "cpu" (any case) is this machine's CPU."""
    meta = dict(meta or {})
    device_from = "given"
    if str(meta.get("device") or "").strip().lower() == "cpu":
        meta["device"], device_from = this_cpu(), "this machine's CPU (--device cpu)"
    side = path.with_suffix(".yaml")
    if side.is_file() and side != path:
        import yaml

        meta = {**(yaml.safe_load(side.read_text()) or {}), **{k: v for k, v in meta.items() if v}}
    if not meta.get("url"):
        raise ImportError_(f"{path}: no source URL (a {side.name} beside it with url:, or --url)")
    fmt = str(meta.get("format") or {".json": "json", ".jsonl": "jsonl", ".csv": "csv",
                                      ".sql": "sql", ".log": "log"}.get(path.suffix, "md"))
    return Source(str(meta["url"]), str(meta["date"]) if meta.get("date") else None, meta.get("build"),
                  meta.get("device"), meta.get("backend"), fmt, meta.get("quote"), str(path),
                  runtime=None if meta.get("runtime") is None else str(meta["runtime"]),
                  columns=_columns(side, meta.get("columns")), device_from=device_from)


def import_file(path: Path, run_id: str, meta: dict[str, Any] | None = None
                ) -> tuple[list[schema.Record], list[Skipped], Source]:
    src = read_source(path, meta)
    text = path.read_text(encoding="utf-8")
    if src.fmt in MACHINE_FORMATS:
        rows = json_rows(text, src.fmt)
    elif src.fmt == "md":
        rows = md_rows(text)
    elif src.fmt == "log":
        recs, skipped = log_records(text, src, run_id)
        return recs, skipped, src
    else:
        why = f"format {src.fmt!r}: not a llama-bench output (md, json, jsonl, csv, sql) or a load log (log)"
        return [], [Skipped(str(path), why)], src
    if not rows:
        return [], [Skipped(str(path), "no llama-bench table found")], src
    recs, skipped = rows_to_records(rows, src, run_id)
    return recs, skipped, src
