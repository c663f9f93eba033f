"""Memory at concurrency, exact: the contexts the batched test really makes (n_seq_max = pl users, split evenly
between them or one unified KV cache, -pps) against llama.cpp's arithmetic for the same contexts with nothing
allocated (a no_alloc model: ``breakdown.Simulator``, ``harness simulate -np``), to the byte for every buffer type
(model, context (KV), compute). On the CPU the weights are read, not mapped (with mmap, llama.cpp's mapped range
also holds the file's copy of each repacked tensor, which the no-mmap simulation does not: tests/test_offload.py);
on llama.cpp's RPC device on loopback as on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import config, schema

PP, TG = 16, 4


def _batched(tmp_path: Path, tiny_file, name: str, npl: list[int], **over) -> list:
    """The batched test of the tiny Q4_K_M: one repetition of pp PP, tg TG for each of `npl`; its records."""
    from harness.measure import runner

    batched = {"npp": [PP], "ntg": [TG], "npl": npl, "repetitions": 1, **over.pop("batched", {})}
    cfg = config.from_dict({
        "name": name, "model": {"source": "local", "files": {"Q4_K_M": str(tiny_file("Q4_K_M"))}},
        "bench": {"n_prompt": 0, "n_gen": 0, "repetitions": 1, "rounds": 1, "n_batch": 16, "n_ubatch": 16,
                  "threads": 1, "batched": batched, **over},
        "probes": {"enabled": False},
    })
    run_dir, errors = runner.run(cfg, out=tmp_path / name, progress=False, echo=lambda s: None)
    assert errors == {}
    recs = schema.read_records(run_dir / "batched.jsonl")
    assert [r.status for r in recs] == ["ok"] * len(npl), [r.error for r in recs]
    return recs


def _exact(r) -> None:
    """The real context's breakdown equals the simulated one's, buffer type by buffer type, to the byte."""
    from harness.measure.breakdown import shim_error

    if r.memory_breakdown is None:
        pytest.skip(f"no memory-breakdown shim here ({shim_error()})")
    real, sim = r.memory_breakdown, r.memory_breakdown_simulated
    assert sim is not None and set(real) == set(sim), (r.batched["pl"], real, sim)
    for buft in real:
        for k in ("model", "context", "compute", "host"):
            assert real[buft][k] == sim[buft][k], (r.batched["pl"], buft, k, real[buft][k], sim[buft][k])
    assert _kv(real) > 0
    assert 0 < r.simulate_ns < 5e9


def _kv(bd: dict) -> int:
    return sum(d["context"] for d in bd.values())


@pytest.fixture(scope="module")
def split(tmp_path_factory, tiny_file):
    """pl 1, 2, 4 users, each cell its own context with the KV cache split evenly between them."""
    return _batched(tmp_path_factory.mktemp("split"), tiny_file, "split", [1, 2, 4], mmap=False)


def test_batched_contexts_match_the_simulation_to_the_byte(split):
    by = {r.batched["pl"]: r for r in split}
    for r in split:
        _exact(r)
        assert r.batched["n_seq_max"] == r.batched["pl"] and r.batched["kv_unified"] is False
    # llama.cpp pads n_ctx to 256 and each user's context (n_ctx / n_seq_max) to 256: pl (16 + 4) = 20, 40, 80
    # cells asked, 256 made per user, so the KV cache grows with the users, not with what they asked for
    assert [by[pl].n_ctx for pl in (1, 2, 4)] == [256, 512, 1024]
    kv1 = _kv(by[1].memory_breakdown)
    assert [_kv(by[pl].memory_breakdown) for pl in (1, 2, 4)] == [kv1, 2 * kv1, 4 * kv1]
    # the log's KV buffers (MiB, two decimals) say the same
    for r in split:
        assert abs(sum(r.kv_buffers.values()) - _kv(r.memory_breakdown)) <= 0.005 * 2**20


def test_unified_and_shared_prompt_contexts_match_the_simulation(tmp_path, tiny_file, split):
    uni = _batched(tmp_path, tiny_file, "unified", [4], mmap=False, batched={"kv_unified": True})
    pps = _batched(tmp_path, tiny_file, "pps", [4], mmap=False, batched={"pps": True})
    for r in uni + pps:
        _exact(r)
    assert uni[0].batched["kv_unified"] is True and pps[0].batched["is_pp_shared"] == 1
    # unified: one cache of the 80 cells asked, padded to 256, shared by the 4 users: a quarter of the split one's
    split4 = next(r for r in split if r.batched["pl"] == 4)
    assert uni[0].n_ctx == 256 and 4 * _kv(uni[0].memory_breakdown) == _kv(split4.memory_breakdown)
    # -pps split by sequence: pl*pp + pl*tg = 80 cells asked, as without it
    assert pps[0].n_ctx == 1024 and _kv(pps[0].memory_breakdown) == _kv(split4.memory_breakdown)


def test_simulate_np_prints_the_batched_contexts_kv_bytes(split, tiny_file):
    from conftest import run_cli

    r4 = next(r for r in split if r.batched["pl"] == 4)
    asked = r4.batched["n_kv"]  # what the cell asked for: pl (pp + tg)
    assert asked == 4 * (PP + TG)
    f = str(tiny_file("Q4_K_M"))
    p = run_cli("simulate", "-m", f, "-c", str(asked), "-np", "1,4", "-ub", "16", "--json")
    assert p.returncode == 0, p.stderr
    cells = {c["n_seq_max"]: c for c in map(json.loads, p.stdout.splitlines())}
    assert set(cells) == {1, 4}
    c = cells[4]
    assert (c["n_ctx"], c["llama_n_ctx"], c["llama_n_ctx_seq"], c["kv_unified"]) == (asked, 1024, 256, False)
    assert {k: v["context"] for k, v in c["breakdown"].items()} == \
        {k: v["context"] for k, v in r4.memory_breakdown.items()}
    assert (cells[1]["llama_n_ctx"], cells[1]["llama_n_ctx_seq"]) == (256, 256)
    # the table: np and the context per user, and a note where llama.cpp's n_ctx is not the one asked
    p = run_cli("simulate", "-m", f, "-c", str(asked), "-np", "4")
    assert p.returncode == 0, p.stderr
    row = next(x.split() for x in p.stdout.splitlines() if x.startswith("tiny-Q4_K_M"))
    assert row[1:4] == ["1024", "4", "256"]
    assert row[9] == f"{_kv(r4.memory_breakdown) / 2**20:,.2f}"  # KV host MiB
    assert f"-c {asked} -np 4: llama.cpp makes n_ctx 1024" in p.stdout
    p = run_cli("simulate", "-m", f, "-c", "1000", "-np", "3", "-kvu", "--json")
    c = json.loads(p.stdout)
    assert (c["llama_n_ctx"], c["llama_n_ctx_seq"], c["kv_unified"]) == (1024, 1024, True)
    p = run_cli("simulate", "-m", f, "-c", "80", "-np", "81")  # more users than the context's output rows: a row
    assert p.returncode == 0 and "refused: " in p.stdout and "aborts on more" in p.stdout, p.stdout + p.stderr


def test_simulator_splits_the_context_as_llama_cpp_does(tiny_file):
    """Fixed inputs, llama.cpp's answers (src/llama-context.cpp: n_ctx padded to 256; split: n_ctx / n_seq_max
    padded to 256, n_ctx then n_seq_max times that)."""
    from harness.measure.breakdown import SimulateError, Simulator, max_seq

    sim = Simulator(str(tiny_file("Q4_K_M")), {"n_batch": 512, "n_ubatch": 16, "threads": 1})
    try:
        kv = ("f16", "f16")
        made = {(n, np_, u): sim.context(n, kv, "on", n_seq_max=np_, kv_unified=u)
                for n, np_, u in ((1000, 3, False), (1000, 3, True), (512, 64, False), (4096, 4, False))}
        assert {k: (c.n_ctx, c.n_ctx_seq) for k, c in made.items()} == {
            (1000, 3, False): (1536, 512), (1000, 3, True): (1024, 1024), (512, 64, False): (16384, 256),
            (4096, 4, False): (4096, 1024)}
        # the split KV cache is n_ctx's, whatever the users: 3 x 512 cells split, 1024 unified
        assert 2 * _kv(made[(1000, 3, False)].breakdown) == 3 * _kv(made[(1000, 3, True)].breakdown)
        bd, ns = sim.cell(256, kv, "on")  # the memory test's call, one sequence: unchanged
        assert bd == sim.context(256, kv, "on", n_seq_max=1, kv_unified=False).breakdown and ns > 0
        with pytest.raises(SimulateError, match="257 sequences"):  # llama.cpp's LLAMA_MAX_SEQ
            sim.context(4096, kv, "on", n_seq_max=max_seq() + 1)
        # one output row per sequence in min(n_ctx, n_batch): llama.cpp would abort the process, the simulator says so
        with pytest.raises(SimulateError, match=r"at most min\(n_ctx, n_batch 512\) = 80 sequences"):
            sim.context(80, kv, "on", n_seq_max=81)
    finally:
        sim.free()
    assert max_seq() == 256  # LLAMA_MAX_SEQ of the pinned llama.cpp


def test_simulate_np_bad_input_is_one_line(tiny_file):
    from conftest import run_cli

    f = str(tiny_file("Q4_K_M"))
    for np_, said in (("0", "must be positive"), ("257", "at most 256 parallel sequences"),
                      ("two", "comma-separated integers")):
        p = run_cli("simulate", "-m", f, "-np", np_)
        assert p.returncode == 2 and said in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1


def test_batched_contexts_on_the_rpc_device_match_the_simulation(tmp_path, tiny_file):
    """On llama.cpp's RPC device (a loopback server, offloaded as to a GPU): the KV cache and compute buffer of
    pl users on the device, simulated there to the byte (the host's token embeddings read, not mapped: a mapped
    copy is CPU_Mapped, the simulation's CPU)."""
    recs = _batched(tmp_path, tiny_file, "rpc", [1, 4], rpc="local", n_gpu_layers=-1, mmap=False)
    for r in recs:
        assert r.device == "rpc"
        _exact(r)
        dev = {k: d for k, d in r.memory_breakdown.items() if k.startswith("RPC")}
        assert len(dev) == 1 and next(iter(dev.values()))["context"] == _kv(r.memory_breakdown)
    assert _kv(recs[1].memory_breakdown) == 4 * _kv(recs[0].memory_breakdown)
