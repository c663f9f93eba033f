"""Measure one GGUF file with llama.cpp, the way llama-bench does, through the low-level API.

Runs inside the child process (:mod:`harness.measure.worker`). For each depth and each test (pp, tg) a context of
``n_prompt + n_gen + n_depth`` tokens is created, as llama-bench does; one untimed warm-up, then each
repetition clears the KV cache, restores the pre-filled depth (untimed), and times only ``llama_decode``
calls on seeded random token ids: no tokenization, no sampling. ``pp`` decodes the prompt in ``n_batch``
chunks with logits for the last token only; ``tg`` decodes one token per call and synchronizes each token.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness import llamalog
from harness.config import CACHE_TYPES, FLASH_ATTN_TYPES
from harness.llamalog import LogCapture, flash_attn_resolved, offloaded_layers, parse_buffers
from harness.measure import batched, breakdown, devices, machine, memory

log = logging.getLogger(__name__)

ALL_LAYERS = 999  # n_gpu_layers -1 means all; llama.cpp clamps to the model's layer count


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Test:
    kind: str  # "pp" or "tg"
    n_prompt: int
    n_gen: int
    n_depth: int

    @property
    def n_tokens(self) -> int:
        return self.n_prompt + self.n_gen


def tests_for(bench: dict[str, Any]) -> list[Test]:
    """The tests of one model file, ordered like llama-bench: per depth, pp then tg."""
    out = []
    for d in bench["depths"]:
        if bench["n_prompt"] > 0:
            out.append(Test("pp", bench["n_prompt"], 0, d))
        if bench["n_gen"] > 0:
            out.append(Test("tg", 0, bench["n_gen"], d))
    return out


def cache_types(bench: dict[str, Any]) -> list[tuple[str, str]]:
    """(K, V) type pairs, every combination as llama-bench expands -ctk and -ctv; pp and tg use the first."""
    return [(k, v) for k in bench.get("cache_type_k", ("f16",)) for v in bench.get("cache_type_v", ("f16",))]


@dataclass(frozen=True)
class MemCell:
    """One context of the memory test: created and decoded once, its buffers and memory recorded."""
    n_ctx: int
    type_k: str
    type_v: str
    flash_attn: str

    @property
    def key(self) -> tuple:
        return ("mem", self.n_ctx, self.type_k, self.type_v, self.flash_attn)

    @classmethod
    def of_record(cls, r) -> MemCell:
        """The cell a contexts.jsonl record measured (for a resume)."""
        return cls(r.n_ctx, r.cache_type_k, r.cache_type_v, r.flash_attn)


def mem_cells(bench: dict[str, Any]) -> list[MemCell]:
    """The memory test's contexts, smallest first: contexts x (K, V) types x flash-attention settings."""
    fas = list(bench.get("context_flash_attn") or ()) or [bench["flash_attn"]]
    return [MemCell(n, k, v, fa) for n in sorted(bench.get("contexts") or ())
            for (k, v) in cache_types(bench) for fa in fas]


def device_of(model_buffers: dict[str, int]) -> str:
    """Where the weights live, from llama.cpp's buffer names: CUDA0 -> cuda, Metal -> metal, RPC0[host:port] -> rpc
    (llama.cpp's RPC device: a server's device over the network, loopback in the tests), else cpu."""
    names = [n for n, size in model_buffers.items() if size > 0 and not llamalog.is_host_buffer(n)]  # not CUDA_Host
    for prefix, dev in (("CUDA", "cuda"), ("ROCm", "rocm"), ("Metal", "metal"), ("MTL", "metal"),
                        ("Vulkan", "vulkan"), ("SYCL", "sycl"), ("RPC", "rpc")):
        if any(n.startswith(prefix) for n in names):
            return dev
    return "cpu"


