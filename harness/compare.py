"""``python -m harness compare``: llama-bench-style comparison tables across runs and machines.

    python -m harness compare RUN [RUN ...] [--where SQL] [--baseline RUN] [--results DIR ...] [--all]

As llama.cpp's ``scripts/compare-llama-bench.py`` compares builds: rows keyed by the properties that make two
measurements comparable (its KEY_PROPERTIES, mapped to the record's fields below), one ``t/s <run>`` column per
run, and a ``Speedup`` against the baseline. A cell is the median tokens/s over that run's ok repetitions. A
run whose records come from several machines (the published rows) gives one column per machine. Read through
the DuckDB views of :mod:`harness.query`; the JSONL files stay the source of truth.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

import pandas as pd

from harness import query
from harness.catalog import quants
from harness.config import ConfigError

# compare-llama-bench.py's LLAMA_BENCH_KEY_PROPERTIES, in its order, as the `bench` view names them (from the
# records: backends = device, model_filename = quant (the file's recipe label: Q4_K_M and Q4_K_L share llama.cpp's
# model description), model_type = model_desc, type_k/type_v = cache_type_k/v, use_mmap = extra.mmap). The
# machine (cpu_info, gpu_info) is the column, not the key: comparing machines is what the table is for. Keys
# llama-bench has and the harness never varies (cpu_mask, poll, split_mode, tensor_split, ...) are left out.
KEY_PROPERTIES = ["backends", "n_gpu_layers", "quant", "model_type", "n_batch", "n_ubatch", "n_threads", "type_k",
                  "type_v", "use_mmap", "flash_attn", "n_prompt", "n_gen", "n_depth"]
TEST_PROPERTIES = ["n_prompt", "n_gen", "n_depth"]
PRETTY_NAMES = {"backends": "Backends", "n_gpu_layers": "GPU layers", "quant": "Quant", "model_type": "Model",
                "n_batch": "Batch size", "n_ubatch": "Microbatch size", "n_threads": "Threads", "type_k": "K type",
                "type_v": "V type", "use_mmap": "Use mmap", "flash_attn": "FlashAttention"}
DEFAULT_SHOW = ["model_type"]
MODEL_SUFFIX_REPLACE = {" - Small": "_S", " - Medium": "_M", " - Large": "_L"}
GPU_NAME_STRIP = ["NVIDIA GeForce ", "Tesla ", "AMD Radeon "]  # as compare-llama-bench.py, for narrower columns


def test_name(n_prompt: int, n_gen: int, n_depth: int) -> str:
    """llama-bench's test name: pp512, tg128, pp512+tg128, with @d<depth> where the cache was pre-filled."""
    if n_prompt and not n_gen:
        name = f"pp{n_prompt}"
    elif n_gen and not n_prompt:
        name = f"tg{n_gen}"
    else:
        name = f"pp{n_prompt}+tg{n_gen}"
    return f"{name}@d{n_depth}" if n_depth else name


def resolve_runs(con, names: list[str], roots: list[Path]) -> list[str]:
    """Run folders (absolute, as the views hold them) for run ids, a unique prefix or part of one, or folder paths;
    an unknown or ambiguous name is a ConfigError naming the close matches."""
    known = dict(con.execute("SELECT folder, run FROM runs ORDER BY run").fetchall())  # folder -> run
    out = []
    for name in names:
        p = Path(name)
        if (p / "records.jsonl").is_file():
            out.append(str(p.resolve()))
            continue
        exact = [f for f, r in known.items() if r == name]
        hits = exact or [f for f, r in known.items() if r.startswith(name)] or \
            [f for f, r in known.items() if name in r]
        if len(hits) == 1:
            out.append(hits[0])
            continue
        where = ", ".join(map(str, roots))
        if hits:
            raise ConfigError(f"run {name!r} is ambiguous under {where}: {', '.join(known[f] for f in hits)}")
        close = difflib.get_close_matches(name, list(known.values()), n=3, cutoff=0.5)
        close += [r for r in known.values() if name in r and r not in close]
        if close:
            hint = f" (did you mean {', '.join(close[:3])}?)"
        elif known:
            hint = f" (runs there: {', '.join(list(known.values())[:5])}{', ...' if len(known) > 5 else ''})"
        else:
            hint = " (no runs there)"
        raise ConfigError(f"no run {name!r} under {where}{hint}")
    return list(dict.fromkeys(out))


