"""The DuckDB views over every run (`harness db`) and the llama-bench-style comparison (`harness compare`), on
the committed datasets in results/ and on run folders written here with the record schema."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, run_cli

duckdb = pytest.importorskip("duckdb", reason="DuckDB is an optional extra: pip install -e '.[cluster]'")

from harness import query, schema  # noqa: E402
from harness.analysis import points, summary  # noqa: E402

RESULTS = REPO / "results"
RUN_A = "20261128T052641Z-llama-3.2-1b-synthetic"
RUN_B = "20261128T055841Z-llama-3.2-1b-synthetic"


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def md_rows(text: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in `text`, as {header: cell}."""
    table = [x for x in text.splitlines() if x.startswith("|")]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in x.strip("|").split("|")))) for x in table[2:]]


def rec(run_id: str, quant: str = "Q4_0", test: str = "tg", rep: int = 0, tps: float = 10.0, **kw) -> schema.Record:
    base = dict(run_id=run_id, utc="2026-11-28T00:00:00+00:00", status="ok", quant=quant, weights="synthetic",
                model_desc=f"llama 1B {quant}", model_size_bytes=700_000_000, model_n_params=1_235_814_432,
                test=test, n_prompt=0 if test == "tg" else 512, n_gen=128 if test == "tg" else 0, n_depth=0,
                rep=rep, wall_ns=int(1e9), tokens_per_s=tps, file_sha256="ab" * 32, n_threads=2, n_batch=512,
                n_ubatch=512, n_gpu_layers=-1, flash_attn="auto", device="cpu", cache_type_k="f16",
                cache_type_v="f16", extra={"mmap": True})
    base.update(kw)
    return schema.make(**base)