class _Batch:
    """A llama_batch for up to `capacity` tokens of sequence 0, filled from numpy without Python loops."""

    def __init__(self, llama_cpp, capacity: int):
        self._lib = llama_cpp
        self.capacity = capacity
        self.batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        for i in range(capacity):
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = 0
        self._zeros = (ctypes.c_int8 * capacity)()

    def fill(self, tokens: np.ndarray, pos0: int) -> None:
        n = len(tokens)
        b = self.batch
        ctypes.memmove(b.token, tokens.ctypes.data, n * 4)
        pos = np.arange(pos0, pos0 + n, dtype=np.int32)
        ctypes.memmove(b.pos, pos.ctypes.data, n * 4)
        ctypes.memmove(b.logits, self._zeros, n)
        b.logits[n - 1] = 1  # logits of the last token only, as llama-bench
        b.n_tokens = n

    def free(self) -> None:
        self._lib.llama_batch_free(self.batch)


class Session:
    """A loaded model plus what is needed to run llama-bench's tests on it."""

    def __init__(self, path: str, bench: dict[str, Any], capture: LogCapture):
        import llama_cpp

        self.lib = llama_cpp
        self.bench = bench
        self.capture = capture
        self.rng = np.random.default_rng(bench["seed"])
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        ngl = bench["n_gpu_layers"]
        mp.n_gpu_layers = ALL_LAYERS if ngl < 0 else ngl
        mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if bench.get("mmap", True) else llama_cpp.LLAMA_LOAD_MODE_NONE
        capture.take()
        t0 = time.perf_counter_ns()
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
        self.load_ns = time.perf_counter_ns() - t0
        self.load_log = capture.take()
        if not self.model:
            tail = "; ".join(x.strip() for x in self.load_log[-4:] if x.strip())
            raise BenchError(f"llama.cpp failed to load the model: {tail or 'no reason logged'}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.bos = llama_cpp.llama_vocab_bos(self.vocab) if llama_cpp.llama_vocab_get_add_bos(self.vocab) else None
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model, buf, len(buf))
        self.desc = buf.value.decode(errors="replace")
        self.size_bytes = int(llama_cpp.llama_model_size(self.model))
        self.n_params = int(llama_cpp.llama_model_n_params(self.model))
        self.model_buffers = parse_buffers(self.load_log).model
        self.device = device_of(self.model_buffers)
        self.offloaded = offloaded_layers(self.load_log)  # (N, M) of "offloaded N/M layers to GPU", or None
        self.gpu_offload_supported = bool(llama_cpp.llama_supports_gpu_offload())

    def tokens(self, n: int, first_bos: bool) -> np.ndarray:
        t = self.rng.integers(0, self.n_vocab, size=n, dtype=np.int32)
        if first_bos and self.bos is not None and n:
            t[0] = self.bos
        return t

    def context(self, test: Test):
        b = self.bench
        return self.new_context(test.n_prompt + test.n_gen + test.n_depth, cache_types(b)[0], b["flash_attn"])

    def new_context(self, n_ctx: int, kv: tuple[str, str], flash_attn: str, n_seq_max: int = 1,
                    kv_unified: bool = False):
        """A llama_context of `n_ctx` tokens with KV types `kv` (K, V) for `n_seq_max` sequences (split evenly
        between them unless `kv_unified`): (ctx, its log lines). BenchError with llama.cpp's last log lines where
        it cannot be made."""
        lib, b = self.lib, self.bench
        cp = lib.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = b["n_batch"]
        cp.n_ubatch = b["n_ubatch"]
        cp.n_threads = b["threads"]
        cp.n_threads_batch = b["threads"]
        cp.flash_attn_type = FLASH_ATTN_TYPES[flash_attn]
        cp.type_k = CACHE_TYPES[kv[0]]
        cp.type_v = CACHE_TYPES[kv[1]]
        cp.swa_full = False
        cp.n_seq_max = n_seq_max
        cp.kv_unified = kv_unified
        self.capture.take()
        ctx = lib.llama_init_from_model(self.model, cp)
        ctx_log = self.capture.take()
        if not ctx:
            tail = "; ".join(x.strip() for x in ctx_log[-4:] if x.strip())
            raise BenchError(f"llama.cpp failed to create a context of {n_ctx} tokens (KV {kv[0]}/{kv[1]}, "
                             f"flash_attn {flash_attn}): {tail or 'no reason logged'}")
        return ctx, ctx_log

    def _decode(self, ctx, batch: _Batch) -> None:
        rc = self.lib.llama_decode(ctx, batch.batch)
        if rc != 0:
            raise BenchError(f"llama_decode failed with code {rc}")

    def run_prompt(self, ctx, batch: _Batch, n: int, token_chunks: list[np.ndarray]) -> None:
        """Decode `n` tokens in n_batch chunks (pre-drawn in `token_chunks`), then synchronize."""
        mem = self.lib.llama_get_memory(ctx)
        pos = self.lib.llama_memory_seq_pos_max(mem, 0) + 1
        for chunk in token_chunks:
            batch.fill(chunk, pos)
            self._decode(ctx, batch)
            pos += len(chunk)
        self.lib.llama_synchronize(ctx)

    def run_gen(self, ctx, batch: _Batch, tokens: np.ndarray) -> None:
        """One llama_decode per token, synchronized after each, as llama-bench's test_gen."""
        lib = self.lib
        mem = lib.llama_get_memory(ctx)
        pos = lib.llama_memory_seq_pos_max(mem, 0) + 1
        b = batch.batch
        b.n_tokens = 1
        b.logits[0] = 1
        for tok in tokens.tolist():
            b.token[0] = tok
            b.pos[0] = pos
            rc = lib.llama_decode(ctx, b)
            if rc != 0:
                raise BenchError(f"llama_decode failed with code {rc}")
            lib.llama_synchronize(ctx)
            pos += 1

    def prompt_chunks(self, n: int) -> list[np.ndarray]:
        toks = self.tokens(n, first_bos=True)
        nb = self.bench["n_batch"]
        return [toks[i:i + nb] for i in range(0, n, nb)]

    def gen_tokens(self, n: int) -> np.ndarray:
        return self.tokens(n, first_bos=True)

    def free(self) -> None:
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None


