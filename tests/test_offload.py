"""The offload path, run for real on llama.cpp's RPC device: a loopback server serving this machine's CPU, which
llama.cpp offloads to exactly as to a GPU ("offloaded 9/9 layers to GPU", RPC0 buffers). Its speed is not a
GPU's; what these tests check is where the weights, KV and compute buffers go and what device memory says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import config, schema
from harness.llamalog import offloaded_layers

MIB = 1024 * 1024
LOG_ROUNDING = 0.005 * MIB  # llama.cpp logs MiB with two decimals


def header_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor as the file's header gives them."""
    import gguf

    return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}


def _run(tmp_path: Path, tiny_file, ngl: int, contexts=(256,), name="off") -> tuple[list, list, Path]:
    from harness.measure import runner

    cfg = config.from_dict({
        "name": name, "model": {"source": "local", "files": {"Q4_K_M": str(tiny_file("Q4_K_M"))}},
        "bench": {"n_prompt": 16, "n_gen": 4, "repetitions": 1, "rounds": 1, "n_batch": 16, "n_ubatch": 16,
                  "n_gpu_layers": ngl, "rpc": "local", "contexts": list(contexts), "threads": 1},
        "probes": {"enabled": False},
    })
    out = tmp_path / name
    run_dir, errors = runner.run(cfg, out=out, progress=False, echo=lambda s: None)
    assert errors == {}
    recs = schema.read_records(run_dir / "records.jsonl")
    mem = schema.read_records(run_dir / "contexts.jsonl") if (run_dir / "contexts.jsonl").exists() else []
    return recs, mem, run_dir


@pytest.fixture(scope="module")
def full(tmp_path_factory, tiny_file):
    return _run(tmp_path_factory.mktemp("full"), tiny_file, -1, name="full")


def test_offloaded_layers_parsed_from_the_log():
    assert offloaded_layers(["load_tensors: offloaded 9/9 layers to GPU"]) == (9, 9)
    assert offloaded_layers(["llama_model_load: x", "load_tensors: offloaded 4/17 layers to GPU"]) == (4, 17)
    assert offloaded_layers(["load_tensors: CPU_Mapped model buffer size = 1.00 MiB"]) is None


def test_bench_rpc_is_validated():
    with pytest.raises(config.ConfigError, match="HOST:PORT"):
        config.from_dict({"name": "x", "bench": {"rpc": "127.0.0.1"}})
    with pytest.raises(config.ConfigError, match="HOST:PORT"):
        config.from_dict({"name": "x", "bench": {"rpc": "a:1,b:99999"}})
    assert config.from_dict({"name": "x", "bench": {"rpc": " a:1 , b:2 "}}).bench.rpc == "a:1,b:2"
    assert config.from_dict({"name": "x", "bench": {"rpc": "local"}}).bench.rpc == "local"


def test_full_offload_puts_every_layer_on_the_rpc_device(full, tiny_file):
    recs, mem, _ = full
    assert recs and all(r.status == "ok" for r in recs + mem)
    hb = header_bytes(tiny_file("Q4_K_M"))
    for r in recs + mem:
        assert r.device == "rpc"
        assert r.n_layers_offloaded == r.n_layers_offloadable and r.n_layers_offloaded > 0
        rpc = {k: v for k, v in r.model_buffers.items() if k.startswith("RPC0[")}
        host = {k: v for k, v in r.model_buffers.items() if k.startswith("CPU")}
        assert len(rpc) == 1
        # every tensor on the device but the input embeddings, which llama.cpp keeps on the host; with tied
        # embeddings (no output.weight: Llama 3.2 1B's and the tiny model's) the output layer is token_embd, and
        # that copy goes to the device: token_embd is then held twice, once on each side
        on_device = sum(v for k, v in hb.items() if k != "token_embd.weight")
        if "output.weight" not in hb:
            on_device += hb["token_embd.weight"]
        assert abs(next(iter(rpc.values())) - on_device) <= LOG_ROUNDING + 32 * len(hb)
        assert abs(sum(host.values()) - hb["token_embd.weight"]) <= LOG_ROUNDING + 64
        assert set(r.kv_buffers) == set(rpc)  # the KV cache on the device too
        # the devices llama.cpp could offload to, by their own names and descriptions (a GPU build's own device,
        # CUDA0 or Vulkan0, may stand beside the server's)
        rpc_devs = [g for g in r.extra["gpu_devices"] if g["name"].startswith("RPC")]
        assert [(g["name"], g["kind"]) for g in rpc_devs] == [("RPC0", "gpu")]
        assert rpc_devs[0]["description"].startswith("127.0.0.1:")


