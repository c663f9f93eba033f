"""The GPU path where no GPU runs: real llama.cpp CUDA logs, transcribed verbatim from public pages
(tests/data/llama-log/cuda/, each file's header names its source, date, build, GPUs and model), replayed through
the log parser, the records and the report's device table. The logs are real; only the device is absent.

The four: a full offload on one GPU (ggml-org/ci, build 2459, V100, 7B llama: no public CUDA log of a ~1B llama
model was found), a partial offload over two GPUs (PR 8035, 78/81 layers), CUDA_Host buffers with timestamps
(ggml-org/ci, build 4715, V100), and two GPUs (build 5622, RTX 4090 + RTX 5090). Each figure below is the log's
own, in MiB as printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import llamalog, schema
from harness.analysis import summary
from harness.measure.bench import device_of
from harness.report import tables
from harness.sources import published

LOGS = Path(__file__).resolve().parent / "data" / "llama-log" / "cuda"
MIB = 1024 * 1024

# file: (offloaded, CUDA devices, model, KV, compute, output buffers in MiB as logged, importable by the importer)
CASES = {
    "full-offload-open-llama-7b-v100-b2459.log": (
        (33, 33), ["Tesla V100-PCIE-16GB"],
        {"CPU": 70.31, "CUDA0": 3577.56}, {"CUDA0": 256.00}, {"CUDA0": 70.50, "CUDA_Host": 9.00},
        {"CUDA_Host": 62.50}, True),
    "partial-offload-78of81-two-gpu-pr8035.log": (
        (78, 81), ["NVIDIA GeForce RTX 4060 Ti", "NVIDIA GeForce RTX 3060"],
        {"CPU": 22994.45, "CUDA0": 12633.25, "CUDA1": 8652.00},
        {"CUDA_Host": 64.00, "CUDA0": 1472.00, "CUDA1": 1024.00},
        {"CUDA0": 1108.50}, {"CUDA_Host": 0.98}, False),
    "cuda-host-buffers-pythia-2.8b-v100-b4715.log": (
        (33, 33), ["Tesla V100-PCIE-16GB"],
        {"CUDA0": 1454.83, "CPU_Mapped": 69.08}, {"CUDA0": 640.00}, {"CUDA0": 162.00, "CUDA_Host": 9.01},
        {"CUDA_Host": 0.19}, True),
    "two-gpu-qwen3-30b-a3b-b5622.log": (
        (49, 49), ["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 5090"],
        {"CPU_Mapped": 17447.91, "CUDA0": 135.76, "CUDA1": 648.66}, {"CUDA0": 384.00, "CUDA1": 1152.00},
        {"CUDA0": 1080.00, "CUDA1": 1080.00, "CUDA_Host": 36.01}, {"CUDA_Host": 0.58}, False),
}


def log_lines(name: str) -> list[str]:
    return [x for x in (LOGS / name).read_text().splitlines() if not x.startswith("#")]


def as_bytes(mib: dict[str, float]) -> dict[str, int]:
    return {k: round(v * MIB) for k, v in mib.items()}


def test_every_fixture_names_its_source_and_build():
    for name in CASES:
        head = [x for x in (LOGS / name).read_text().splitlines() if x.startswith("#")]
        text = "\n".join(head).lower()
        assert "https://github.com/" in text and "build" in text and "verbatim" in text, name


@pytest.mark.parametrize("name", CASES)
def test_the_parser_reads_what_each_log_says(name):
    off, gpus, model, kv, compute, output, _ = CASES[name]
    lines = log_lines(name)
    assert llamalog.offloaded_layers(lines) == off
    assert [n for _, n, _ in llamalog.cuda_devices(lines)] == gpus
    b = llamalog.parse_buffers(lines)
    assert (b.model, b.kv, b.compute, b.output) == (as_bytes(model), as_bytes(kv), as_bytes(compute), as_bytes(output))
    # each buffer on its side: CUDA_Host (pinned host memory) and CPU* on the host, CUDAn on a device
    assert device_of(b.model) == "cuda"
    host = {k for d in b for k in d if llamalog.is_host_buffer(k)}
    assert host and all(k.startswith(("CPU", "CUDA_Host")) for k in host)


def records_of(name: str) -> list[schema.Record]:
    """The log as the harness's records: through the importer where it reads the log's format (it names the model
    in print_info / llm_load_print_meta lines), else as the measuring worker makes them from the same parser."""
    off, gpus, *_ = CASES[name]
    importable = CASES[name][-1]
    recs, skipped, _ = published.import_file(LOGS / name, "replay", {"url": "tests/data/llama-log/cuda",
                                                                     "format": "log"})
    assert bool(recs) == importable and (importable or skipped)
    if recs:
        return recs
    lines = log_lines(name)
    b = llamalog.parse_buffers(lines)
    n_ctx = next(int(x.split("=")[1]) for x in lines if "n_ctx " in x and "=" in x)
    return [schema.make(run_id="replay", utc="2026-12-04T00:00:00+00:00", status="ok", quant="?", weights="published",
                        weights_ref=f"tests/data/llama-log/cuda/{name}", n_ctx=n_ctx, test="mem",
                        device=device_of(b.model), gpu_name=gpus[0], model_buffers=b.model,
                        kv_buffers=b.kv, compute_buffers=b.compute, output_buffers=b.output,
                        n_layers_offloaded=off[0], n_layers_offloadable=off[1])]


@pytest.mark.parametrize("name", CASES)
def test_records_and_the_reports_device_table_split_device_and_host(name):
    off, gpus, model, kv, compute, _, importable = CASES[name]
    recs = records_of(name)
    r = recs[0]
    assert r.device == "cuda" and r.gpu_name == gpus[0]  # the device named by the log itself where none is given
    assert (r.n_layers_offloaded, r.n_layers_offloadable) == off
    row = tables.device_memory_rows(summary.records_frame(recs))[0]

    def side(d: dict[str, float], host: bool) -> str:
        return f"{sum(v for k, v in as_bytes(d).items() if llamalog.is_host_buffer(k) == host) / MIB:,.1f}"

    # model on the device | on the host | KV on the device | compute on the device | compute on the host
    assert row[2] == f"{off[0]}/{off[1]}"
    assert row[3:8] == [side(model, False), side(model, True), side(kv, False), side(compute, False),
                        side(compute, True)]
