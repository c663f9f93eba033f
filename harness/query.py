"""``python -m harness db``: one DuckDB database over every run, as views over the files where they lie.

    python -m harness db [--results DIR ...] [-c SQL | --write FILE.duckdb | --points PREDICATE]

The views (`records`, `probes`, `contexts`, `runs`, `bench`) read ``<root>/*/records.jsonl`` (and the kernel
probes' and the memory test's files, and each run's ``env.json``) at every query: nothing is copied, so a line
appended to a records.jsonl is in the next query and no database can drift from the JSONL files. Published
rows come in the same way: ``harness import`` writes them as a results folder (``results/published``), and
their ``weights`` column says ``published``.

DuckDB is an optional extra (``pip install -e '.[cluster]'``): it is imported only when a command needs it,
and without it every entry point ends with one line and exit status 2.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from harness import schema
from harness.config import ConfigError, output_dir

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[cluster]'"

# View name -> the file each run folder holds for it (all three in the record schema).
RECORD_FILES = {"records": "records.jsonl", "probes": "probes.jsonl", "contexts": "contexts.jsonl",
                "quality": "quality.jsonl", "batched": "batched.jsonl"}
VIEWS = ("records", "probes", "contexts", "quality", "batched", "runs", "bench", "env")

# Nested fields (buffers per name, tensor types, `extra` with keys that differ between runs) are read as JSON,
# so runs whose nested keys differ never fail to read together; DuckDB queries them with ->, ->> and json_*.
_SQL_TYPES = (("dict", "JSON"), ("bool", "BOOLEAN"), ("int", "BIGINT"), ("float", "DOUBLE"), ("str", "VARCHAR"))


def _sql_type(annotation: str) -> str:
    for py, sql in _SQL_TYPES:
        if annotation.startswith(py):
            return sql
    raise TypeError(f"no SQL type for a record field of type {annotation}")


# The columns come from the schema (written down once): every file is read with the same columns, a field older
# records lack is null (what union_by_name would give), and a new field in schema.py is a new column here.
COLUMNS: dict[str, str] = {f.name: _sql_type(str(f.type)) for f in dataclasses.fields(schema.Record)}
JSON_FIELDS = tuple(k for k, t in COLUMNS.items() if t == "JSON")


def duckdb_module():
    """The duckdb module, or a ConfigError (one line, exit 2) saying how to install it."""
    try:
        import duckdb
    except ImportError:
        raise ConfigError(f"this command needs DuckDB, an optional extra: {INSTALL_HINT}") from None
    return duckdb


def default_roots() -> list[Path]:
    return [output_dir("results")]


def sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def patterns(roots: list[Path], name: str) -> list[str]:
    """Absolute glob patterns for file `name` under each root that has one now: ``<root>/*/<name>``, or the root's
    own file where the root is a run folder. A root without any is left out (DuckDB refuses a pattern that matches
    nothing); its runs added later are seen by the view where another of its runs was there when it was made."""
    out = []
    for root in roots:
        root = Path(root).resolve()
        pat = str(root / name) if (root / "records.jsonl").is_file() else str(root / "*" / name)
        if glob.glob(pat) and pat not in out:
            out.append(pat)
    return out


def _records_source(pats: list[str]) -> str:
    cols = ", ".join(f"{k}: {sql_str(t)}" for k, t in COLUMNS.items())
    if not pats:  # no file yet: the same columns, no rows
        nulls = ", ".join(f"CAST(NULL AS {t}) AS {k}" for k, t in COLUMNS.items())
        return f"SELECT {nulls}, CAST(NULL AS VARCHAR) AS run, CAST(NULL AS VARCHAR) AS folder, " \
               "CAST(NULL AS VARCHAR) AS filename WHERE false"
    files = "[" + ", ".join(sql_str(p) for p in pats) + "]"
    # ignore_errors: a line torn by a killed writer reads as a row of nulls (schema.read_records skips it too);
    # `harness db` counts those rows
    return (f"SELECT *, regexp_extract(parse_dirpath(filename), '[^/]+$') AS run, parse_dirpath(filename) AS folder "
            f"FROM read_json({files}, format = 'newline_delimited', columns = {{{cols}}}, filename = true, "
            "ignore_errors = true)")


def _env_source(pats: list[str]) -> str:
    # env.json as text cast to JSON, not read_json's inferred STRUCT: its shape differs between runs (gpu null or
    # an object, fields added over time), and a damaged file is a null, not a failed query
    if not pats:
        return "SELECT CAST(NULL AS VARCHAR) AS folder, CAST(NULL AS JSON) AS env WHERE false"
    files = "[" + ", ".join(sql_str(p) for p in pats) + "]"
    return f"SELECT parse_dirpath(filename) AS folder, TRY_CAST(content AS JSON) AS env FROM read_text({files})"


def bench_sql(where: str | None = None) -> str:
    """llama-bench's rows from the records: one per run, machine and llama-bench key (compare-llama-bench.py's
    KEY_PROPERTIES, named as llama-bench names them) with its tokens/s over the repetitions. `where` is a SQL
    predicate on the records view, applied before the repetitions are aggregated."""
    pred = f"WHERE ({where})" if where else ""
    return f"""
        SELECT r.run, r.folder,
               coalesce(r.gpu_name, e.env->>'$.cpu.model') AS machine,
               r.device AS backends, r.n_gpu_layers, r.quant, r.model_desc AS model_type,
               r.n_batch, r.n_ubatch, r.n_threads,
               -- llama.cpp's defaults where a record does not say: records older than these fields ran with
               -- them (the harness had no setting before it recorded one), and llama-bench's markdown table
               -- (published rows) prints these columns only when they differ from the defaults
               coalesce(r.cache_type_k, 'f16') AS type_k, coalesce(r.cache_type_v, 'f16') AS type_v,
               coalesce(TRY_CAST(r.extra->>'$.mmap' AS BOOLEAN), true) AS use_mmap,
               r.flash_attn, r.n_prompt, r.n_gen, r.n_depth,
               count(*) AS n, median(r.tokens_per_s) AS median_ts, avg(r.tokens_per_s) AS avg_ts,
               stddev_samp(r.tokens_per_s) AS stddev_ts,
               any_value(r.model_size_bytes) AS model_size, any_value(r.model_n_params) AS model_n_params,
               any_value(r.weights) AS weights,
               -- a CPU's fingerprint (harness.measure.fingerprint): one name can be many machines
               any_value(CASE WHEN r.gpu_name IS NULL THEN e.env->>'$.cpu.fingerprint.id' END) AS machine_id,
               -- published: the row's runtime and its build as printed ("llama.cpp build: 0c1e570 (1)")
               any_value(coalesce('llama-cpp-python ' || r.llama_cpp_version,
                                  nullif(concat_ws(' ', r.extra->>'$.runtime', r.extra->>'$.build'), '')))
                   AS runtime
        FROM (SELECT * FROM records {pred}) r LEFT JOIN env e USING (folder)
        WHERE r.status = 'ok' AND r.test IN ('pp', 'tg') AND r.tokens_per_s > 0
        GROUP BY ALL"""


RUNS_SQL = """
    SELECT r.run, r.folder, r.n_records, r.first_utc, r.last_utc, r.weights, r.devices, r.gpu_names,
           r.llama_cpp_versions,
           e.env->>'$.cpu.model' AS cpu_name, e.env->>'$.cpu.fingerprint.id' AS cpu_fingerprint,
           e.env->>'$.gpu.name' AS gpu_name,
           e.env->>'$.gpu.driver' AS gpu_driver,
           e.env->>'$.llama.llama_cpp_python' AS llama_cpp_python,
           e.env->>'$.harness.commit' AS harness_commit,
           TRY_CAST(e.env->>'$.harness.dirty' AS BOOLEAN) AS harness_dirty,
           e.env->>'$.hostname' AS hostname, e.env AS env
    FROM (SELECT folder, any_value(run) AS run, count(*) AS n_records, min(utc) AS first_utc, max(utc) AS last_utc,
                 list(DISTINCT weights ORDER BY weights) AS weights,
                 list(DISTINCT device ORDER BY device) FILTER (device IS NOT NULL) AS devices,
                 list(DISTINCT gpu_name ORDER BY gpu_name) FILTER (gpu_name IS NOT NULL) AS gpu_names,
                 list(DISTINCT llama_cpp_version ORDER BY llama_cpp_version)
                     FILTER (llama_cpp_version IS NOT NULL) AS llama_cpp_versions
          FROM (SELECT * FROM records UNION ALL BY NAME SELECT * FROM batched) GROUP BY folder) r
    LEFT JOIN env e USING (folder)
    ORDER BY r.run"""


def view_sql(roots: list[Path]) -> dict[str, str]:
    """{view: its SELECT} over the files under `roots`, absolute paths (so a written .duckdb file works from
    anywhere). `env` is each run's env.json as JSON (the runs view's source)."""
    out = {name: _records_source(patterns(roots, f)) for name, f in RECORD_FILES.items()}
    for name in RECORD_FILES:  # a torn line's row of nulls stays out of the views
        out[name] = f"SELECT * FROM ({out[name]}) WHERE status IS NOT NULL"
    out["env"] = _env_source(patterns(roots, "env.json"))
    out["runs"] = RUNS_SQL
    out["bench"] = bench_sql()
    return out


def check_roots(roots: list[Path]) -> list[Path]:
    roots = list(roots) if roots else default_roots()
    for r in roots:
        if not Path(r).is_dir():
            raise ConfigError(f"{r}: no such results folder")
    return roots


def connect(roots: list[Path] | None = None, db_file: Path | None = None):
    """A DuckDB connection with the views over the runs under `roots` (default ./results or $HARNESS_RESULTS),
    in memory or, with `db_file`, created (or replaced) in that .duckdb file, which then opens with the views in
    any DuckDB client. No record is copied."""
    duckdb = duckdb_module()
    roots = check_roots(roots or [])
    con = duckdb.connect(str(db_file) if db_file else ":memory:")
    for name, sql in view_sql(roots).items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
    return con


def torn_lines(roots: list[Path]) -> dict[str, int]:
    """{file: lines DuckDB could not read} (records torn by a killed writer), for the files under `roots`."""
    con = duckdb_module().connect()
    out: dict[str, int] = {}
    for f in RECORD_FILES.values():
        pats = patterns(roots, f)
        if pats:
            src = _records_source(pats)
            for fn, n in con.execute(f"SELECT filename, count(*) FROM ({src}) WHERE status IS NULL GROUP BY 1"
                                     ).fetchall():
                out[fn] = n
    return out


# --- records back as the analysis takes them ----------------------------------------------------------------

_DEFAULTS = {f.name: f.default_factory() for f in dataclasses.fields(schema.Record)
             if f.default_factory is not dataclasses.MISSING}


def records_from_query(con, where: str | None = None) -> pd.DataFrame:
    """The records the predicate `where` selects (all where None), validated by the schema and as
    :func:`harness.analysis.summary.records_frame` makes them: the DataFrame every analysis function takes."""
    from harness.analysis import summary

    pred = f" WHERE ({predicate(where)})" if where else ""
    cur = con.execute(f"SELECT {', '.join(COLUMNS)} FROM records{pred}")
    recs = []
    for row in cur.fetchall():
        d: dict[str, Any] = dict(zip(COLUMNS, row))
        for k in JSON_FIELDS:
            d[k] = json.loads(d[k]) if d[k] is not None else _DEFAULTS.get(k)
        recs.append(schema.from_dict(d))
    return summary.records_frame(recs)


def points_from_query(con, where: str | None = None) -> pd.DataFrame:
    """The calibration's tg points (:func:`harness.analysis.points.tg_points`) of the records `where` selects,
    with the tensor types those records carry, as the calibration builds them."""
    from harness.analysis import points

    df = records_from_query(con, where)
    return points.tg_points(df, tensor_types=points.tensor_types_from_records(df))


def predicate(where: str) -> str:
    w = where.strip()
    return w[5:].strip() if w[:5].upper() == "WHERE" and (len(w) == 5 or w[5].isspace()) else w


# --- output -------------------------------------------------------------------------------------------------

def cell(v: Any, floatfmt: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, bool):
        return "Yes" if v else "No"
    if isinstance(v, float):
        return format(v, floatfmt)
    return str(v).replace("|", "\\|").replace("\n", " ")


def pipe_table(headers: list[str], rows: list[list[Any]], floatfmt: str = ".2f") -> str:
    """A markdown (GitHub "pipe") table as compare-llama-bench.py prints it with tabulate: text left-aligned,
    numbers right-aligned, floats with two decimals."""
    cells = [[cell(v, floatfmt) for v in r] for r in rows]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) or r[i] is None
                                  for r in rows) for i in range(len(headers))]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(vals):
        return "| " + " | ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(vals, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if n else (":" + "-" * (w + 1)) for w, n in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), rule] + [line(c) for c in cells])


# --- the `db` command ---------------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "db", help="one DuckDB database over every run's records (views, no copy)",
        description="DuckDB views over results/*/records.jsonl (and probes.jsonl, contexts.jsonl, env.json), "
                    "read where they lie at every query: records, probes, contexts (the record schema, plus run and "
                    "folder), runs (one row per run folder, with env.json's machine and versions) and bench "
                    "(llama-bench's rows: tokens/s per run, machine and test). Without an option: the views and "
                    f"their row counts. Needs DuckDB ({INSTALL_HINT}).")
    p.add_argument("--results", action="append", type=Path, metavar="DIR",
                   help="a folder of run folders, or one run folder (repeat for more; default: ./results or "
                        "$HARNESS_RESULTS)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-c", "--sql", metavar="SQL", help="run this query and print its result as a table")
    g.add_argument("--write", type=Path, metavar="FILE.duckdb",
                   help="create (or update) the views in this DuckDB file, absolute paths to the JSONL files; "
                        "open it with `duckdb FILE` or duckdb.connect(FILE)")
    g.add_argument("--points", metavar="PREDICATE",
                   help="print the calibration's tg points of the records this SQL predicate selects, e.g. "
                        "\"run LIKE '20261128T055841Z%%'\" (points group by quant and depth: select one run or "
                        "one machine)")


