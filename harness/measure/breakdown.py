"""llama.cpp's own memory arithmetic, with and without the memory: its per-buffer-type breakdown of a context
(``llama_get_memory_breakdown``: model, context (KV) and compute bytes), and the same for a model loaded with
``no_alloc`` ("only load metadata and simulate memory allocations", what llama.cpp's ``--fit`` uses), which gives
any quant x context x K/V type x flash attention x parallel sequences (unified KV cache or split by sequence)
on the devices at hand in milliseconds, with nothing allocated.

``llama_get_memory_breakdown`` is exported by libllama but is C++ (it returns a ``std::map``): a ten-line C shim
compiled once with the C++ compiler that built llama.cpp flattens it into arrays (cached beside the harness's
other builds, keyed by the libllama it links); the same shim has llama-bench's null log callback. Where no
compiler is found the breakdown is None, said once.
The command is :mod:`harness.simulate`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

SHIM_SRC = r"""
#include <cstddef>
#include <map>
struct llama_context;
struct ggml_backend_buffer_type;
typedef ggml_backend_buffer_type * ggml_backend_buffer_type_t;
struct llama_memory_breakdown_data {  // as src/llama-ext.h of the pinned llama.cpp
    size_t model = 0;
    size_t context = 0;
    size_t compute = 0;
    size_t total() const { return model + context + compute; }
};
using llama_memory_breakdown = std::map<ggml_backend_buffer_type_t, llama_memory_breakdown_data>;
llama_memory_breakdown llama_get_memory_breakdown(const struct llama_context * ctx);
extern "C" int harness_memory_breakdown(const llama_context * ctx, void ** bufts, size_t * sizes, int cap) {
    llama_memory_breakdown m = llama_get_memory_breakdown(ctx);
    int i = 0;
    for (const auto & kv : m) {
        if (i < cap) {
            bufts[i] = kv.first;
            sizes[3 * i] = kv.second.model;
            sizes[3 * i + 1] = kv.second.context;
            sizes[3 * i + 2] = kv.second.compute;
        }
        i++;
    }
    return i;
}
// llama-bench's llama_null_log_callback: llama.cpp's log goes nowhere, without a call into Python per line
extern "C" void harness_null_log(int level, const char * text, void * user_data) {
    (void) level; (void) text; (void) user_data;
}
"""


class SimulateError(RuntimeError):
    pass


_shim: Any = None
_shim_error: str | None = None


def _libllama() -> Path:
    from harness.measure import devices

    loaded = devices._loaded("libllama.")
    if loaded:
        return Path(loaded)
    cands = sorted(devices.lib_dir().glob("libllama.*"))
    if not cands:
        raise SimulateError(f"no libllama in {devices.lib_dir()}")
    return cands[0]


def shim():
    """The compiled shim, or None (with the reason in `shim_error()`) where it cannot be built."""
    global _shim, _shim_error
    if _shim is not None or _shim_error is not None:
        return _shim
    try:
        lib = _libllama()
        st = lib.stat()
        key = hashlib.sha256(f"{lib.resolve()}|{st.st_size}|{st.st_mtime_ns}|{SHIM_SRC}".encode()).hexdigest()[:16]
        cache = Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "harness") / "shim"
        so = cache / f"breakdown-{key}.so"
        if not so.exists():
            cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
            if not cxx:
                raise SimulateError("no C++ compiler (c++, g++ or clang++) to build the memory-breakdown shim")
            cache.mkdir(parents=True, exist_ok=True)
            src = cache / f"breakdown-{key}.cpp"
            src.write_text(SHIM_SRC)
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            cmd = [cxx, "-std=c++17", "-shared", "-fPIC", "-O1", str(src), "-o", str(tmp), str(lib),
                   f"-Wl,-rpath,{lib.parent}"]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                raise SimulateError(f"the memory-breakdown shim did not compile: {p.stderr.strip()[:300]}")
            os.replace(tmp, so)
        s = ctypes.CDLL(str(so))
        f = s.harness_memory_breakdown
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t),
                      ctypes.c_int]
        _shim = s
    except (SimulateError, OSError) as e:
        _shim_error = str(e)
        log.warning("llama.cpp's memory breakdown is not available: %s", e)
    return _shim


def null_log():
    """A C log callback that does nothing (the shim's harness_null_log), as a function pointer for llama_log_set;
    None where the shim cannot be built."""
    s = shim()
    if s is None:
        return None
    import llama_cpp

    return ctypes.cast(s.harness_null_log, llama_cpp.llama_log_callback)


def shim_error() -> str | None:
    return _shim_error


def breakdown(ctx) -> dict[str, dict[str, int]] | None:
    """llama.cpp's memory breakdown of a context: {buffer type name: {"model", "context", "compute" bytes,
    "host": whether that buffer type is host memory}}; None where the shim is not available."""
    s = shim()
    if s is None:
        return None
    from harness.measure import devices

    g = devices.ggml()
    for name, res in (("ggml_backend_buft_name", ctypes.c_char_p), ("ggml_backend_buft_is_host", ctypes.c_bool)):
        fn = getattr(g, name)
        fn.restype, fn.argtypes = res, [ctypes.c_void_p]
    cap = 64
    bufts = (ctypes.c_void_p * cap)()
    sizes = (ctypes.c_size_t * (3 * cap))()
    ptr = ctx if isinstance(ctx, int) else getattr(ctx, "value", None) or ctypes.cast(ctx, ctypes.c_void_p).value
    n = s.harness_memory_breakdown(ctypes.c_void_p(ptr), bufts, sizes, cap)
    out: dict[str, dict[str, int]] = {}
    for i in range(min(n, cap)):
        name = g.ggml_backend_buft_name(bufts[i]).decode(errors="replace")
        # CPU_REPACK is not "host" to ggml (an extra buffer type of the CPU's) but is host memory all the same
        host = bool(g.ggml_backend_buft_is_host(bufts[i])) or name.startswith("CPU")
        d = out.setdefault(name, {"model": 0, "context": 0, "compute": 0, "host": host})
        d["model"] += int(sizes[3 * i])
        d["context"] += int(sizes[3 * i + 1])
        d["compute"] += int(sizes[3 * i + 2])
    return out


class SimCell(NamedTuple):
    """One simulated context, with llama.cpp's own sizes of it."""
    breakdown: dict[str, dict[str, Any]] | None  # as breakdown(): bytes by buffer type; None without the shim
    ns: int  # wall time to create the context and read its breakdown
    n_ctx: int  # llama_n_ctx: the context as llama.cpp makes it (padded to 256; split: n_seq_max x n_ctx_seq)
    n_ctx_seq: int  # llama_n_ctx_seq: each sequence's context (n_ctx / n_seq_max padded to 256; unified: n_ctx)
    n_seq_max: int  # parallel sequences (llama.cpp's --parallel)
    kv_unified: bool  # one KV buffer shared by all sequences (llama.cpp's --kv-unified)