def bench_frame(con, folders: list[str] | None, where: str | None) -> pd.DataFrame:
    """The `bench` view's rows (one per run, machine and key) for these run folders (all where None) and the
    records predicate `where`."""
    sql = query.bench_sql(query.predicate(where) if where else None)
    if folders:
        sql = f"SELECT * FROM ({sql}) WHERE folder IN ({', '.join(query.sql_str(f) for f in folders)})"
    return con.execute(sql).df()


def _short(machine: str) -> str:
    for prefix in GPU_NAME_STRIP:
        machine = machine.replace(prefix, "")
    return machine


def _column_of(df: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Adds `column`: the run's name, or "<run> <machine>" for a run whose rows come from several machines."""
    multi = df.groupby("folder").machine.nunique(dropna=False)
    rank = {f: i for i, f in enumerate(order)}
    df = df.assign(column=[f"{r} {_short(m)}" if multi[f] > 1 else r
                           for f, r, m in zip(df.folder, df.run, df.machine.fillna("?"))],
                   _rank=[rank.get(f, len(rank)) for f in df.folder])
    return df


def _plain(v):
    """A key value as plain Python: None for a missing one, int for a whole number (pandas makes int columns
    with nulls float), so keys from different runs compare equal."""
    if v is None or (isinstance(v, float) and v != v) or v is pd.NA:
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def table(df: pd.DataFrame, order: list[str], baseline: str | None = None, show_all: bool = False) \
        -> tuple[list[str], list[list], dict]:
    """(headers, rows, info) of the comparison: rows keyed by KEY_PROPERTIES, one median t/s column per run
    (per run and machine), Speedup columns against the baseline's. Shown: the model, and every key property
    whose value is not the same in all rows (as compare-llama-bench.py shows them). With two or more columns only
    the rows the baseline shares with another column, unless `show_all`."""
    df = _column_of(df, order)
    cols = list(df.sort_values(["_rank", "column"]).column.drop_duplicates())
    if baseline is not None:
        base = [c for c in cols if (df[df.column == c].folder == baseline).all()]
        if not base:
            raise ConfigError("the baseline run has no rows among those selected")
        cols = [base[0]] + [c for c in cols if c != base[0]]
    by_key: dict[tuple, dict[str, float]] = {}
    for rec in df.to_dict("records"):
        k = tuple(_plain(rec[p]) for p in KEY_PROPERTIES)
        by_key.setdefault(k, {})[rec["column"]] = float(rec["median_ts"])
    keys = list(by_key)
    if len(cols) > 1 and not show_all:
        keys = [k for k in keys if cols[0] in by_key[k] and any(c in by_key[k] for c in cols[1:])]
    hidden = len(by_key) - len(keys)
    ix = {p: i for i, p in enumerate(KEY_PROPERTIES)}
    varying = [p for p in KEY_PROPERTIES if p not in TEST_PROPERTIES and p not in DEFAULT_SHOW
               and len({k[ix[p]] for k in keys}) > 1]
    show = DEFAULT_SHOW + varying
    order_q = {q: i for i, q in enumerate(quants.RECIPES)}

    def sort_key(k):
        props = tuple((order_q.get(k[ix[p]], len(order_q)), str(k[ix[p]])) if p == "quant" else (0, str(k[ix[p]]))
                      for p in show)
        return props + tuple(k[ix[p]] or 0 for p in ("n_gen", "n_prompt", "n_depth"))

    rows = []
    for k in sorted(keys, key=sort_key):
        cells = []
        for p in show:
            v = k[ix[p]]
            if p == "model_type" and isinstance(v, str):
                for old, new in MODEL_SUFFIX_REPLACE.items():
                    v = v.replace(old, new)
            cells.append(v)
        vals = [by_key[k].get(c) for c in cols]
        speed = [None if vals[0] is None or v is None else v / vals[0] for v in vals[1:]]
        rows.append(cells + [test_name(*(k[ix[p]] or 0 for p in TEST_PROPERTIES))] + vals + speed)
    headers = [PRETTY_NAMES.get(p, p) for p in show] + ["Test"] + [f"t/s {c}" for c in cols]
    headers += ["Speedup"] if len(cols) == 2 else [f"Speedup {c}" for c in cols[1:]]
    constant = {PRETTY_NAMES[p]: keys[0][ix[p]] for p in KEY_PROPERTIES
                if keys and p not in TEST_PROPERTIES and p not in show}
    per_col = {}
    for c in cols:
        d = df[df.column == c]
        per_col[c] = {"folder": d.folder.iloc[0], "run": d.run.iloc[0],
                      "machine": d.machine.dropna().iloc[0] if d.machine.notna().any() else None,
                      "machine_id": d.machine_id.dropna().iloc[0] if d.machine_id.notna().any() else None,
                      "n": sorted({int(x) for x in d.n}),
                      "runtime": sorted(set(d.runtime.dropna())),
                      "weights": sorted(set(d.weights.dropna()))}
    return headers, rows, {"columns": per_col, "constant": constant, "hidden": hidden}


# --- the `compare` command ----------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="llama-bench-style comparison of runs (and machines): t/s per run, speedup",
        description="Compare runs as llama.cpp's compare-llama-bench.py compares builds: one row per llama-bench "
                    "key (model, quant, batch sizes, threads, K/V types, flash attention, test), the median t/s "
                    "of each run, and the speedup against the baseline. Reads the JSONL files through DuckDB "
                    f"views ({query.INSTALL_HINT}).")
    p.add_argument("runs", nargs="*", metavar="RUN",
                   help="run ids (results folder names, or a unique prefix such as 20261128T055841Z) or run "
                        "folders; none: every run with records the --where selects")
    p.add_argument("--where", metavar="SQL", help="a SQL predicate on the records view, e.g. \"quant = 'Q4_K_M'\" "
                                                  "or \"weights = 'published'\"")
    p.add_argument("--baseline", metavar="RUN", help="the run the speedups are against (default: the first)")
    p.add_argument("--results", action="append", type=Path, metavar="DIR",
                   help="a folder of run folders, or one run folder (repeat for more; default: ./results or "
                        "$HARNESS_RESULTS)")
    p.add_argument("--all", action="store_true", dest="show_all",
                   help="also the rows only one column has (by default, as compare-llama-bench.py, only the rows "
                        "the baseline shares with another run)")