def main(args) -> int:
    duckdb = duckdb_module()
    roots = check_roots(args.results or [])
    try:
        if args.write:
            if not args.write.parent.is_dir():
                raise ConfigError(f"--write {args.write}: no such folder {args.write.parent}")
            connect(roots, args.write).close()
            print(f"{args.write}: views {', '.join(VIEWS)} over the JSONL files under "
                  f"{', '.join(str(Path(r).resolve()) for r in roots)} (no records copied)")
            print(f"open it: duckdb {args.write}   or   python -c \"import duckdb; "
                  f"duckdb.connect('{args.write}').sql('FROM runs').show()\"")
            return 0
        con = connect(roots)
        if args.sql:
            cur = con.execute(args.sql)
            if cur.description is None:
                return 0
            headers = [d[0] for d in cur.description]
            print(pipe_table(headers, [list(r) for r in cur.fetchall()], floatfmt=""))  # floats in full
            return 0
        if args.points:
            df = records_from_query(con, args.points)
            runs = sorted(set(df.run_id)) if len(df) else []
            if len(runs) > 1:
                print(f"note: the records come from {len(runs)} runs ({', '.join(runs)}): each point pools their "
                      "repetitions", file=sys.stderr)
            from harness.analysis import points

            pts = points.tg_points(df, tensor_types=points.tensor_types_from_records(df))
            print(pts.to_string(index=False) if len(pts) else "(no tg records selected)")
            return 0 if len(pts) else 1
    except (duckdb.Error, schema.SchemaError) as e:
        raise ConfigError(" ".join(str(e).split())) from None
    _summary(con, roots)
    return 0


def _summary(con, roots: list[Path]) -> None:
    where = ", ".join(str(r) for r in roots)
    n_runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
    if not n_runs:
        print(f"no records under {where} (the views are defined and empty)")
    rows = []
    for v in VIEWS:
        n = con.execute(f"SELECT count(*) FROM {v}").fetchone()[0]
        rows.append([v, n])
    print(pipe_table(["view", "rows"], rows))
    for fn, n in torn_lines(roots).items():
        print(f"{fn}: {n} unreadable line(s) left out (a record torn by a killed writer?)")
    print(f"\n{n_runs} runs under {where}. Query: python -m harness db -c \"SELECT run, quant, test, "
          "median(tokens_per_s) FROM records GROUP BY ALL\"; or write a file: python -m harness db --write "
          "all.duckdb, then `duckdb all.duckdb` or duckdb.connect('all.duckdb') in Python")