def test_device_memory_moves_by_at_least_the_device_buffers(full):
    recs, mem, _ = full
    for r in recs + mem:
        assert r.device_used_source == "process"  # the harness's own RPC server: this run's own memory
        dm = r.device_memory
        assert {"before_load", "after_load", "after_context"} <= set(dm)
        assert all("RPC0" in stage["devices"] for stage in dm.values())
        dev = lambda bufs: sum(v for k, v in bufs.items() if k.startswith("RPC0["))  # noqa: E731
        # the server holds the model's buffers after load, and the KV cache (cleared, so written) with the context
        grew_load = dm["after_load"]["process_bytes"] - dm["before_load"]["process_bytes"]
        assert grew_load >= dev(r.model_buffers) - LOG_ROUNDING
        assert r.device_used_bytes >= dev(r.model_buffers) + dev(r.kv_buffers) - 2 * LOG_ROUNDING
    # the memory test decoded once before it was read (cuBLAS and pools are allocated on a first decode)
    assert mem and all("after_decode" in r.device_memory and r.extra["decoded_tokens"] >= 1 for r in mem)


def test_no_offload_keeps_everything_on_the_host(tmp_path, tiny_file):
    recs, _, _ = _run(tmp_path, tiny_file, 0, contexts=(), name="host")
    for r in recs:
        assert r.device == "cpu"
        assert r.n_layers_offloaded == 0
        assert not any(k.startswith("RPC") for b in (r.model_buffers, r.kv_buffers) for k in b)


def test_partial_offload_is_recorded_as_partial(tmp_path, tiny_file, full):
    recs, _, run_dir = _run(tmp_path, tiny_file, 4, contexts=(), name="part")
    full_rpc = sum(v for k, v in full[0][0].model_buffers.items() if k.startswith("RPC0["))
    for r in recs:
        assert r.device == "rpc" and (r.n_layers_offloaded, r.extra.get("partial_offload")) == (4, True)
        assert r.n_layers_offloadable > 4
        rpc = sum(v for k, v in r.model_buffers.items() if k.startswith("RPC0["))
        assert 0 < rpc < full_rpc
    from harness.analysis import summary

    table = summary.text_table(summary.per_quant(summary.records_frame(recs)))
    assert f"rpc (4/{recs[0].n_layers_offloadable} layers)" in table
    assert summary.RPC_NOTE in table


def test_report_of_an_rpc_run_has_device_sections_and_no_gpu_verdicts(full):
    from harness.report import write_report

    _, _, run_dir = full
    out = write_report(run_dir)
    md = (Path(out) / "report.md").read_text()
    assert "llama.cpp RPC device (127.0.0.1:" in md and "not a GPU's figure" in md
    assert "## On the device" in md
    rows = [x for x in md.splitlines() if x.startswith("| Q4_K_M | rpc")]
    assert {x.split(" | ")[1] for x in rows} == {"rpc, pp", "rpc, tg", "rpc, mem"}
    assert "| 9/9 |" in rows[0]
    # no verdict against the page's GPU rule: the speed table's verdict column is empty
    speed = next(x for x in md.splitlines() if x.startswith("| Q4_K_M | 0 |"))
    assert "inside" not in speed and "outside" not in speed
    env = json.loads((run_dir / "env.json").read_text())
    assert env["rpc"]["local_server"] is True