QUALITY_SQL = """
    SELECT folder, quant, model_desc AS model_type, n_ctx, extra->>'$.reference_label' AS reference,
           extra->>'$.text_name' AS text, extra->>'$.text_sha256' AS text_sha256,
           TRY_CAST(quality->>'$.kld_mean' AS DOUBLE) AS kld, TRY_CAST(quality->>'$.ppl' AS DOUBLE) AS ppl,
           TRY_CAST(quality->>'$.same_top' AS DOUBLE) AS same_top
    FROM quality WHERE status = 'ok' AND test = 'quality'"""


def quality_rows(con, order: list[str]) -> tuple[list[str], list[list]]:
    """The quality test's records of the runs, keyed as the speed rows are (model, quant) plus what makes two
    quality figures comparable (n_ctx, reference, text): mean KLD (PPL, same top %) per run."""
    try:
        q = con.execute(QUALITY_SQL).df()
    except Exception:  # noqa: BLE001 - a database of runs without any quality.jsonl has no rows to read
        return [], []
    q = q[q.folder.isin(order)]
    if q.empty:
        return [], []
    cols = [f for f in order if f in set(q.folder)]
    headers = ["Model", "Quant", "n_ctx", "Reference", "Text"] + [
        f"KLD / PPL / same top {_short(Path(f).name)}" for f in cols]
    rows = []
    for key, g in q.groupby(["model_type", "quant", "n_ctx", "reference", "text_sha256"], sort=True, dropna=False):
        by = {r.folder: r for r in g.itertuples()}
        rows.append([key[0], key[1], key[2], key[3], g.text.iloc[0][:40]] + [
            f"{by[f].kld:.5f} / {by[f].ppl:.3f} / {100 * by[f].same_top:.2f}%" if f in by else "" for f in cols])
    return headers, rows


