"""Memory trackers: the sampler's peak logic on fixed readings; the NVML probe answers 'no GPU' here."""

from __future__ import annotations

import os

import pytest

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


@pytest.mark.skipif(os.path.exists("/dev/nvidia0"), reason="this machine has an NVIDIA GPU")
def test_nvml_probe_says_no_gpu_on_cpu_machines():
    assert memory.nvml_probe() is None


def test_peak_rss_is_at_least_current():
    blob = bytearray(64 * 1024 * 1024)  # touch 64 MiB
    for i in range(0, len(blob), 4096):
        blob[i] = 1
    current = memory.rss_bytes()  # read first: the high-water mark read after it can only be higher
    assert memory.peak_rss_bytes() >= current > 64 * 1024 * 1024