def test_devices_list_has_the_cpu_and_an_added_server():
    from harness.measure import devices

    listed = devices.list_devices()
    assert [d.kind for d in listed].count("cpu") == 1  # a GPU build lists its GPUs too (before the CPU)
    assert not any(d.name.startswith("RPC") for d in listed)  # no server added yet
    with pytest.raises(devices.DeviceError, match="nothing answers"):
        devices.add_rpc_servers([f"127.0.0.1:{devices.free_port()}"])


def test_no_alloc_simulation_matches_the_real_allocations_to_the_byte(tmp_path, tiny_file, full):
    """llama.cpp's arithmetic with nothing allocated (a no_alloc model's contexts) against the memory test's real
    contexts: on the RPC device, and on the CPU where weights are read rather than mapped (with mmap, llama.cpp's
    mapped range also holds the file's copy of each repacked tensor, which the no-mmap simulation does not)."""
    from harness.measure import runner
    from harness.measure.breakdown import totals

    _, mem_rpc, _ = full
    cfg = config.from_dict({
        "name": "cpu", "model": {"source": "local", "files": {q: str(tiny_file(q)) for q in ("Q4_K_M", "IQ3_M")}},
        "bench": {"n_prompt": 0, "n_gen": 4, "repetitions": 1, "rounds": 1, "n_batch": 16, "n_ubatch": 16,
                  "contexts": [256, 2048], "cache_type_k": ["f16", "q8_0"], "flash_attn": "on", "mmap": False,
                  "threads": 1},
        "probes": {"enabled": False},
    })
    run_dir, errors = runner.run(cfg, out=tmp_path / "cpu", progress=False, echo=lambda s: None)
    assert errors == {}
    mem_cpu = schema.read_records(run_dir / "contexts.jsonl")
    assert len(mem_cpu) == 8 and len(mem_rpc) == 1
    for r in mem_cpu + mem_rpc:
        real, sim = totals(r.memory_breakdown), totals(r.memory_breakdown_simulated)
        assert real == sim, (r.quant, r.n_ctx, r.cache_type_k)
        assert real["host_context"] + real["device_context"] == sum(r.kv_buffers.values()) or \
            abs(real["host_context"] + real["device_context"] - sum(r.kv_buffers.values())) <= LOG_ROUNDING
        assert 0 < r.simulate_ns < 5e9
    assert totals(mem_rpc[0].memory_breakdown)["device_model"] > 0  # the RPC one simulated on the device
    # a bigger context needs more, by llama.cpp's own figures
    by = {(r.quant, r.n_ctx, r.cache_type_k): totals(r.memory_breakdown_simulated) for r in mem_cpu}
    assert by[("Q4_K_M", 2048, "f16")]["host_context"] == 8 * by[("Q4_K_M", 256, "f16")]["host_context"]
    assert by[("Q4_K_M", 2048, "q8_0")]["host_context"] < by[("Q4_K_M", 2048, "f16")]["host_context"]


def test_simulate_command(tiny_file):
    from conftest import run_cli

    p = run_cli("simulate", "-m", str(tiny_file("Q4_K_M")), "-c", "512,131072", "-fa", "on,off")
    assert p.returncode == 0, p.stderr
    lines = [x for x in p.stdout.splitlines() if x.startswith("tiny-Q4_K_M")]
    assert len(lines) == 4 and "nothing was allocated" in p.stdout
    kv = {(x.split()[1], x.split()[5]): float(x.split()[9].replace(",", "")) for x in lines}  # n_ctx, fa: KV host
    assert kv[("131072", "on")] == 256 * kv[("512", "on")]  # f16 KV grows with the context, by the byte
    p = run_cli("simulate", "-m", "/nonexistent.gguf")
    assert p.returncode == 2 and "no such file" in p.stderr and "Traceback" not in p.stderr


def test_compare_names_the_rpc_backend_and_says_it_is_not_a_gpu(full):
    from conftest import run_cli

    _, _, run_dir = full
    r = run_cli("compare", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "Backends rpc" in r.stdout  # one run: the backend is among what every row shares
    assert "backend rpc is llama.cpp's RPC device" in r.stdout and "not a GPU's" in r.stdout
