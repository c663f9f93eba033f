"""Memory trackers: the sampler's peak logic on fixed readings; the NVML probe answers 'no GPU' here."""

from __future__ import annotations

import sys
import types

from harness.measure import memory


def test_sampler_peak_first_last_fieldwise():
    readings = iter([memory.GpuReading(100, None), memory.GpuReading(300, 50), memory.GpuReading(200, 80),
                     memory.GpuReading(150, 10)])
    s = memory.PeakSampler(lambda: next(readings), interval_s=3600)  # no background samples: exact sequence
    s.__enter__()
    s.sample()
    s.sample()
    s.__exit__(None, None, None)
    assert s.first == (100, None)
    assert s.last == (150, 10)
    assert s.peak == (300, 80)  # field-wise maxima; None never wins over a number
    assert s.samples == 4


def test_sampler_survives_failed_reads():
    calls = {"n": 0}

    def read():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("driver hiccup")
        return memory.GpuReading(calls["n"], None)

    with memory.PeakSampler(read, interval_s=0.001) as s:
        import time

        time.sleep(0.05)
    assert s.peak[0] == calls["n"] and s.samples >= 2


def test_nvml_probe_says_no_gpu_without_a_library_a_driver_or_a_device(monkeypatch):
    """Whatever this host has: NVML's module replaced by test doubles of each way it says "no GPU"."""
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed: the import fails
    assert memory.nvml_probe() is None

    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")  # what nvmlInit raises without a driver

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=no_driver))
    assert memory.nvml_probe() is None
    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=lambda: None,
                                                                     nvmlDeviceGetCount=lambda: 0))
    assert memory.nvml_probe() is None


def test_peak_rss_is_at_least_current():
    blob = bytearray(64 * 1024 * 1024)  # touch 64 MiB
    for i in range(0, len(blob), 4096):
        blob[i] = 1
    current = memory.rss_bytes()  # read first: the high-water mark read after it can only be higher
    assert memory.peak_rss_bytes() >= current > 64 * 1024 * 1024