def max_seq() -> int:
    """llama.cpp's LLAMA_MAX_SEQ: the most parallel sequences a context takes (256 in the pinned source)."""
    import llama_cpp

    return int(llama_cpp.llama_max_parallel_sequences())


class Simulator:
    """A model loaded with no_alloc (metadata only, llama.cpp's --fit way: no mmap, nothing read), whose contexts
    are created with nothing allocated, to read llama.cpp's breakdown of what they would take."""

    def __init__(self, path: str, bench: dict[str, Any]):
        import llama_cpp

        self.lib = llama_cpp
        self.bench = bench
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        ngl = bench.get("n_gpu_layers", -1)
        mp.n_gpu_layers = 999 if ngl < 0 else ngl
        mp.no_alloc = True
        mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
        t0 = time.perf_counter_ns()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        self.load_ns = time.perf_counter_ns() - t0
        if not self.model:
            raise SimulateError(f"llama.cpp could not load {path} with no_alloc")

    def context(self, n_ctx: int, kv: tuple[str, str], flash_attn: str, n_seq_max: int = 1,
                kv_unified: bool = False) -> SimCell:
        """One context of `n_ctx` tokens for `n_seq_max` sequences (split evenly between them unless `kv_unified`),
        as llama.cpp would make it; SimulateError where llama.cpp refuses it."""
        from harness.config import CACHE_TYPES, FLASH_ATTN_TYPES

        lib, b = self.lib, self.bench
        cp = lib.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = b.get("n_batch", 512)
        cp.n_ubatch = b.get("n_ubatch", 512)
        cp.n_threads = cp.n_threads_batch = b.get("threads") or 1
        cp.flash_attn_type = FLASH_ATTN_TYPES[flash_attn]
        cp.type_k, cp.type_v = CACHE_TYPES[kv[0]], CACHE_TYPES[kv[1]]
        cp.swa_full = False
        cp.n_seq_max = n_seq_max
        cp.kv_unified = kv_unified
        users = f", {n_seq_max} sequences" + (" unified" if kv_unified else "") if n_seq_max != 1 else ""
        # llama.cpp reserves one output row per sequence in a buffer of min(n_ctx, n_batch) rows, and aborts the
        # process where there are more (GGML_ASSERT in llama_context::output_reserve of the pinned source)
        rows = min(n_ctx, cp.n_batch)
        if n_seq_max > rows:
            raise SimulateError(f"llama.cpp refuses a context of {n_ctx} tokens{users}: it holds at most "
                                f"min(n_ctx, n_batch {cp.n_batch}) = {rows} sequences (and aborts on more)")
        t0 = time.perf_counter_ns()
        ctx = lib.llama_init_from_model(self.model, cp)
        if not ctx:
            raise SimulateError(f"llama.cpp refuses a context of {n_ctx} tokens (KV {kv[0]}/{kv[1]}, "
                                f"flash_attn {flash_attn}{users})")
        try:
            bd = breakdown(ctx)
            ns = time.perf_counter_ns() - t0
            return SimCell(bd, ns, int(lib.llama_n_ctx(ctx)), int(lib.llama_n_ctx_seq(ctx)), int(n_seq_max),
                           bool(kv_unified))
        finally:
            lib.llama_free(ctx)

    def cell(self, n_ctx: int, kv: tuple[str, str], flash_attn: str, n_seq_max: int = 1,
             kv_unified: bool = False) -> tuple[dict | None, int]:
        """(breakdown, ns) of one context (:meth:`context`)."""
        c = self.context(n_ctx, kv, flash_attn, n_seq_max, kv_unified)
        return c.breakdown, c.ns

    def free(self) -> None:
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None


def totals(bd: dict[str, dict[str, int]] | None) -> dict[str, int] | None:
    """A breakdown summed by where it lives: device_* (buffer types that are not host memory) and host_*."""
    if bd is None:
        return None
    out = {f"{side}_{k}": 0 for side in ("device", "host") for k in ("model", "context", "compute")}
    for d in bd.values():
        side = "host" if d["host"] else "device"
        for k in ("model", "context", "compute"):
            out[f"{side}_{k}"] += d[k]
    return out
