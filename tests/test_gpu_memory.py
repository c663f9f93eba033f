"""Device memory on an NVIDIA GPU from one baseline: NVML's reading before any CUDA call. The first CUDA call (a
device's memory query) creates the process's CUDA context, which every figure must then count. No GPU runs here:
NVML is a test double whose device gains a context's memory at the first ggml device query, as a driver's does."""

from __future__ import annotations

import os
from types import SimpleNamespace

from harness.measure import bench, devices, memory

MIB = 1024 * 1024
CONTEXT = 420 * MIB  # a CUDA context's size is 0.3-0.5 GiB; any figure serves


class FakeDriver:
    """NVML's module as a driver answers it: memory in use on the device, and this process once it is on it."""

    NVMLError = RuntimeError
    NVML_CLOCK_MEM = 2

    def __init__(self):
        self.device_used = 600 * MIB  # other tenants and the driver
        self.mine: int | None = None  # this process's usage: not listed before its CUDA context

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return "NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=141 * 1024 * MIB, used=self.device_used)

    def nvmlSystemGetDriverVersion(self):
        return "580.95.05"

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [] if self.mine is None else [SimpleNamespace(pid=os.getpid(), usedGpuMemory=self.mine)]

    def allocate(self, n: int) -> None:
        if self.mine is None:  # the first CUDA call makes the context
            self.mine = CONTEXT
            self.device_used += CONTEXT
        self.mine += n
        self.device_used += n


def watch_with(monkeypatch, per_process: bool = True):
    drv = FakeDriver()
    if not per_process:  # containers often deny per-process accounting
        def denied(h):
            raise RuntimeError("Not Supported")
        drv.nvmlDeviceGetComputeRunningProcesses = denied
    monkeypatch.setattr(devices, "memory_now", lambda: drv.allocate(0) or {"CUDA0": {"free_bytes": 0,
                                                                                     "total_bytes": 0}})
    return drv, bench.DeviceWatch(memory.Nvml(drv), None)


def test_one_baseline_before_the_cuda_context_counts_it_in_every_figure(monkeypatch):
    drv, w = watch_with(monkeypatch)
    w.start()  # reads the devices: the context is made here
    assert w.nvml_base.process_bytes is None and w.nvml_base.device_used_bytes == 600 * MIB
    drv.allocate(700 * MIB)  # the weights
    used, src = w.used(w.read())
    assert (used, src) == (CONTEXT + 700 * MIB, "process")  # the context counted (it was left out before)
    f = w.fields({"after_load": w.read()})
    assert f["device_memory"]["before_load"]["counts_cuda_context"] is True
    assert f["device_used_bytes"] == CONTEXT + 700 * MIB


def test_without_per_process_accounting_the_device_figure_has_the_same_baseline(monkeypatch):
    drv, w = watch_with(monkeypatch, per_process=False)
    w.start()
    drv.allocate(700 * MIB)
    assert w.used(w.read()) == (CONTEXT + 700 * MIB, "device")  # NVML's device use since before the context
