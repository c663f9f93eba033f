"""Published llama.cpp measurements as records: llama-bench output pasted in issues and pull requests (its
markdown tables, and its json / jsonl / csv output), each row one record of the harness's schema with
`weights: "published"`, its source (URL), date, build and the quoted line.

A source is a pair of files (`data/published/<slug>.txt` with the output exactly as published, and
`<slug>.yaml` with `url`, `date`, `build`, `device`, `backend`, `format`, `quote`, `notes`), or a single output
file with those given on the command line. Numbers are transcribed, never computed: the record keeps the t/s
and its ± as printed (`extra.ts_sd`), the size with its unit (`extra.size_as_printed`).

Rows are placed or skipped, never guessed: a model string must parse into architecture, size label and a known
quant ("llama 1B Q4_K - Medium" -> llama, 1B, Q4_K_M), the test into pp/tg sizes, the rate into a number, and
the device must resolve in the catalog (:func:`harness.catalog.devices.lookup`, "did you mean"); every skipped
row comes back with its reason. Comparison tables (`t/s (before)` / `t/s (after)`, `master` / `PR`) give one
record per rate column, named in `extra.column`; repeated rows (the same source, device, model, test, column and
rate) are kept once.
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
    url: str
    date: str | None
    build: str | None
    device: str | None
    backend: str | None
    fmt: str
    quote: str | None
    path: str


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
# column is "GPU" or "CPU" (the chip's name, as llama-bench's gpu_info / cpu_info)
_COLUMNS = {"model", "size", "params", "backend", "ngl", "fa", "test", "gpu_info", "threads", "n_batch",
            "n_ubatch", "type_k", "type_v"}
_DEVICE_COLUMNS = {"gpu": "gpu_info", "cpu": "gpu_info"}


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


def _resolve_device(name: str | None) -> tuple[devices.Device | None, str | None]:
    if not name:
        return None, "no device named (give one in the source's yaml or with --device)"
    try:
        return devices.lookup(name), None
    except devices.UnknownDevice as e:
        return None, str(e).split("; known:")[0]  # the catalog's whole list once per row says nothing


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
        dev_name = row.get("gpu_info") or src.device
        dev, why = _resolve_device(dev_name)
        if dev is None:
            skipped.append(Skipped(line, f"device: {why}"))
            continue
        size = parse_size(row.get("size", ""))
        params = parse_params(row.get("params", ""))
        backend_text = (row.get("backend") or src.backend or "").strip()
        backend = _backend(backend_text)
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
                extra={"source": src.url, "date": src.date, "build": src.build, "quote": src.quote,
                       "line": line.strip(), "file": src.path, "column": col, "ts_sd": rate[1],
                       "size_as_printed": row.get("size"), "params_as_printed": row.get("params"),
                       "backend_as_printed": backend_text or None, "architecture": model[0],
                       "size_label": model[1], "device_as_printed": dev_name},
            ))
    return recs, skipped


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
        size = it.get("model_size")
        row = {
            "model": str(it.get("model_type", "")), "size": f"{int(size) / 2**30:.2f} GiB" if size else "",
            "params": f"{int(it['model_n_params']) / 1e9:.2f} B" if it.get("model_n_params") else "",
            "backend": str(it.get("backends", "")), "ngl": str(it.get("n_gpu_layers", "")), "test": test,
            "t/s": f"{it.get('avg_ts')} ± {it.get('stddev_ts')}" if it.get("stddev_ts") not in (None, "")
            else str(it.get("avg_ts", "")),
            "gpu_info": str(it.get("gpu_info") or ""),
            "threads": str(it.get("n_threads") or ""), "n_batch": str(it.get("n_batch") or ""),
            "n_ubatch": str(it.get("n_ubatch") or ""), "type_k": str(it.get("type_k") or ""),
            "type_v": str(it.get("type_v") or ""),
            "fa": {"1": "1", "0": "0", "True": "1", "False": "0", "-1": ""}.get(str(it.get("flash_attn")), ""),
        }
        out.append((json.dumps(it) if fmt != "csv" else ",".join(str(v) for v in it.values()), row))
    return out


_INFO_RE = re.compile(r"^\s*print_info:\s+(?P<key>file type|arch|model type|model params)\s*=\s*(?P<val>.+?)\s*$")
_CTX_RE = re.compile(r"^\s*llama_context:\s+(?P<key>n_ctx|n_ubatch|n_batch|flash_attn)\s*=\s*(?P<val>\S+)")
_KV_TYPES_RE = re.compile(r"K \((?P<k>\w+)\):.*V \((?P<v>\w+)\):")


def log_records(text: str, src: Source, run_id: str) -> tuple[list[schema.Record], list[Skipped]]:
    """A llama.cpp load log as published (`format: log`): one memory record (test "mem") per context it
    creates, with the model's buffers, that context's KV, compute and output buffers (bytes per buffer name, as
    llama.cpp logs them), n_ctx, n_ubatch, flash attention and the KV cache types where logged."""
    from harness import llamalog

    lines = text.splitlines()
    info = {m["key"]: m["val"] for m in map(_INFO_RE.match, lines) if m}
    model = parse_model(f"{info.get('arch', '')} {info.get('model type', '')} {info.get('file type', '')}")
    if model is None:
        return [], [Skipped(src.path, "no model the log names (print_info: arch, model type, file type): "
                                      f"{info or 'none of those lines'}")]
    dev, why = _resolve_device(src.device)
    if dev is None:
        return [], [Skipped(src.path, f"device: {why}")]
    contexts: list[tuple[list[str], list[str]]] = []  # (the context's lines, its model's buffer lines)
    model_lines: list[str] = []
    new_load = False  # a model buffer line after a context: the log loads the model again
    for line in lines:
        if " model buffer size" in line:
            if new_load:
                model_lines, new_load = [], False
            model_lines.append(line)
        if re.match(r"^\s*llama_context:\s+n_ctx\s*=", line):
            contexts.append(([], list(model_lines)))
            new_load = True
        if contexts:
            contexts[-1][0].append(line)
    if not contexts:
        return [], [Skipped(src.path, "no context in the log (no 'llama_context: n_ctx =' line)")]
    recs = []
    for i, (ctx, mlines) in enumerate(contexts):
        weights = llamalog.parse_buffers(mlines).model
        b = llamalog.parse_buffers(ctx)
        kv = {m["key"]: m["val"] for m in map(_CTX_RE.match, ctx) if m}
        types = next((m for m in map(_KV_TYPES_RE.search, ctx) if m), None)
        backend = next((BACKENDS.get(re.sub(r"\d+$", "", n).lower()) for n in (*b.kv, *weights)
                        if not n.upper().startswith("CPU")), "cpu")
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
            extra={"source": src.url, "date": src.date, "build": src.build, "quote": src.quote, "file": src.path,
                   "context": i, "lines": [x.strip() for x in ctx if "buffer size" in x or _CTX_RE.match(x)],
                   "architecture": model[0], "size_label": model[1], "device_as_printed": src.device},
        ))
    return recs, []


def read_source(path: Path, meta: dict[str, Any] | None = None) -> Source:
    meta = dict(meta or {})
    side = path.with_suffix(".yaml")
    if side.is_file() and side != path:
        import yaml

        meta = {**(yaml.safe_load(side.read_text()) or {}), **{k: v for k, v in meta.items() if v}}
    if not meta.get("url"):
        raise ImportError_(f"{path}: no source URL (a {side.name} beside it with url:, or --url)")
    fmt = str(meta.get("format") or {".json": "json", ".jsonl": "jsonl", ".csv": "csv",
                                      ".sql": "sql", ".log": "log"}.get(path.suffix, "md"))
    return Source(str(meta["url"]), str(meta["date"]) if meta.get("date") else None, meta.get("build"),
                  meta.get("device"), meta.get("backend"), fmt, meta.get("quote"), str(path))


def import_file(path: Path, run_id: str, meta: dict[str, Any] | None = None
                ) -> tuple[list[schema.Record], list[Skipped], Source]:
    src = read_source(path, meta)
    text = path.read_text(encoding="utf-8")
    if src.fmt in ("json", "jsonl", "csv", "sql"):
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
