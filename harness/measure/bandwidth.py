"""The CPU's memory bandwidth, measured: the page's speed formula needs one for a CPU, and the calibration
reports efficiency against it."""

from __future__ import annotations

import os
import re
import threading
import time

import numpy as np

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
