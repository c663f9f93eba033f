"""The report's Serving section (harness.report.serving), on batched records made here: the batched test run for real
on the tiny model (llama.cpp, no mocks), on the CPU and on llama.cpp's RPC device; where adding users stops paying
on fixed cells with exact answers. No timing thresholds: what the tests check is what the section says and shows."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import run_cli

from harness import schema
from harness.analysis import summary
from harness.report import build, serving

FLOOR = 999999  # tok/s per user: no user of any model here reads that fast, so the floor must stop every quant


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_cache) -> tuple[Path, Path, str]:
    """A run with the batched test only (pp and tg off), as a user makes it: `harness run` on a config, which
    writes the report beside the results."""
    tmp = tmp_path_factory.mktemp("serving")
    cfg = tmp / "bt.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "bt", "model": {"source": "synthetic", "architecture": "tiny"}, "quants": ["Q4_0", "Q8_0"],
        "cache_dir": str(tiny_cache), "probes": False,
        "bench": {"n_prompt": 0, "n_gen": 0, "rounds": 1, "threads": 1, "n_batch": 32, "n_ubatch": 32,
                  "batched": {"npp": [16], "ntg": [8], "npl": [1, 2, 4], "repetitions": 2,
                              "floor_tg_per_user": FLOOR}},
    }))
    r = run_cli("run", str(cfg), "--out", str(tmp / "results"), "--no-progress")
    assert r.returncode == 0, r.stderr
    run_dir = tmp / "results"
    return run_dir, run_dir / "report", r.stdout


def _serving_md(report_dir: Path) -> str:
    md = (report_dir / "report.md").read_text()
    start = md.index("## Serving")
    return md[start:md.index("\n## ", start + 1)]


def _table(md: str) -> list[dict]:
    lines = [x for x in md.splitlines() if x.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in x.strip("|").split("|")))) for x in lines[2:]]


def test_a_batched_only_run_says_what_it_measured(cli_run):
    run_dir, report_dir, stdout = cli_run
    assert not (run_dir / "records.jsonl").read_text().strip()
    assert "(no records)" not in stdout and "batched test (medians over the repetitions):" in stdout
    md = (report_dir / "report.md").read_text()
    assert "No measurements." not in md and "Weights: unknown" not in md
    assert "Weights: **synthetic**" in md and "llama-cpp-python 0.3" in md
    assert "the batched test only, in Serving below" in md
    # the section says which weights its figures stand for
    assert "shape-faithful synthetic weights" in _serving_md(report_dir)


def test_one_row_per_quant_and_pl(cli_run):
    _, report_dir, _ = cli_run
    rows = _table(_serving_md(report_dir))
    assert [(r["quant"], r["pp"], r["tg"], r["pl (users)"], r["reps"]) for r in rows] == [
        (q, "16", "8", pl, "2") for q in ("Q4_0", "Q8_0") for pl in ("1", "2", "4")]
    for r in rows:
        for col in ("S_TG tok/s (aggregate)", "tg tok/s per user", "S_PP tok/s", "time to first token ms"):
            assert re.fullmatch(r"[\d,]+\.\d( ±[\d.]+%)?", r[col]), (col, r[col])  # median ± spread
        assert r["KV cells"] == f"{int(r['pl (users)']) * 24:,}"  # pl x (pp + tg)
        # on the CPU every buffer is the host's: no device side, no device memory
        assert r["KV + compute + output on device MiB"] == "-" and r["device used MiB"] == "-"
        parts = sum(float(r[k]) for k in ("KV MiB", "compute MiB", "output MiB"))
        assert float(r["... on host MiB"]) == pytest.approx(parts, abs=0.015)
    kv = {r["pl (users)"]: float(r["KV MiB"]) for r in rows if r["quant"] == "Q4_0"}
    assert kv["2"] == 2 * kv["1"] and kv["4"] == 4 * kv["1"]  # each user's own share of the cache


def test_the_config_floor_stops_every_quant(cli_run):
    _, report_dir, _ = cli_run
    md = _serving_md(report_dir)
    assert f"falls below the floor the config names ({FLOOR} tok/s)" in md
    for q in ("Q4_0", "Q8_0"):
        line = next(x for x in md.splitlines() if x.startswith(f"- {q}: "))
        assert line.startswith(f"- {q}: at pp 16, tg 8 even one user reads below the floor of {FLOOR} tok/s per user "
                               "(bench.batched.floor_tg_per_user)")


def test_without_a_floor_the_gain_decides(cli_run):
    run_dir, _, _ = cli_run
    bdf = summary.records_frame(schema.read_records(run_dir / "batched.jsonl"))
    sentences = serving.stop_sentences(serving.cells(bdf), floor=0.0)
    assert len(sentences) == 2  # one per quant
    for s in sentences:  # which one depends on the machine's timing: each is one of the two, said in full
        assert re.fullmatch(r"Q[48]_0: at pp 16, tg 8 (adding users stops paying after pl [12]: pl [24] gains "
                            r"[+-]\d+% aggregate S_TG over pl [12] \(under 10%\)(; their repetitions. ranges overlap, "
                            r"so the repetitions do not tell the two apart)?|still paying at pl 4, the most "
                            r"users measured \([+-]\d+% aggregate S_TG over the pl before it, each user [\d,.]+ "
                            r"tok/s\))\.", s), s


def test_the_figure_and_the_csv(cli_run):
    _, report_dir, _ = cli_run
    png = (report_dir / "serving.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert "![" in _serving_md(report_dir) and "(serving.png)" in _serving_md(report_dir)
    assert "The batched test: aggregate generation speed" in (report_dir / "report.html").read_text()
    csv = pd.read_csv(report_dir / "serving.csv")
    assert len(csv) == 6 and set(csv.pl) == {1, 2, 4}


def test_the_page_beside_it_on_the_cpu(cli_run):
    _, report_dir, _ = cli_run
    md = _serving_md(report_dir)
    line = next(x for x in md.splitlines() if x.startswith("The page prints one tok/s per GPU"))
    assert "single stream, batch 1" in line and "NVIDIA GeForce RTX 4090 799" in line
    assert "No GPU measured this run's files: the page's figures are for GPUs." in line
    assert "These files are not Llama 3.2 1B" in line
    assert "A batch-1 number is not a serving number" in line
    assert re.search(r"Here, Q4_0 at pp 16, tg 8: pl 1 reads [\d,.]+ tok/s; pl 4 users together read", line)


def test_the_page_beside_it_on_its_gpu(cli_run):
    """Where the page prints a figure for the device and the run measured Q4_K_M of its model, the figure stands
    beside the measured pl 1 (the cells here are the tiny model's, named as the page's quant)."""
    run_dir, _, _ = cli_run
    c = serving.cells(summary.records_frame(schema.read_records(run_dir / "batched.jsonl")))
    c = c.assign(quant=c.quant.replace({"Q4_0": "Q4_K_M"}))
    line = serving.page_line(c, {"kind": "gpu", "name": "NVIDIA GeForce RTX 4090"}, page_model=True)
    assert "For this device (NVIDIA GeForce RTX 4090) it prints 799 tok/s." in line
    assert re.search(r"Here, Q4_K_M at pp 16, tg 8: pl 1 reads [\d,.]+ tok/s \(the page: 799\); pl 4", line)
    assert "A batch-1 number is not a serving number" in line and "not Llama 3.2 1B" not in line
    other = serving.page_line(c, {"kind": "gpu", "name": "NVIDIA A100-SXM4-80GB"}, page_model=True)
    assert "It prints none for this device (NVIDIA A100-SXM4-80GB)." in other and "(the page:" not in other


def _cells(s_tg, per_user=None) -> pd.DataFrame:
    pls = [1, 2, 4, 8][:len(s_tg)]
    per_user = per_user or [s / p for s, p in zip(s_tg, pls)]
    return pd.DataFrame({"quant": "Q4_0", "pp": 32, "tg": 16, "pps": False, "pl": pls, "s_tg": s_tg,
                         "per_user": per_user})


@pytest.mark.parametrize("s_tg, per_user, floor, want", [
    ([100, 180, 195, 400], None, 0, (2, 4, "gain")),  # +8% at pl 4: stops after pl 2, though pl 8 would pay again
    ([100, 180, 250, 300], None, 0, (None, None, None)),  # +20% at pl 8: still paying
    ([100, 180, 250, 274], None, 0, (4, 8, "gain")),  # +9.6%
    ([100, 190, 380, 760], None, 0, (None, None, None)),  # doubling all the way: still paying at pl 8
    ([100, 190, 380, 760], [100, 95, 60, 40], 50, (4, 8, "floor")),  # pays in aggregate, but a user falls below 50
    ([100, 190, 380, 760], [40, 95, 60, 40], 50, (None, 1, "floor")),  # even one user is below the floor
    ([100, 105], None, 0, (1, 2, "gain")),  # +5%
    ([100, 90], None, 0, (1, 2, "gain")),  # slower with more users
])
def test_stop_paying_on_fixed_cells(s_tg, per_user, floor, want):
    s = serving.stop_paying(_cells(s_tg, per_user), floor)
    assert (s["at"], s["next"], s["why"]) == want


def test_stop_sentences_on_fixed_cells():
    assert serving.stop_sentences(_cells([100, 180, 195]), 0) == [
        "Q4_0: at pp 32, tg 16 adding users stops paying after pl 2: pl 4 gains +8% aggregate S_TG over pl 2 "
        "(under 10%)."]
    assert serving.stop_sentences(_cells([100, 190, 380], [100, 95, 30]), 50) == [
        "Q4_0: at pp 32, tg 16 adding users stops paying after pl 2: at pl 4 each user reads 30.0 tok/s, below the "
        "floor of 50 tok/s per user (bench.batched.floor_tg_per_user)."]
    assert serving.stop_sentences(_cells([100, 190]), 0) == [
        "Q4_0: at pp 32, tg 16 still paying at pl 2, the most users measured (+90% aggregate S_TG over the pl before "
        "it, each user 95.0 tok/s)."]


def test_floor_is_read_from_the_resolved_config(tmp_path, cli_run):
    run_dir, _, _ = cli_run
    assert serving.floor_of(run_dir) == FLOOR
    assert serving.floor_of(tmp_path) == 0.0  # a folder without config.resolved.yaml: no floor


def test_on_the_rpc_device(tmp_path, tiny_file):
    """On a device the cell's memory is split by side (the users' KV and the compute on the device, the output on
    the host) and the device memory in use is shown; the page's figures are said to be for GPUs."""
    from harness import config
    from harness.measure import runner

    cfg = config.from_dict({
        "name": "rpc", "model": {"source": "local", "files": {"Q4_0": str(tiny_file("Q4_0"))}},
        "bench": {"n_prompt": 0, "n_gen": 0, "rounds": 1, "threads": 1, "n_batch": 32, "n_ubatch": 32, "rpc": "local",
                  "batched": {"npp": [16], "ntg": [8], "npl": [1, 2], "repetitions": 1}},
        "probes": {"enabled": False},
    })
    run_dir, errors = runner.run(cfg, out=tmp_path / "rpc", progress=False, echo=lambda s: None)
    assert errors == {}
    bdf = summary.records_frame(schema.read_records(run_dir / "batched.jsonl"))
    df = summary.records_frame(schema.read_records(run_dir / "records.jsonl"))
    env = json.loads((run_dir / "env.json").read_text())
    _, cal, figs, md, _ = build(df, env, "rpc", str(run_dir), batched_df=bdf)
    assert cal["device"]["kind"] == "rpc" and "serving.png" in figs
    sec = md[md.index("## Serving"):]
    rows = _table(sec[:sec.index("\n## ")])
    assert [r["pl (users)"] for r in rows] == ["1", "2"]
    for r in rows:
        on_dev = float(r["KV + compute + output on device MiB"])
        assert on_dev >= float(r["KV MiB"]) > 0 and not math.isnan(float(r["device used MiB"].replace(",", "")))
    assert "on llama.cpp's RPC device" in sec
    assert ("This run measured its files on llama.cpp's RPC device, whose speed is its server's and the network's, "
            "not a GPU's: no GPU measured them, and the page's figures are for GPUs.") in sec
    assert "A batch-1 number is not a serving number" in sec


def test_a_gain_within_the_noise_is_said_so():
    c = _cells([100, 105]).assign(s_tg_min=[90, 95], s_tg_max=[110, 115])
    assert serving.stop_paying(c)["overlap"] is True
    assert serving.stop_sentences(c) == [
        "Q4_0: at pp 32, tg 16 adding users stops paying after pl 1: pl 2 gains +5% aggregate S_TG over pl 1 (under "
        "10%); their repetitions' ranges overlap, so the repetitions do not tell the two apart."]
    assert serving.stop_paying(c.assign(s_tg_min=[99, 104], s_tg_max=[101, 106]))["overlap"] is False