def write_run(root: Path, name: str, records: list[schema.Record], cpu: str = "Test CPU",
              fingerprint: str | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    with schema.RecordWriter(d / "records.jsonl") as w:
        for r in records:
            w.write(r)
    cpu_env = {"model": cpu, **({"fingerprint": {"id": fingerprint}} if fingerprint else {})}
    (d / "env.json").write_text(json.dumps({"harness": {"commit": "c0ffee", "dirty": False}, "cpu": cpu_env,
                                            "gpu": None, "llama": {"llama_cpp_python": "0.3.36"}}))
    return d


# --- the views ----------------------------------------------------------------------------------------------

def test_every_line_of_every_committed_run_is_a_row():
    con = query.connect([RESULTS])
    for view, fname in query.RECORD_FILES.items():
        got = dict(con.execute(f"SELECT run, count(*) FROM {view} GROUP BY run").fetchall())
        want = {p.parent.name: n for p in RESULTS.glob(f"*/{fname}") if (n := len(lines(p)))}  # an empty file: no rows
        assert got == want, view
        # the committed runs are of synthetic weights, which the quality test refuses: its view is read from a
        # real-weights run in tests/test_quality.py
        assert sum(want.values()) > 0 or view == "quality", view
    runs = con.execute("SELECT run, cpu_name, harness_commit, llama_cpp_python FROM runs").fetchall()
    assert {r[0] for r in runs} == {p.parent.name for p in RESULTS.glob("*/records.jsonl")}
    env = json.loads((RESULTS / RUN_B / "env.json").read_text())
    assert (RUN_B, env["cpu"]["model"], env["harness"]["commit"], "0.3.36") in runs
    # nested fields are JSON, queryable, whatever keys each run's `extra` has
    n = con.execute("SELECT count(*) FROM records WHERE extra->>'$.machine.descheduled' = 'true'").fetchone()[0]
    want = sum(1 for p in RESULTS.glob("*/records.jsonl") for r in lines(p)
               if (r["extra"].get("machine") or {}).get("descheduled") is True)
    assert n == want


def test_records_come_back_as_the_analysis_reads_them():
    con = query.connect([RESULTS])
    path = RESULTS / RUN_B / "records.jsonl"
    direct = summary.records_frame(schema.read_records(path))
    got = query.records_from_query(con, f"WHERE run = '{RUN_B}'")
    pd.testing.assert_frame_equal(got.reset_index(drop=True), direct.reset_index(drop=True))
    want_pts = points.tg_points(direct, tensor_types=points.tensor_types_from_records(direct))
    pts = query.points_from_query(con, f"run = '{RUN_B}'")
    pd.testing.assert_frame_equal(pts, want_pts)
    assert len(pts) == 12 and pts.tok_s.gt(0).all()


def test_an_appended_line_is_in_the_next_query_and_the_written_file(tmp_path):
    root = tmp_path / "results"
    d = write_run(root, "run1", [rec("run1", rep=0), rec("run1", rep=1)])
    con = query.connect([root])
    db_file = tmp_path / "all.duckdb"
    query.connect([root], db_file).close()
    assert con.execute("SELECT count(*) FROM records").fetchone()[0] == 2
    with schema.RecordWriter(d / "records.jsonl") as w:
        w.write(rec("run1", rep=2, tps=30.0))
    # no re-import: the same connection, and the .duckdb file reopened, read the file as it is now
    assert con.execute("SELECT count(*), max(tokens_per_s) FROM records").fetchone() == (3, 30.0)
    write_run(root, "run2", [rec("run2")])
    assert con.execute("SELECT count(DISTINCT run) FROM records").fetchone()[0] == 2
    with duckdb.connect(str(db_file), read_only=True) as f:
        assert f.execute("SELECT count(*) FROM records").fetchone()[0] == 4
        assert f.execute("SELECT median_ts FROM bench WHERE run = 'run1'").fetchone()[0] == 10.0
        assert {v for (v,) in f.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()} \
            >= set(query.VIEWS)
        assert not f.execute("SELECT table_name FROM duckdb_tables()").fetchall()  # views only: no copy


def test_runs_with_different_columns_and_extra_keys_read_together(tmp_path):
    root = tmp_path / "results"
    write_run(root, "new", [rec("new", extra={"machine": {"cpu_s": 1.5}, "visit": {"order": ["Q4_0"]}},
                                tensor_types={"Q4_0": {"n_weights": 10, "n_bytes": 6}})])
    old = root / "old"
    old.mkdir()
    d = json.loads(rec("old").to_json())
    for k in ("cache_type_k", "cache_type_v", "rss_anon_bytes", "rss_file_bytes", "tensor_types"):
        del d[k]  # a record older than these fields
    d["extra"] = {"flash_attn_resolved": "enabled"}
    torn = json.dumps(d)[:40]
    (old / "records.jsonl").write_text(json.dumps(d) + "\n" + torn)  # and a killed writer's torn last line
    con = query.connect([root])
    got = con.execute("SELECT run, cache_type_k, extra->>'$.machine.cpu_s', extra->>'$.flash_attn_resolved', "
                      "tensor_types->'$.Q4_0'->>'$.n_bytes' FROM records ORDER BY run").fetchall()
    assert got == [("new", "f16", "1.5", None, "6"), ("old", None, None, "enabled", None)]
    # the bench view keys the old record as llama.cpp ran it then (f16 cache, mmap): the two runs meet
    assert con.execute("SELECT count(DISTINCT (type_k, type_v, use_mmap)) FROM bench").fetchone()[0] == 1
    r = run_cli("db", "--results", str(root))
    assert r.returncode == 0, r.stderr
    assert "1 unreadable line" in r.stdout and "| records  |    2 |" in r.stdout


def test_published_rows_come_in_through_the_same_glob(tmp_path):
    root = tmp_path / "results"
    pub = [rec("published", quant="Q4_K_M", test=t, tps=tps, weights="published", weights_ref="https://x/1",
               file_sha256=None, wall_ns=None, n_threads=None, device="CUDA", gpu_name=gpu)
           for gpu, t, tps in (("RTX 4090", "tg", 300.0), ("RTX 4090", "pp", 9000.0), ("RTX 3090", "tg", 200.0),
                               ("RTX 3090", "pp", 5000.0))]
    write_run(root, "published", pub)
    write_run(root, "mine", [rec("mine", quant="Q4_K_M")])
    con = query.connect([root])
    assert con.execute("SELECT weights, count(*) FROM records GROUP BY ALL ORDER BY 1").fetchall() == \
        [("published", 4), ("synthetic", 1)]
    r = run_cli("compare", "published", "--results", str(root))
    assert r.returncode == 0, r.stderr
    rows = md_rows(r.stdout)
    assert [(x["Test"], x["t/s published RTX 3090"], x["t/s published RTX 4090"], x["Speedup"]) for x in rows] == \
        [("pp512", "5000.00", "9000.00", "1.80"), ("tg128", "200.00", "300.00", "1.50")]
    assert "different machines" in r.stdout


# --- compare ------------------------------------------------------------------------------------------------

def _medians(run: str) -> dict[tuple[str, str], float]:
    by: dict[tuple[str, str], list[float]] = {}
    for r in lines(RESULTS / run / "records.jsonl"):
        if r["status"] == "ok" and r["test"] in ("pp", "tg"):
            name = f"pp{r['n_prompt']}" if r["test"] == "pp" else f"tg{r['n_gen']}"
            by.setdefault((r["quant"], name), []).append(r["tokens_per_s"])
    return {k: statistics.median(v) for k, v in by.items()}


def test_compare_two_committed_runs_medians_and_speedup():
    r = run_cli("compare", RUN_A, RUN_B[:16])
    assert r.returncode == 0, r.stderr
    rows = md_rows(r.stdout)
    a, b = _medians(RUN_A), _medians(RUN_B)
    assert len(rows) == len(a) == 24
    for x in rows:
        key = (x["Quant"], x["Test"])
        assert float(x[f"t/s {RUN_A}"]) == round(a[key], 2)
        assert float(x[f"t/s {RUN_B}"]) == round(b[key], 2)
        assert float(x["Speedup"]) == round(b[key] / a[key], 2)
    assert "Threads 2" in r.stdout and "median over 6 repetitions" in r.stdout
    # the baseline flag turns the speedup round; --where narrows the records before the medians
    r = run_cli("compare", RUN_A, RUN_B, "--baseline", RUN_B, "--where", "quant = 'Q8_0' AND test = 'tg'")
    rows = md_rows(r.stdout)
    assert len(rows) == 1 and rows[0]["Test"] == "tg64"
    assert float(rows[0]["Speedup"]) == round(a[("Q8_0", "tg64")] / b[("Q8_0", "tg64")], 2)
    assert r.stdout.index(f"t/s {RUN_B}") < r.stdout.index(f"t/s {RUN_A}")


def test_compare_warns_of_one_cpu_name_on_two_machines(tmp_path):
    """Hypervisors give one name to many processors: runs of one name with other fingerprints are flagged."""
    root = tmp_path / "results"
    write_run(root, "a", [rec("a", tps=10.0)], cpu="AMD EPYC", fingerprint="0123456789ab")
    write_run(root, "b", [rec("b", tps=20.0)], cpu="AMD EPYC", fingerprint="ba9876543210")
    write_run(root, "c", [rec("c", tps=20.0)], cpu="AMD EPYC", fingerprint="0123456789ab")
    r = run_cli("compare", "a", "b", "--results", str(root))
    assert r.returncode == 0, r.stderr
    assert "one CPU name, different machine fingerprints (0123456789ab, ba9876543210)" in r.stdout
    r = run_cli("compare", "a", "c", "--results", str(root))
    assert r.returncode == 0 and "fingerprint" not in r.stdout  # one machine


def test_compare_a_run_folder_path_and_mistakes_are_one_line():
    r = run_cli("compare", str(RESULTS / RUN_A), f"results/{RUN_B}", "--where", "quant = 'Q4_0'")
    assert r.returncode == 0, r.stderr
    assert {x["Test"] for x in md_rows(r.stdout)} == {"pp256", "tg64"}
    r = run_cli("compare", RUN_A, RUN_B.replace("synthetic", "synthetc"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "did you mean" in r.stderr and RUN_B in r.stderr
    r = run_cli("compare", "20261128T05")
    assert r.returncode == 2 and "ambiguous" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("compare", RUN_A, "--where", "no_such_column = 1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_compare_run_folders_outside_the_results_folder(tmp_path):
    a = write_run(tmp_path, "a", [rec("a", rep=i, tps=t) for i, t in enumerate((10.0, 11.0, 30.0))])
    b = write_run(tmp_path, "b", [rec("b", rep=i, tps=t) for i, t in enumerate((12.0, 13.0))], cpu="Other CPU")
    r = run_cli("compare", str(a), str(b))
    assert r.returncode == 0, r.stderr
    assert md_rows(r.stdout) == [{"Model": "llama 1B Q4_0", "Test": "tg128", "t/s a": "11.00", "t/s b": "12.50",
                                  "Speedup": "1.14"}]
    assert "different machines (Other CPU, Test CPU)" in r.stdout


def test_empty_results_folder(tmp_path):
    r = run_cli("db", "--results", str(tmp_path))
    assert r.returncode == 0 and "no records under" in r.stdout, r.stderr
    r = run_cli("compare", "--results", str(tmp_path))
    assert r.returncode == 1 and "no pp/tg records" in r.stderr
    r = run_cli("db", "--results", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no such results folder" in r.stderr


def test_db_sql_and_write(tmp_path):
    total = sum(len(lines(p)) for p in RESULTS.glob("*/records.jsonl"))
    r = run_cli("db", "-c", "SELECT count(*) AS n FROM records")
    assert r.returncode == 0, r.stderr
    assert md_rows(r.stdout) == [{"n": str(total)}]
    r = run_cli("db", "--write", str(tmp_path / "all.duckdb"))
    assert r.returncode == 0, r.stderr
    with duckdb.connect(str(tmp_path / "all.duckdb"), read_only=True) as f:
        assert f.execute("SELECT count(*) FROM records").fetchone()[0] == total
    r = run_cli("db", "--points", f"run = '{RUN_B}' AND quant = 'Q4_0'")
    assert r.returncode == 0, r.stderr
    assert "Q4_0" in r.stdout and "bytes_per_token" in r.stdout


@pytest.mark.parametrize("command", [["db"], ["compare", RUN_A], ["db", "-c", "SELECT 1"]])
def test_without_duckdb_one_line_and_exit_2(command):
    code = ("import sys; sys.modules['duckdb'] = None; from harness.cli import main; "
            f"sys.exit(main({command!r}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "pip install -e '.[cluster]'" in r.stderr and "Traceback" not in r.stderr