def main(args) -> int:
    duckdb = query.duckdb_module()
    roots = query.check_roots(args.results or [])
    for name in args.runs + ([args.baseline] if args.baseline else []):
        p = Path(name)  # a run folder given by path is read where it is, under the roots or not
        if (p / "records.jsonl").is_file() and p.resolve().parent not in {Path(r).resolve() for r in roots}:
            roots.append(p)
    con = query.connect(roots)
    try:
        folders = resolve_runs(con, args.runs, roots) if args.runs else None
        baseline = resolve_runs(con, [args.baseline], roots)[0] if args.baseline else None
        if baseline and folders and baseline not in folders:
            folders = [baseline] + folders
        df = bench_frame(con, folders, args.where)
    except duckdb.Error as e:
        raise ConfigError(" ".join(str(e).split())) from None
    if df.empty:
        print(f"no pp/tg records {'match' if args.where else 'in'} the runs selected", file=sys.stderr)
        return 1
    order = folders or sorted(df.folder.unique(), key=lambda f: df[df.folder == f].run.iloc[0])
    if baseline:
        order = [baseline] + [f for f in order if f != baseline]
    headers, rows, info = table(df, order, baseline, args.show_all)
    if not rows:
        print(f"no comparable rows: the baseline shares no key with another run ({info['hidden']} rows differ in "
              "model, settings or test; --all lists them)", file=sys.stderr)
        return 1
    print(query.pipe_table(headers, rows))
    print()
    if info["constant"]:
        print("Same in every row: " + ", ".join(f"{k} {query.cell(v) or '-'}" for k, v in info["constant"].items()))
    for c, d in info["columns"].items():
        n = "/".join(map(str, d["n"]))
        print(f"t/s {c}: median over {n} repetitions; {d['machine'] or 'machine unknown'}; "
              f"{', '.join(d['weights'])} weights; {', '.join(d['runtime']) or 'runtime unknown'}")
    machines = {d["machine"] for d in info["columns"].values()}
    ids = {d["machine_id"] for d in info["columns"].values()}
    if len(machines) > 1:
        print(f"note: the columns come from different machines ({', '.join(sorted(map(str, machines)))}): "
              "a speedup compares the machines as well as the runs")
    elif len(ids) > 1:
        known = sorted(i for i in ids if i)
        which = "different machine fingerprints" if len(known) > 1 else "not every run with a machine fingerprint"
        print(f"note: one CPU name, {which} ({', '.join(known) or '-'}): hypervisors give one name to many "
              "processors, so a speedup may compare the machines as well as the runs")
    if "backends" in df and (df.backends.astype(str) == "rpc").any():
        print("note: backend rpc is llama.cpp's RPC device (a server's device over the network; loopback in this "
              "harness's tests): its t/s is the server's and the network's, not a GPU's")
    if info["hidden"]:
        print(f"{info['hidden']} rows only one column has are not shown (--all shows them)")
    qh, qr = quality_rows(con, order)
    if qr:
        print()
        print("Quality (test quality: llama-perplexity's protocol against the reference named):")
        print(query.pipe_table(qh, qr))
    return 0
