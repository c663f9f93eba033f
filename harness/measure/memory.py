"""Memory trackers: process RSS on every machine, NVML device memory on an NVIDIA GPU.

The NVML part sits behind :func:`nvml_probe`, which answers None ("no GPU") wherever the NVML library or a
device is missing, so the CPU path runs the same code with the GPU readings left null. The sampler takes
any reader function, which lets its peak/before/after logic be tested on the CPU.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import NamedTuple

import psutil

log = logging.getLogger(__name__)


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def rss_parts() -> dict[str, int | None]:
    """This process's resident set split into anonymous memory (what it cannot give back without swap: heap,
    llama.cpp's repacked weights, KV cache, compute buffers) and file-backed pages (the mmap'd model: clean, the
    kernel may drop and re-read them), from /proc/self/smaps_rollup. Nulls where that file does not exist."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f if ":" in line)
                  if v.split() and v.split()[0].isdigit()}
    except OSError:
        return {"rss_anon_bytes": None, "rss_file_bytes": None}
    anon = kb.get("Anonymous", 0) * 1024
    return {"rss_anon_bytes": anon, "rss_file_bytes": max(kb.get("Rss", 0) * 1024 - anon, 0)}


def peak_rss_bytes() -> int:
    """The kernel's high-water mark of this process's resident set (VmHWM): exact, no sampling gaps."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # macOS and others: ru_maxrss (bytes on macOS, KiB on Linux)

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if os.uname().sysname == "Darwin" else r * 1024


class GpuReading(NamedTuple):
    device_used_bytes: int  # memory used on the device, all processes
    process_bytes: int | None  # this process's own usage, where the driver reports it


class Nvml:
    """The first NVIDIA GPU, through NVML (package nvidia-ml-py)."""

    def __init__(self, pynvml, index: int = 0):
        self._nv = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(self.handle)
        self.name = name.decode() if isinstance(name, bytes) else name
        self.total_bytes = int(pynvml.nvmlDeviceGetMemoryInfo(self.handle).total)
        drv = pynvml.nvmlSystemGetDriverVersion()
        self.driver = drv.decode() if isinstance(drv, bytes) else drv
        self.pid = os.getpid()

    def read(self) -> GpuReading:
        used = int(self._nv.nvmlDeviceGetMemoryInfo(self.handle).used)
        own = None
        try:
            for p in self._nv.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if p.pid == self.pid and p.usedGpuMemory is not None:
                    own = int(p.usedGpuMemory)
        except self._nv.NVMLError:
            pass  # per-process accounting is unsupported in some containers; device totals still hold
        return GpuReading(used, own)

    def info(self) -> dict:
        out = {"name": self.name, "memory_total_bytes": self.total_bytes, "driver": self.driver}
        for key, call in (("compute_capability", lambda: ".".join(
                              str(x) for x in self._nv.nvmlDeviceGetCudaComputeCapability(self.handle))),
                          ("cuda_driver_version", lambda: _cuda_version(self._nv.nvmlSystemGetCudaDriverVersion())),
                          ("memory_bus_width_bits", lambda: int(self._nv.nvmlDeviceGetMemoryBusWidth(self.handle))),
                          ("max_memory_clock_mhz", lambda: int(self._nv.nvmlDeviceGetMaxClockInfo(
                              self.handle, self._nv.NVML_CLOCK_MEM)))):
            try:
                out[key] = call()
            except Exception:  # noqa: BLE001 - older drivers lack some queries: the field is then absent
                pass
        return out


def _cuda_version(v: int) -> str:
    """NVML's CUDA driver version (12040) as "12.4"."""
    return f"{v // 1000}.{v % 1000 // 10}"


def nvml_probe() -> Nvml | None:
    """The first NVIDIA GPU, or None where there is none (no library, no driver, no device)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() < 1:
            return None
        return Nvml(pynvml)
    except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...: all mean "no GPU"
        log.debug("NVML probe: no GPU (%s)", e)
        return None


class PeakSampler:
    """Samples `read()` every `interval_s` in a background thread and keeps the peak of each field.

    Used as a context manager around load and measurement. `read` returns a GpuReading (or any tuple of
    ints/None); `peak` holds the field-wise maxima, `first`/`last` the first and latest readings.
    """

    def __init__(self, read: Callable[[], tuple], interval_s: float | None = 0.01):
        self._read = read
        self.interval_s = interval_s
        self.first: tuple | None = None
        self.last: tuple | None = None
        self.peak: tuple | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def sample(self) -> tuple:
        r = self._read()
        with self._lock:
            if self.first is None:
                self.first = r
            self.last = r
            self.peak = r if self.peak is None else type(r)(*(
                b if a is None else a if b is None else max(a, b) for a, b in zip(self.peak, r)
            ))
            self.samples += 1
        return r

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - a failed reading must not kill the measurement
                log.debug("sampler read failed: %s", e)

    def __enter__(self) -> PeakSampler:
        self.sample()
        if self.interval_s is not None:  # None: no thread, sampled by whoever calls sample() (test boundaries)
            self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.sample()

