"""The CPU's memory bandwidth, measured: the page's speed formula needs one for a CPU, and the calibration
reports efficiency against it."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import numpy as np

from harness.config import default_cache_dir

GB = 1e9

_BLOCK = 16384  # float64 elements per triad step (128 KiB): the scaled temporary stays in L2


def _n_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _l3_mib() -> float:
    """The last-level cache in MiB (0 where unknown)."""
    try:
        text = open("/sys/devices/system/cpu/cpu0/cache/index3/size").read().strip()
    except OSError:
        return 0
    m = re.match(r"(\d+)([KMG]?)", text)
    if not m:
        return 0
    return int(m[1]) * {"": 1 / 2**20, "K": 1 / 1024, "M": 1, "G": 1024}[m[2]]


def measure_cpu_bandwidth_detail(seconds: float = 1.2, threads: int | None = None, array_mib: int | None = None,
                                 min_trials: int = 3) -> dict:
    """STREAM-style copy (a = b) and triad (a = b + s*c) over three float64 arrays of `array_mib` MiB each
    (default: the size of the last-level cache, 64 to 256 MiB, so that no kernel's working set fits in it),
    split into one chunk per thread; numpy releases the GIL, so the threads stream in parallel. Both kernels
    run in turn until `seconds` (allocation included) are spent, at least `min_trials` times; the best time
    counts. Bytes are counted as STREAM does (copy 2, triad 3 arrays; no write-allocate traffic).

    Returns {"copy_gb_s", "triad_gb_s", "gb_s" (the better of the two), "threads", "array_mib", "trials",
    "method"}.
    """
    deadline = time.perf_counter() + seconds  # allocation and first touch count against the budget
    n_threads = max(1, threads or _n_threads())
    if array_mib is None:
        array_mib = int(min(256, max(64, _l3_mib())))
    n = array_mib * 1024 * 1024 // 8
    a, b, c = (np.empty(n) for _ in range(3))
    bounds = np.linspace(0, n, n_threads + 1).astype(int)
    chunks = list(zip(bounds[:-1], bounds[1:]))
    scalar = 3.0

    def init(lo: int, hi: int) -> None:  # first touch from the thread that streams the chunk (NUMA)
        a[lo:hi] = 0.0
        b[lo:hi] = 1.0
        c[lo:hi] = 2.0

    def copy(lo: int, hi: int) -> None:
        np.copyto(a[lo:hi], b[lo:hi])

    def triad(lo: int, hi: int) -> None:
        tmp = np.empty(_BLOCK)
        for i in range(lo, hi, _BLOCK):
            j = min(i + _BLOCK, hi)
            t = tmp[: j - i]
            np.multiply(c[i:j], scalar, out=t)
            np.add(b[i:j], t, out=a[i:j])

    def parallel(kernel) -> float:
        barrier = threading.Barrier(n_threads + 1)
        workers = [threading.Thread(target=lambda lo=lo, hi=hi: (barrier.wait(), kernel(lo, hi)))
                   for lo, hi in chunks]
        for w in workers:
            w.start()
        barrier.wait()
        t0 = time.perf_counter_ns()
        for w in workers:
            w.join()
        return (time.perf_counter_ns() - t0) / 1e9

    parallel(init)
    best = {"copy": float("inf"), "triad": float("inf")}
    trials = {"copy": 0, "triad": 0}
    while True:
        for name, kernel in (("copy", copy), ("triad", triad)):
            best[name] = min(best[name], parallel(kernel))
            trials[name] += 1
        if trials["copy"] >= min_trials and time.perf_counter() >= deadline:
            break
    nbytes = n * 8
    copy_gb_s = 2 * nbytes / best["copy"] / GB
    triad_gb_s = 3 * nbytes / best["triad"] / GB
    return {
        "copy_gb_s": copy_gb_s, "triad_gb_s": triad_gb_s, "gb_s": max(copy_gb_s, triad_gb_s),
        "threads": n_threads, "array_mib": array_mib, "trials": trials["copy"],
        "method": (f"numpy STREAM copy/triad, {n_threads} threads, 3 x {array_mib} MiB float64, best of "
                   f"{trials['copy']} trials; the better kernel counts (copy {copy_gb_s:.1f}, "
                   f"triad {triad_gb_s:.1f} GB/s, STREAM byte counting)"),
    }


def measure_cpu_bandwidth(seconds: float = 1.2, threads: int | None = None, array_mib: int | None = None) -> float:
    """Sustained CPU memory bandwidth in GB/s (1e9 bytes/s): see :func:`measure_cpu_bandwidth_detail`."""
    return measure_cpu_bandwidth_detail(seconds, threads, array_mib)["gb_s"]


# --- a compiled STREAM kernel ---------------------------------------------------------------------------------------

_STREAM_C = r"""
#include <stddef.h>
#include <omp.h>
/* STREAM-style kernels over n doubles with `threads` OpenMP threads, static schedule (each thread streams the
   chunk it first touched). Returns seconds. */
double harness_init(double *a, double *b, double *c, size_t n, int threads) {
    double t = omp_get_wtime();
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (size_t i = 0; i < n; i++) { a[i] = 0.0; b[i] = 1.0; c[i] = 2.0; }
    return omp_get_wtime() - t;
}
/* eight independent sums (n is a multiple of 8), so that the loop is bound by memory, not by the latency of
   one chain of additions */
double harness_sum(const double *a, size_t n, int threads, double *out) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0, t = omp_get_wtime();
    #pragma omp parallel for schedule(static) num_threads(threads) reduction(+:s0,s1,s2,s3,s4,s5,s6,s7)
    for (size_t i = 0; i < n; i += 8) {
        s0 += a[i]; s1 += a[i + 1]; s2 += a[i + 2]; s3 += a[i + 3];
        s4 += a[i + 4]; s5 += a[i + 5]; s6 += a[i + 6]; s7 += a[i + 7];
    }
    *out = s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7;
    return omp_get_wtime() - t;
}
double harness_triad(double *a, const double *b, const double *c, double q, size_t n, int threads) {
    double t = omp_get_wtime();
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (size_t i = 0; i < n; i++) a[i] = b[i] + q * c[i];
    return omp_get_wtime() - t;
}
"""


def _stream_lib():
    """The kernels above, compiled once per source into the harness's cache (cc -O3 -fopenmp); None where no
    compiler (or OpenMP) is at hand."""
    import ctypes
    import hashlib
    import subprocess
    import tempfile

    cache = default_cache_dir() / "stream"
    flags = ["-O3", "-fopenmp", "-shared", "-fPIC"]
    so = cache / f"stream-{hashlib.sha256((_STREAM_C + ' '.join(flags)).encode()).hexdigest()[:16]}.so"
    if not so.is_file():
        cc = os.environ.get("CC", "cc")
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "stream.c"
                src.write_text(_STREAM_C)
                out = Path(tmp) / so.name
                r = subprocess.run([cc, *flags, "-o", str(out), str(src)],
                                   capture_output=True, text=True, timeout=120)
                if r.returncode != 0:
                    return None
                os.replace(out, so)
        except (OSError, subprocess.SubprocessError):
            return None
    lib = ctypes.CDLL(str(so))
    dp, sz = ctypes.POINTER(ctypes.c_double), ctypes.c_size_t
    lib.harness_init.argtypes = [dp, dp, dp, sz, ctypes.c_int]
    lib.harness_sum.argtypes = [dp, sz, ctypes.c_int, dp]
    lib.harness_triad.argtypes = [dp, dp, dp, ctypes.c_double, sz, ctypes.c_int]
    for f in (lib.harness_init, lib.harness_sum, lib.harness_triad):
        f.restype = ctypes.c_double
    return lib


def measure_cpu_bandwidth_compiled(threads: int | None = None, array_mib: int | None = None,
                                   trials: int = 10) -> dict | None:
    """STREAM in C (:data:`_STREAM_C`): a read-only sum over one array and the triad a = b + q c, each over
    arrays of at least 4x the last-level cache (and 256 MiB), with `threads` threads (default: the measurement's,
    the physical cores), median of `trials` runs each. Bytes as STREAM counts them (sum 1 array, triad 3).
    The read-only sum is what generation does with the weights, so it is the bandwidth the harness uses; both
    are reported, with their ratio. None where the kernels cannot be compiled."""
    import ctypes
    import statistics

    lib = _stream_lib()
    if lib is None:
        return None
    if threads is None:
        import psutil

        threads = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if array_mib is None:
        array_mib = int(max(256, 4 * _l3_mib()))
    n = array_mib * 1024 * 1024 // 8
    a, b, c = (np.empty(n) for _ in range(3))
    dp = ctypes.POINTER(ctypes.c_double)
    pa, pb, pc = (x.ctypes.data_as(dp) for x in (a, b, c))
    lib.harness_init(pa, pb, pc, n, threads)
    acc = ctypes.c_double()
    lib.harness_sum(pa, n, threads, ctypes.byref(acc))  # warm-up
    sums = [lib.harness_sum(pb, n, threads, ctypes.byref(acc)) for _ in range(trials)]
    triads = [lib.harness_triad(pa, pb, pc, 3.0, n, threads) for _ in range(trials)]
    nbytes = n * 8
    sum_gb_s = nbytes / statistics.median(sums) / GB
    triad_gb_s = 3 * nbytes / statistics.median(triads) / GB
    ratio = max(sum_gb_s, triad_gb_s) / min(sum_gb_s, triad_gb_s)
    return {
        "gb_s": sum_gb_s, "sum_gb_s": sum_gb_s, "triad_gb_s": triad_gb_s, "ratio": ratio, "threads": threads,
        "array_mib": array_mib, "trials": trials,
        "method": (f"compiled STREAM (C, OpenMP), {threads} threads, arrays of {array_mib} MiB (>= 4x the "
                   f"last-level cache), median of {trials}: read-only sum {sum_gb_s:.1f} GB/s (used), triad "
                   f"{triad_gb_s:.1f} GB/s, ratio {ratio:.2f}"),
    }
