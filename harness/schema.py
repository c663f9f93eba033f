"""The record schema, written down once: one record per measured repetition (or per failed model).

Records are JSON objects, one per line of ``records.jsonl``. Units are in the names (``_ns``, ``_bytes``,
``_per_s``). Fields that do not apply (GPU memory on a CPU, timings of an error record) are null.
Readers tolerate a torn last line (a run killed mid-write) and reject anything else malformed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Record:
    # --- identity
    schema_version: int  # SCHEMA_VERSION of the writer
    run_id: str  # the results folder's name
    utc: str  # when this record was written, ISO 8601 UTC
    status: str  # "ok", or "error" (then `error` says why and the measurement fields are null)
    error: str | None  # one-line reason for an error record
    # --- what was measured
    quant: str  # recipe name, e.g. "Q4_K_M"
    weights: str  # where the weights came from: "synthetic" (seeded random, shape-faithful), "hub", "local", or
    # "published" (a row transcribed from someone else's llama-bench output: weights_ref is its URL)
    # synthetic: "llama-3.2-1b seed=0 imatrix=uniform blocks=tiled" (no blocks=: quantized whole, before writer 3);
    weights_ref: str | None  # hub: "repo@commit:file"; local: path
    file_path: str | None  # GGUF file measured
    file_bytes: int | None  # its size on disk
    file_sha256: str | None  # its sha256
    model_desc: str | None  # llama.cpp's description, e.g. "llama 1B Q4_K - Medium"
    model_size_bytes: int | None  # llama_model_size: bytes of all weight tensors
    model_n_params: int | None  # llama_model_n_params
    # --- the test (llama-bench's protocol)
    test: str | None  # "pp" (prompt processing), "tg" (text generation), "mem" (a context created with no
    # decoding: the memory test of bench.contexts, in contexts.jsonl) or "batched" (pl users at once: bench.batched,
    # in batched.jsonl; n_prompt and n_gen are per user); null for a model that failed to load
    n_prompt: int | None  # tokens in the pp test (0 for tg)
    n_gen: int | None  # tokens in the tg test (0 for pp)
    n_depth: int | None  # tokens already in the KV cache (pre-filled untimed) when the test starts
    rep: int | None  # repetition index, 0-based
    wall_ns: int | None  # wall time of this repetition, perf_counter_ns ("mem": of creating the context)
    tokens_per_s: float | None  # (n_prompt + n_gen) / wall time (null for "mem")
    # --- settings
    n_threads: int | None  # CPU threads given to llama.cpp
    n_batch: int | None  # logical batch
    n_ubatch: int | None  # physical batch
    n_ctx: int | None  # context size of the llama_context (n_prompt + n_gen + n_depth, as llama-bench)
    n_gpu_layers: int | None  # layers requested on the GPU (-1 = all)
    flash_attn: str | None  # "auto", "on" or "off" as requested
    device: str | None  # where the weights ran: "cpu", "cuda", "metal", ... (from llama.cpp's model buffers;
    # a published row's: its backend column)
    gpu_offload_supported: bool | None  # llama_supports_gpu_offload() of the installed build
    # --- memory: llama.cpp's own accounting (from its log lines), bytes per buffer name
    model_buffers: dict[str, int] | None  # weights per buffer, e.g. {"CPU_Mapped": ...} or {"CUDA0": ...}
    kv_buffers: dict[str, int] | None  # KV cache per buffer, for this test's context
    compute_buffers: dict[str, int] | None  # compute (scratch) buffers per buffer, for this test's context
    output_buffers: dict[str, int] | None  # logits output buffer
    weights_bytes: int | None  # sum of model_buffers
    kv_bytes: int | None  # sum of kv_buffers
    compute_bytes: int | None  # sum of compute_buffers
    output_bytes: int | None  # sum of output_buffers
    # --- memory: measured from outside llama.cpp
    rss_before_load_bytes: int | None  # process resident set before the model was loaded
    rss_after_load_bytes: int | None  # ... right after load (weights mapped and read)
    rss_peak_bytes: int | None  # peak resident set of the child so far (kernel high-water mark, VmHWM)
    gpu_name: str | None  # the device the record ran on: a measured run's NVML GPU name (null without a GPU);
    # a published row's device as its source names it (llama-bench's cpu_info for a CPU-only backend, gpu_info
    # for a GPU's): the catalog's name where the catalog knows it, else as printed (extra.catalogued false).
    # A published CPU row has device "cpu" and its CPU's name here
    gpu_used_before_load_bytes: int | None  # NVML device memory used before load (all processes)
    gpu_used_after_load_bytes: int | None  # ... after load
    gpu_used_peak_bytes: int | None  # ... peak, sampled in the background
    gpu_process_bytes: int | None  # this process's own usage per NVML, peak sampled
    load_ns: int | None  # wall time of llama_model_load_from_file
    # --- provenance
    llama_cpp_version: str | None  # llama-cpp-python version (pins the llama.cpp commit)
    extra: dict[str, Any] = field(default_factory=dict)  # anything else, free-form (e.g. resolved flash-attn)
    # --- added later (optional in older records)
    cache_type_k: str | None = None  # KV cache K type of the context ("f16", "q8_0", ...)
    cache_type_v: str | None = None  # ... V type
    rss_bytes: int | None = None  # "mem": the process's resident set with the context created
    gpu_used_bytes: int | None = None  # "mem": NVML device memory used with the context created (all processes)
    rss_anon_bytes: int | None = None  # resident anonymous memory at the end of the repetition (smaps_rollup)
    rss_file_bytes: int | None = None  # ... resident file-backed pages (the mmap'd model; clean, reclaimable)
    tensor_types: dict[str, dict[str, int]] | None = None  # the file's tensors per ggml type, from its header:
    # {"Q4_K": {"n_weights": ..., "n_bytes": ...}, ...} (what the analysis needs; no report reopens the file)
    n_layers_offloaded: int | None = None  # N of llama.cpp's "offloaded N/M layers to GPU"; null where the build
    # cannot offload (a CPU-only build logs no such line)
    n_layers_offloadable: int | None = None  # its M: the repeating layers plus the output layer
    device_memory: dict[str, Any] | None = None  # readings by stage (before_load, after_load, after_context,
    # after_test or, for "mem", after_decode), each {"devices": {ggml device name: {"free_bytes", "total_bytes"}},
    # "process_bytes": the device-holding process's own memory (NVML per process; the harness's RPC server's
    # anonymous resident memory), "process": "nvml" | "rpc-server", with NVML "nvml_device_used_bytes"}; the CPU
    # device is the host (see rss_*); on an NVIDIA GPU before_load also has "nvml_before_cuda" (NVML's reading before
    # any CUDA call: the one baseline) and "counts_cuda_context": true (every figure holds the CUDA context)
    device_used_bytes: int | None = None  # what this run holds on its devices at the highest stage reading:
    # the holding process's growth since before load (on a GPU since before its CUDA context), else the devices'
    # drop
    memory_breakdown: dict[str, dict[str, Any]] | None = None  # llama.cpp's own accounting of this context, to
    # the byte (llama_get_memory_breakdown): {buffer type: {"model", "context" (KV), "compute" bytes, "host"}}
    memory_breakdown_simulated: dict[str, dict[str, Any]] | None = None  # "mem", "batched": the same from a model
    # loaded with no_alloc (nothing allocated: llama.cpp's --fit arithmetic), for the same context (batched: the
    # same n_seq_max and kv_unified)
    simulate_ns: int | None = None  # "mem", "batched": wall time of that simulated context
    quality: dict[str, Any] | None = None  # test "quality": llama-perplexity's statistics of this quant against
    # the reference (ppl, ppl_base, ln_ppl_ratio, kld_mean, kld_median, kld_p99, same_top, dp_rms, ... with
    # their uncertainties; harness.measure.quality), the text and the reference in `extra`
    device_used_source: str | None = None  # "process" (this run's own) or "device" (a whole device's difference:
    # includes every other tenant's allocations)
    batched: dict[str, Any] | None = None  # test "batched" (batched.jsonl): llama-batched-bench's jsonl fields by its
    # names (n_kv_max, n_batch, n_ubatch, flash_attn, is_pp_shared, n_gpu_layers, n_threads, n_threads_batch, pp, tg,
    # pl, n_kv, t_pp, speed_pp, t_tg, speed_tg, t, speed; seconds and tokens/s), n_seq_max and kv_unified of its
    # context, speed_tg_per_user (S_TG / pl) and ttft_s (time to first token of pl users arriving at once: t_pp)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=False)


FIELDS = [f.name for f in dataclasses.fields(Record)]
REQUIRED = [f.name for f in dataclasses.fields(Record) if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING]

# Measurement fields that must be present (non-null) in an "ok" record.
OK_REQUIRED = ("test", "n_prompt", "n_gen", "n_depth", "rep", "wall_ns", "file_sha256")
TESTS = ("pp", "tg", "mem", "quality", "batched")


class SchemaError(ValueError):
    pass


def from_dict(d: dict[str, Any]) -> Record:
    """Validate one parsed record against the schema."""
    unknown = set(d) - set(FIELDS)
    if unknown:
        raise SchemaError(f"unknown fields {sorted(unknown)}")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise SchemaError(f"missing fields {missing}")
    if d["status"] not in ("ok", "error"):
        raise SchemaError(f"status must be ok or error, got {d['status']!r}")
    if d["status"] == "ok" and d.get("weights") == "published" and d.get("test") == "mem":
        # a published load log: a context's buffers and where they came from
        nulls = [k for k in ("weights_ref", "n_ctx", "kv_buffers") if d.get(k) is None]
        if nulls:
            raise SchemaError(f"published memory record with null {nulls}")
    elif d["status"] == "ok" and d.get("weights") == "published":
        # transcribed from a source: a rate, a test and where it came from; no file, no wall time of ours
        nulls = [k for k in ("test", "rep", "tokens_per_s", "weights_ref") if d.get(k) is None]
        if nulls:
            raise SchemaError(f"published record with null {nulls}")
        if d["test"] not in TESTS or not d["tokens_per_s"] > 0:
            raise SchemaError("published record needs a pp/tg test and a positive tokens_per_s")
    elif d["status"] == "ok":
        nulls = [k for k in OK_REQUIRED if d.get(k) is None]
        if nulls:
            raise SchemaError(f"ok record with null {nulls}")
        if d["test"] not in TESTS:
            raise SchemaError(f"test must be one of {', '.join(TESTS)}, got {d['test']!r}")
        if d["test"] == "mem":
            if not d["wall_ns"] > 0 or not d.get("n_ctx"):
                raise SchemaError("ok mem record needs positive wall_ns and n_ctx")
        elif d["test"] == "quality":
            if not d["wall_ns"] > 0 or not d.get("quality"):
                raise SchemaError("ok quality record needs positive wall_ns and its statistics")
        elif not d["wall_ns"] > 0 or not d.get("tokens_per_s") or not d["tokens_per_s"] > 0:
            raise SchemaError("ok record needs positive wall_ns and tokens_per_s")
    elif not d.get("error"):
        raise SchemaError("error record without an error message")
    return Record(**d)


def make(**kw: Any) -> Record:
    """A record with every field not given set to null (and the schema version filled in)."""
    base: dict[str, Any] = {k: None for k in REQUIRED}
    base["schema_version"] = SCHEMA_VERSION
    base.update(kw)
    return from_dict(base)


class RecordWriter:
    """Appends records to a JSONL file, flushed and fsynced per record so a crash keeps what was measured."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._repair_torn_tail()

    def _repair_torn_tail(self) -> None:
        # A killed writer may leave a last line without its newline; start ours on a fresh line.
        if self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._f.write("\n")
                    self._f.flush()

    def write(self, rec: Record) -> None:
        self._f.write(rec.to_json() + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_records(path: str | os.PathLike) -> list[Record]:
    """Read a records.jsonl. A line that is not JSON is a record torn by a killed writer (a resumed run
    starts after it on a fresh line): skipped with a warning. A parseable line off the schema is an error."""
    out: list[Record] = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping a torn record (a run was killed while writing it)", path, i)
            continue
        try:
            out.append(from_dict(d))
        except (SchemaError, TypeError) as e:
            raise SchemaError(f"{path}:{i}: {e}") from None
    return out


# --- cluster runs: which device group a record was measured by (extra.cluster, written by measure.cluster) ---

def cluster_group(extra: Any) -> str | None:
    """The device group of a cluster run's record (its extra.cluster.group); None for a local run's."""
    return ((extra.get("cluster") or {}).get("group")) if isinstance(extra, dict) else None


def group_slug(group: str) -> str:
    """A device group's name as it stands in file names (env-<slug>-<node>.json, reports/<run>/<slug>/)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", group).strip("-") or "group"