class DeviceWatch:
    """Device memory read at the tests' boundaries (before load, after load, after a context, after its decodes),
    never inside a timed region: each device's free and total memory as llama.cpp reports it
    (``ggml_backend_dev_memory``), and, where the harness knows the process that holds the device's memory, that
    process's own figure: NVML's per-process usage on an NVIDIA GPU, the resident anonymous memory of the RPC
    server the harness started. `used` is that process's growth since before the load where there is one
    (source "process"), else the device's drop (source "device": it includes other tenants).

    On an NVIDIA GPU one baseline serves every figure: NVML's, read before any ggml call, since the first CUDA call
    (a device's memory query, an allocation) creates this process's CUDA context (~0.3-0.5 GiB); every figure then
    counts the context (`counts_cuda_context`), as NVML's per-process usage does."""

    def __init__(self, nvml, server_pid: int | None):
        self.nvml = nvml
        self.server_pid = server_pid
        self.base: dict[str, Any] | None = None
        self.nvml_base = None  # NVML's reading before any CUDA call
        self.sampler = None  # NVML's peak sampler, sampled here (at the boundaries) rather than by a thread

    def read(self) -> dict[str, Any]:
        if self.sampler is not None:
            self.sampler.sample()
        out: dict[str, Any] = {"devices": devices.memory_now()}
        if self.server_pid:
            rss = devices.process_rss(self.server_pid)
            out["process_bytes"] = rss.get("anon_bytes", rss["rss_bytes"]) if rss else None
            out["process"] = "rpc-server"
        elif self.nvml:
            g = self.nvml.read()
            out["process_bytes"], out["nvml_device_used_bytes"] = g.process_bytes, g.device_used_bytes
            out["process"] = "nvml"
        return out

    def start(self) -> dict[str, Any]:
        if self.nvml:  # before read(), whose device memory query creates the CUDA context
            self.nvml_base = self.nvml.read()
        self.base = self.read()
        return self.base

    def used(self, now: dict[str, Any]) -> tuple[int | None, str | None]:
        """(bytes this run holds on its devices now, which source that figure is)."""
        b = self.base or {}
        if self.nvml_base is not None:  # NVML's baseline, from before the CUDA context
            if now.get("process_bytes") is not None:  # not listed before any CUDA call: nothing on the device
                return now["process_bytes"] - (self.nvml_base.process_bytes or 0), "process"
            if now.get("nvml_device_used_bytes") is not None:
                return now["nvml_device_used_bytes"] - self.nvml_base.device_used_bytes, "device"
        if now.get("process_bytes") is not None and b.get("process_bytes") is not None:
            return now["process_bytes"] - b["process_bytes"], "process"
        devs = now.get("devices") or {}
        if not devs:
            return None, None
        drop = sum(b.get("devices", {}).get(n, d)["free_bytes"] - d["free_bytes"] for n, d in devs.items())
        return drop, "device"

    def fields(self, stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Record fields from readings by stage name: all of them, and the `used` figure at the highest one."""
        used = [self.used(r) for r in stages.values()]
        vals = [u for u, _ in used if u is not None]
        base = self.base or {}
        if self.nvml_base is not None:  # the figures count this process's CUDA context: NVML's baseline is before it
            base = {**base, "nvml_before_cuda": self.nvml_base._asdict(), "counts_cuda_context": True}
        return {"device_memory": {"before_load": base, **stages},
                "device_used_bytes": max(vals) if vals else None,
                "device_used_source": next((src for u, src in used if u is not None), None)}


def measure(path: str, bench: dict[str, Any], emit: Callable[[dict[str, Any]], None],
            capture: LogCapture, progress: Callable[[str], None] = lambda s: None) -> None:
    """Load `path`, run every test, and emit one dict per timed repetition (fields of schema.Record)."""
    # NVML only where this build can put weights on an NVIDIA GPU: a CPU or RPC build on a host with a driver
    # records no GPU (its memory is other processes')
    nvml = memory.nvml_probe() if "CUDA" in devices.gpu_backends() else None
    rpc = list(bench.get("rpc_endpoints") or ())
    if rpc:
        try:
            devices.add_rpc_servers(rpc)
        except devices.DeviceError as e:
            raise BenchError(str(e)) from None
    watch = DeviceWatch(nvml, bench.get("rpc_server_pid"))
    watch.start()
    rss_before = memory.rss_bytes()
    gpu_before = watch.nvml_base  # one baseline, from before the CUDA context
    with contextlib.ExitStack() as stack:
        # NVML read at the tests' boundaries only, never by a thread inside a timed region: what a test holds on
        # a GPU (its context's buffers, cuBLAS's workspace, the pools, which CUDA keeps once grown) is still held
        # when its repetitions end, where it is read
        gpu_sampler = stack.enter_context(memory.PeakSampler(nvml.read, interval_s=None)) if nvml else None
        watch.sampler = gpu_sampler
        s = Session(path, bench, capture)
        stack.callback(s.free)  # before the sampler stops, as the stack unwinds
        rss_after = memory.rss_bytes()
        gpu_after = nvml.read() if nvml else None
        after_load = watch.read()
        if nvml and s.device == "cpu" and bench["n_gpu_layers"] != 0:
            log.warning("NVML sees %s but llama.cpp put the weights on the CPU", nvml.name)
        n_off, n_all = s.offloaded or (None, None)
        model_fields = {
            "model_desc": s.desc, "model_size_bytes": s.size_bytes, "model_n_params": s.n_params,
            "device": s.device, "gpu_offload_supported": s.gpu_offload_supported,
            "model_buffers": s.model_buffers, "weights_bytes": sum(s.model_buffers.values()),
            "rss_before_load_bytes": rss_before, "rss_after_load_bytes": rss_after, "load_ns": s.load_ns,
            "gpu_name": nvml.name if nvml else None,
            "gpu_used_before_load_bytes": gpu_before.device_used_bytes if gpu_before else None,
            "gpu_used_after_load_bytes": gpu_after.device_used_bytes if gpu_after else None,
            "n_threads": bench["threads"], "n_batch": bench["n_batch"], "n_ubatch": bench["n_ubatch"],
            "n_gpu_layers": bench["n_gpu_layers"], "flash_attn": bench["flash_attn"],
            "n_layers_offloaded": n_off, "n_layers_offloadable": n_all,
            "extra": {"mmap": bool(bench.get("mmap", True)),
                      **({"rpc_endpoints": rpc} if rpc else {}),
                      # the devices llama.cpp could offload to, by their own names (a ROCm or Vulkan GPU is named
                      # by its driver, never by the host's CPU)
                      "gpu_devices": [{"name": d.name, "description": d.description, "kind": d.kind}
                                      for d in devices.list_devices() if d.kind != "cpu"],
                      **({"partial_offload": True} if n_off is not None and 0 < n_off < n_all else {})},
        }
        kv0 = cache_types(bench)[0]
        skip = {tuple(c) for c in bench.get("skip_cells", ())}  # (test, depth, rep) done before a resume
        for test in tests_for(bench):
            reps = [r for r in range(bench["repetitions"]) if (test.kind, test.n_depth, r) not in skip]
            if not reps:
                continue
            _run_test(s, test, reps, bench, {**model_fields, "cache_type_k": kv0[0], "cache_type_v": kv0[1]},
                      gpu_sampler, emit, progress, watch, after_load)
        skip_mem = {tuple(c) for c in bench.get("skip_mem", ())}
        cells = [c for c in mem_cells(bench) if c.key not in skip_mem]
        todo = [c for c in batched.cells(bench) if c.key not in skip_mem]
        sim = None
        if cells or todo:  # the same contexts by llama.cpp's arithmetic alone (a no_alloc model), beside the real ones
            try:
                sim = breakdown.Simulator(path, bench)
                stack.callback(sim.free)
            except breakdown.SimulateError as e:
                log.warning("%s", e)
        for cell in cells:
            _run_mem(s, cell, model_fields, nvml, gpu_sampler, emit, progress, watch, after_load, sim)
        if todo:
            batched.run(s, bench, model_fields, todo, emit, progress, watch, after_load, _context_fields, capture,
                        sim)


def _context_fields(ctx_log: list[str], model_fields: dict[str, Any]) -> dict[str, Any]:
    """A context's record fields from the log of its creation: llama.cpp's KV, compute and output buffers, and
    what flash attention resolved to (in `extra`, beside the model's own)."""
    bufs = parse_buffers(ctx_log)
    fa = flash_attn_resolved(ctx_log)
    return {
        "kv_buffers": bufs.kv, "compute_buffers": bufs.compute, "output_buffers": bufs.output,
        "kv_bytes": sum(bufs.kv.values()), "compute_bytes": sum(bufs.compute.values()),
        "output_bytes": sum(bufs.output.values()),
        "extra": {**model_fields.get("extra", {}), **({"flash_attn_resolved": fa} if fa else {})},
    }


def _run_mem(s: Session, cell: MemCell, model_fields: dict[str, Any], nvml, gpu_sampler, emit, progress,
             watch: DeviceWatch, after_load: dict[str, Any], sim=None) -> None:
    """The memory test's one context: create it, decode once (a CUDA device allocates cuBLAS and its memory pool
    on the first decode: a context never decoded is not what a user's holds), record its buffers and the memory
    in use, free it. The decode is one token on the CPU, one micro-batch where the weights are on a device. A
    context llama.cpp cannot make (too big, a V type without flash attention) is that cell's error record, with
    what was asked; the sweep goes on."""
    kv = f"{cell.type_k}/{cell.type_v}"
    progress(f"context {cell.n_ctx} KV {kv} fa {cell.flash_attn}")
    base = {**model_fields, "test": "mem", "n_prompt": 0, "n_gen": 0, "n_depth": 0, "rep": 0,
            "n_ctx": cell.n_ctx, "cache_type_k": cell.type_k, "cache_type_v": cell.type_v,
            "flash_attn": cell.flash_attn}
    t0 = time.perf_counter_ns()
    try:
        ctx, ctx_log = s.new_context(cell.n_ctx, (cell.type_k, cell.type_v), cell.flash_attn)
    except BenchError as e:
        emit({**base, "status": "error", "error": str(e)})
        return
    wall = time.perf_counter_ns() - t0
    try:
        ctx_fields = _context_fields(ctx_log, model_fields)
        after_ctx = watch.read()
        n = 1 if s.device == "cpu" else max(1, min(s.bench["n_ubatch"], cell.n_ctx))
        batch = _Batch(s.lib, n)
        try:
            batch.fill(s.tokens(n, first_bos=True), 0)
            s._decode(ctx, batch)
            s.lib.llama_synchronize(ctx)
        except BenchError as e:
            emit({**base, **ctx_fields, "status": "error", "error": f"the context was made but its first decode "
                  f"failed: {e}"})
            return
        finally:
            batch.free()
        dev = watch.fields({"after_load": after_load, "after_context": after_ctx, "after_decode": watch.read()})
        dev["memory_breakdown"] = breakdown.breakdown(ctx)
        if sim is not None:
            try:
                dev["memory_breakdown_simulated"], dev["simulate_ns"] = sim.cell(
                    cell.n_ctx, (cell.type_k, cell.type_v), cell.flash_attn)
            except breakdown.SimulateError as e:
                log.warning("%s", e)
        g = nvml.read() if nvml else None
        peak = gpu_sampler.peak if gpu_sampler else None
        emit({
            **base, **ctx_fields, "wall_ns": wall,
            "rss_bytes": memory.rss_bytes(), "rss_peak_bytes": memory.peak_rss_bytes(), **memory.rss_parts(),
            "gpu_used_bytes": g.device_used_bytes if g else None,
            "gpu_used_peak_bytes": peak.device_used_bytes if peak else None,
            "gpu_process_bytes": g.process_bytes if g else None, **dev,
            "extra": {**ctx_fields["extra"], "decoded_tokens": n},
        })
    finally:
        s.lib.llama_free(ctx)


# ggml-cuda's debug lines about its CUDA graphs (ggml/src/ggml-cuda/ggml-cuda.cu of the pinned llama.cpp): a graph
# is captured on the second identical call ("CUDA graph warmup complete"), launched again after that ("CUDA Graph
# id N reused" where llama.cpp reused its graph), captured anew after a change ("warmup reset", "update failed").
_GRAPH_RE = re.compile(r"CUDA [Gg]raph|CUDA graphs")
GRAPH_EXTRA_WARMUPS = 4  # at most this many warm-ups past the config's while the graphs settle


def graph_state(lines: list[str], state: dict[str, Any]) -> bool:
    """Update `state` ({"in_use", "warmups", "said"}) with one warm-up's debug lines; True once the CUDA graphs are
    settled: captured in a warm-up (so no timed repetition pays the capture) or disabled, or where a later warm-up
    said nothing of them (a build or device without graphs)."""
    said = [x.split(":", 1)[-1].strip() if "ggml_" in x.split(":", 1)[0] else x.strip()
            for x in lines if _GRAPH_RE.search(x)]
    state["warmups"] += 1
    for x in said:
        if x not in state["said"] and len(state["said"]) < 6:
            state["said"].append(x)
    if any("disabling" in x for x in said):
        state["in_use"] = False
        return True
    if any("reset" in x or "update failed" in x for x in said):
        state["in_use"] = False
        return False
    if any("warmup complete" in x or "reused" in x for x in said):
        state["in_use"] = True
        return True
    return state["in_use"] or (state["warmups"] >= 2 and not said)


def warm_until_graphs(s: Session, warm_up: Callable[[], None], n: int) -> dict[str, Any] | None:
    """The test's `n` warm-ups (llama-bench's), and on a CUDA device more while its CUDA graphs settle (the debug
    log read for them, at most GRAPH_EXTRA_WARMUPS more): with one warm-up, repetition 0 would pay the graph's
    capture. Returns {"in_use": whether graphs are in use, "warmups": how many ran, "said": the log's lines of
    them} on a CUDA device, None elsewhere."""
    if s.device != "cuda":
        for _ in range(n):
            warm_up()
        return None
    state: dict[str, Any] = {"in_use": False, "warmups": 0, "said": []}
    debug, s.capture.debug = s.capture.debug, True
    try:
        settled = False
        while state["warmups"] < n or (not settled and state["warmups"] < n + GRAPH_EXTRA_WARMUPS):
            s.capture.take()
            warm_up()
            settled = graph_state(s.capture.take(), state)
    finally:
        s.capture.debug = debug
    return state


def _run_test(s: Session, test: Test, reps: list[int], bench: dict[str, Any], model_fields: dict[str, Any],
              gpu_sampler, emit, progress, watch: DeviceWatch, after_load: dict[str, Any]) -> None:
    lib = s.lib
    ctx, ctx_log = s.context(test)
    after_ctx = watch.read()
    batch = _Batch(lib, max(bench["n_batch"], 1))
    out: list[dict[str, Any]] = []
    try:
        ctx_fields = _context_fields(ctx_log, model_fields)
        mem = lib.llama_get_memory(ctx)
        label = f"{test.kind}{test.n_tokens}" + (f"@d{test.n_depth}" if test.n_depth else "")
        depth_state = None
        progress(f"{label}: warm-up and {len(reps)} repetitions")  # nothing is sent inside the timed region

        def warm_up() -> None:
            lib.llama_memory_clear(mem, False)
            if test.kind == "pp":
                s.run_prompt(ctx, batch, test.n_prompt, s.prompt_chunks(test.n_prompt))
            else:
                s.run_gen(ctx, batch, s.gen_tokens(1))

        graphs = warm_until_graphs(s, warm_up, bench["warmup"])
        if graphs is not None:
            ctx_fields["extra"] = {**ctx_fields["extra"], "cuda_graphs": graphs}
        null = breakdown.null_log()  # llama-bench's null log callback: no Python call per log line while timed
        for r in reps:
            lib.llama_memory_clear(mem, False)
            if test.n_depth:
                if depth_state is None:
                    s.run_prompt(ctx, batch, test.n_depth, s.prompt_chunks(test.n_depth))
                    n = lib.llama_state_seq_get_size(ctx, 0)
                    depth_state = (ctypes.c_uint8 * n)()
                    lib.llama_state_seq_get_data(ctx, depth_state, n, 0)
                elif lib.llama_state_seq_set_data(ctx, depth_state, len(depth_state), 0) == 0:
                    lib.llama_memory_clear(mem, False)
                    s.run_prompt(ctx, batch, test.n_depth, s.prompt_chunks(test.n_depth))
            with s.capture.paused(null):
                if test.kind == "pp":
                    chunks = s.prompt_chunks(test.n_prompt)
                    st0 = machine.snapshot()
                    t0 = time.perf_counter_ns()
                    s.run_prompt(ctx, batch, test.n_prompt, chunks)
                    wall = time.perf_counter_ns() - t0
                else:
                    toks = s.gen_tokens(test.n_gen)
                    st0 = machine.snapshot()
                    t0 = time.perf_counter_ns()
                    s.run_gen(ctx, batch, toks)
                    wall = time.perf_counter_ns() - t0
            state = machine.during(st0, machine.snapshot(), wall / 1e9, bench["threads"], s.device)
            out.append({
                **model_fields,
                "test": test.kind, "n_prompt": test.n_prompt, "n_gen": test.n_gen, "n_depth": test.n_depth,
                "rep": r, "wall_ns": wall, "tokens_per_s": test.n_tokens * 1e9 / wall,
                "n_ctx": test.n_prompt + test.n_gen + test.n_depth,
                **ctx_fields,
                "rss_peak_bytes": memory.peak_rss_bytes(), **memory.rss_parts(),
                "extra": {**ctx_fields["extra"], "machine": state},
            })
        # the test's device memory, read once its repetitions are done (its peak at the boundaries: pp's is not tg's;
        # what the decodes grew, cuBLAS's workspace and CUDA's pools, is held until the context goes)
        dev = watch.fields({"after_load": after_load, "after_context": after_ctx, "after_test": watch.read()})
        dev["memory_breakdown"] = breakdown.breakdown(ctx)
        g = gpu_sampler.peak if gpu_sampler else None
        dev.update(gpu_used_peak_bytes=g.device_used_bytes if g else None,
                   gpu_process_bytes=g.process_bytes if g else None)
        out = [{**rec, **dev} for rec in out]
    finally:
        # sent after the test's repetitions, so that the parent's writing and progress bar never run inside a
        # timed region (a crash loses at most this visit's repetitions of this test)
        for rec in out:
            emit(rec)
        batch.free()
        lib.llama_free(ctx)
