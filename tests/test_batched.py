"""The batched test (harness.measure.batched), run for real on the tiny model: llama-batched-bench's cells, fields and
formulas, a context per cell holding what its users need, resume by cell, bad input in one line, and the same test
on llama.cpp's RPC device (loopback: the offload path, not a GPU's speed). No timing thresholds."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

from harness import config, schema
from harness.measure import batched

# llama-batched-bench's jsonl fields (tools/batched-bench/batched-bench.cpp of the pinned llama.cpp)
JSONL = ("n_kv_max", "n_batch", "n_ubatch", "flash_attn", "is_pp_shared", "n_gpu_layers", "n_threads",
         "n_threads_batch", "pp", "tg", "pl", "n_kv", "t_pp", "speed_pp", "t_tg", "speed_tg", "t", "speed")


def _run(tmp_path: Path, tiny_file, name: str, **batched_kw) -> tuple[list[schema.Record], Path, list[str]]:
    from harness.measure import runner

    rpc = batched_kw.pop("rpc", "")
    cfg = config.from_dict({
        "name": name, "model": {"source": "local", "files": {"Q4_K_M": str(tiny_file("Q4_K_M"))}},
        "bench": {"n_prompt": 0, "n_gen": 0, "rounds": 1, "n_batch": 32, "n_ubatch": 32, "threads": 1, "rpc": rpc,
                  "batched": {"npp": [24], "ntg": [8], "npl": [1, 2, 4], "repetitions": 1, **batched_kw}},
        "probes": {"enabled": False},
    })
    said: list[str] = []
    run_dir, errors = runner.run(cfg, out=tmp_path / name, progress=False, echo=said.append)
    assert errors == {}
    return schema.read_records(run_dir / "batched.jsonl"), run_dir, said


@pytest.fixture(scope="module")
def split(tmp_path_factory, tiny_file):
    return _run(tmp_path_factory.mktemp("split"), tiny_file, "split")


def test_every_cell_has_llama_batched_bench_fields_and_formulas(split):
    recs, run_dir, _ = split
    assert [(r.batched["pp"], r.batched["tg"], r.batched["pl"]) for r in recs] == [(24, 8, 1), (24, 8, 2), (24, 8, 4)]
    assert not (run_dir / "records.jsonl").read_text().strip()  # pp/tg off: nothing else measured
    for r in recs:
        b = r.batched
        assert r.status == "ok" and r.test == "batched" and set(JSONL) <= set(b)
        pl, pp, tg = b["pl"], b["pp"], b["tg"]
        assert (r.n_prompt, r.n_gen) == (pp, tg) and b["is_pp_shared"] == 0 and b["n_kv"] == pl * (pp + tg)
        assert b["speed_pp"] == pytest.approx(pl * pp / b["t_pp"])
        assert b["speed_tg"] == pytest.approx(pl * tg / b["t_tg"])
        assert b["t"] == pytest.approx(b["t_pp"] + b["t_tg"])
        assert b["speed"] == pytest.approx((pl * pp + pl * tg) / b["t"])
        assert b["speed_tg_per_user"] == pytest.approx(b["speed_tg"] / pl) and b["ttft_s"] == b["t_pp"]
        assert r.tokens_per_s == pytest.approx(b["speed"]) and r.wall_ns == pytest.approx(b["t"] * 1e9, abs=1)
        # flash attention auto is -1, as llama-batched-bench prints it
        assert (b["n_threads"], b["n_batch"], b["n_ubatch"], b["flash_attn"]) == (1, 32, 32, -1)
        # a context of what the cell needs, for pl sequences: llama.cpp pads each one's share to 256 cells
        assert b["n_seq_max"] == pl and b["kv_unified"] is False and b["n_kv_max"] == r.n_ctx == pl * 256


def test_kv_memory_is_per_user(split):
    recs, _, _ = split
    kv = {r.batched["pl"]: r.kv_bytes for r in recs}
    assert kv[1] > 0 and kv[2] == 2 * kv[1] and kv[4] == 4 * kv[1]  # each user's 256 cells, to the byte
    for r in recs:
        assert r.memory_breakdown and sum(v["context"] for v in r.memory_breakdown.values()) == r.kv_bytes


def test_shared_prompt_unified_and_fixed_context(tmp_path, tiny_file):
    recs, _, said = _run(tmp_path, tiny_file, "pps", pps=True, kv_unified=True, ctx=64, npl=[1, 2, 4, 8])
    # -pps in a unified cache needs pp + pl*tg cells: 24 + 8*8 = 88 > 64, so pl 8 is skipped, and said so
    assert [r.batched["pl"] for r in recs] == [1, 2, 4]
    assert any("pl 8: needs 88 KV cells, more than -c 64: skipped" in s for s in said)
    for r in recs:
        b = r.batched
        assert b["is_pp_shared"] == 1 and b["kv_unified"] is True and b["n_kv"] == 24 + b["pl"] * 8
        assert b["speed_pp"] == pytest.approx(24 / b["t_pp"])  # one prompt: pp / t_pp
        assert b["n_seq_max"] == 8 and b["n_kv_max"] == 256  # one context for all cells, for max(npl) users


def test_resume_measures_only_missing_cells(tmp_path, tiny_file):
    recs, run_dir, _ = _run(tmp_path, tiny_file, "res")
    path = run_dir / "batched.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n")  # the pl 4 cell lost
    r = run_cli("run", str(run_dir / "config.resolved.yaml"), "--resume", str(run_dir), "--no-report", "--no-progress")
    assert r.returncode == 0, r.stderr
    again = schema.read_records(path)
    assert [x.batched["pl"] for x in again] == [1, 2, 4]
    assert [x.utc for x in again[:2]] == [x.utc for x in recs[:2]]  # kept, not measured again


def test_a_cell_llama_cpp_refuses_is_an_error_record_and_the_rest_go_on(tmp_path, tiny_file):
    from harness.measure import runner

    cfg = config.from_dict({
        "name": "bad", "model": {"source": "local", "files": {"Q4_K_M": str(tiny_file("Q4_K_M")),
                                                              "Q8_0": str(tiny_file("Q8_0"))}},
        # a quantized V cache without flash attention: llama.cpp makes no such context
        "bench": {"n_prompt": 0, "n_gen": 0, "rounds": 1, "threads": 1, "flash_attn": "off", "cache_type_v": ["q8_0"],
                  "batched": {"npp": [8], "ntg": [4], "npl": [1, 2], "repetitions": 1}},
        "probes": {"enabled": False},
    })
    run_dir, _ = runner.run(cfg, out=tmp_path / "bad", progress=False, echo=lambda s: None)
    recs = schema.read_records(run_dir / "batched.jsonl")
    assert sorted((r.quant, r.batched is None, r.status) for r in recs) == [
        ("Q4_K_M", True, "error"), ("Q4_K_M", True, "error"), ("Q8_0", True, "error"), ("Q8_0", True, "error")]
    assert all(r.error.startswith(("pp8 tg4 pl1: ", "pp8 tg4 pl2: ")) and "users need a context" in r.error
               for r in recs)


@pytest.mark.parametrize("args, says", [
    (["-npl", "1", "-pps"], "-npl has only 1 user"),
    (["-npl", "1,4", "-npp", "0"], "bench.batched.npp[0] must be >= 1"),
    (["-npl", "1,300"], "at most 256"),
])
def test_bad_flags_are_one_line(args, says, tiny_file):
    r = run_cli("run", "-m", str(tiny_file("Q4_0")), *args, "--no-report")
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]  # (-m says first how it labelled the file)
    assert len(errors) == 1 and says in errors[0]


def test_cells_follow_llama_batched_bench_order():
    bench = {"batched": {"npp": [128, 256], "ntg": [16], "npl": [1, 8], "pps": False, "repetitions": 2}}
    cells = batched.cells(bench)
    assert [(c.pp, c.pl, c.rep) for c in cells] == [(128, 1, 0), (128, 8, 0), (256, 1, 0), (256, 8, 0),
                                                    (128, 1, 1), (128, 8, 1), (256, 1, 1), (256, 8, 1)]
    assert batched.too_big({"batched": {**bench["batched"], "ctx": 1100}}) == [  # 8 * (128 + 16) = 1152 > 1100
        batched.BatchedCell(128, 16, 8, False, 0), batched.BatchedCell(256, 16, 8, False, 0)]


def test_on_the_rpc_device(tmp_path, tiny_file):
    recs, _, _ = _run(tmp_path, tiny_file, "rpc", rpc="local", npl=[1, 4])
    assert [r.batched["pl"] for r in recs] == [1, 4]
    for r in recs:
        assert r.status == "ok" and r.device == "rpc"
        assert r.kv_buffers and all(k.startswith("RPC0[") for k in r.kv_buffers)  # the users' KV on the device
        assert r.device_used_bytes > 0 and "after_test" in r.device_memory
    assert recs[1].kv_bytes == 4 * recs[0].kv_bytes


def test_small_cells_and_more_users_than_the_batch(tmp_path, tiny_file):
    # a cell needing fewer KV cells than the 16-token warm-up: llama.cpp lowers the context's batch to 12 (it aborts
    # on a bigger decode); the warm-up follows it down
    recs, _, _ = _run(tmp_path, tiny_file, "small", npp=[4], ntg=[2], npl=[2])
    assert [(r.status, r.batched["n_kv"]) for r in recs] == [("ok", 12)]
    r = run_cli("run", "-m", str(tiny_file("Q4_0")), "-npl", "2,32", "-b", "16", "--no-report")
    assert r.returncode == 2 and "more users than the batch holds (-b 16" in r.stderr


def test_rounds_share_the_repetitions(tmp_path, tiny_file):
    from harness.measure import runner

    cfg = config.from_dict({
        "name": "rounds", "model": {"source": "local", "files": {"Q4_K_M": str(tiny_file("Q4_K_M"))}},
        "bench": {"n_prompt": 0, "n_gen": 0, "rounds": 2, "repetitions": 2, "n_batch": 32, "n_ubatch": 32,
                  "threads": 1, "batched": {"npp": [8], "ntg": [4], "npl": [1, 2], "repetitions": 3}},
        "probes": {"enabled": False},
    })
    run_dir, _ = runner.run(cfg, out=tmp_path / "r", progress=False, echo=lambda s: None)
    recs = schema.read_records(run_dir / "batched.jsonl")
    # 3 repetitions over 2 rounds: 0 and 1 on the first visit, 2 on the second; each cell and repetition once
    assert sorted((r.batched["pl"], r.rep, r.extra["visit"]["round"]) for r in recs) == [
        (1, 0, 1), (1, 1, 1), (1, 2, 2), (2, 0, 1), (2, 1, 1), (2, 2, 2)]


def test_only_the_context_quants_run_the_memory_test_once(tmp_path, tiny_file):
    """Memory-test contexts and batched cells share one path: a quant outside bench.context_quants runs no context,
    and over two rounds each context is made once (a regression made every quant run them on every visit)."""
    from harness.measure import runner

    cfg = config.from_dict({
        "name": "cq", "model": {"source": "local", "files": {q: str(tiny_file(q)) for q in ("Q4_K_M", "Q8_0")}},
        "bench": {"n_prompt": 8, "n_gen": 4, "rounds": 2, "repetitions": 2, "n_batch": 32, "n_ubatch": 32,
                  "threads": 1, "contexts": [256, 512], "context_quants": ["Q4_K_M"],
                  "batched": {"npp": [8], "ntg": [4], "npl": [2], "repetitions": 1}},
        "probes": {"enabled": False},
    })
    run_dir, _ = runner.run(cfg, out=tmp_path / "cq", progress=False, echo=lambda s: None)
    mem = schema.read_records(run_dir / "contexts.jsonl")
    assert sorted((r.quant, r.n_ctx) for r in mem) == [("Q4_K_M", 256), ("Q4_K_M", 512)]
    bat = schema.read_records(run_dir / "batched.jsonl")
    assert sorted((r.quant, r.rep) for r in bat) == [("Q4_K_M", 0), ("Q8_0", 0)]
