"""Device catalog look-ups (typed names and NVML's), the CPU bandwidth probe, and env.py's use of them."""

from __future__ import annotations

import pytest

from harness.catalog import devices, page
from harness.measure import bandwidth, env


@pytest.mark.parametrize("name,expected", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),  # NVML's name of the SXM part
    ("H100 SXM", "NVIDIA H100 SXM"),
    ("h100", "NVIDIA H100 SXM"),
    ("NVIDIA H100 80GB", "NVIDIA H100 SXM"),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
    ("NVIDIA H100 NVL", "NVIDIA H100 NVL"),
    ("NVIDIA H200", "NVIDIA H200"),
    ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 40GB"),
    ("NVIDIA A100-PCIE-40GB", "NVIDIA A100 40GB"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB"),
    ("NVIDIA A100 80GB PCIe", "NVIDIA A100 80GB PCIe"),
    ("NVIDIA L4", "NVIDIA L4"),
    ("NVIDIA L40S", "NVIDIA L40S"),
    ("Tesla T4", "NVIDIA Tesla T4"),
    ("NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3090"),
    ("NVIDIA GeForce RTX 3090 Ti", "NVIDIA GeForce RTX 3090 Ti"),
    ("RTX 4090", "NVIDIA GeForce RTX 4090"),
    ("rtx4090", "NVIDIA GeForce RTX 4090"),
    ("NVIDIA GeForce RTX 5090", "NVIDIA GeForce RTX 5090"),
    ("AMD Instinct MI250X", "AMD Instinct MI250X"),
    ("mi300x", "AMD Instinct MI300X"),
    ("Apple M1", "Apple M1"),
    ("Apple M2 Max", "Apple M2 Max"),
    ("M3 Ultra", "Apple M3 Ultra"),
    ("m4 pro", "Apple M4 Pro"),
])
def test_lookup(name, expected):
    assert devices.lookup(name).name == expected


def test_unknown_names_get_a_suggestion():
    with pytest.raises(devices.UnknownDevice, match="did you mean 'NVIDIA GeForce RTX 4090'"):
        devices.lookup("RTX 4900")
    with pytest.raises(devices.UnknownDevice, match="did you mean"):
        devices.lookup("M4 Ultra")  # no such chip; must not fall back to the plain M4
    with pytest.raises(devices.UnknownDevice):
        devices.lookup("")
    assert devices.find("no such device at all") is None
    assert devices.find(None) is None


def test_catalog_is_consistent():
    names = [d.name for d in devices.CATALOG]
    assert len(names) == len(set(names))
    for d in devices.CATALOG:
        assert d.vendor in ("nvidia", "amd", "apple")
        assert d.memory_bytes > 0 and d.bandwidth_gb_s > 0 and d.source
        assert devices.lookup(d.name) is d
        assert set(d.as_dict()) == {"name", "vendor", "memory_bytes", "bandwidth_gb_s", "hbm", "source"}


def test_hbm_parts_are_the_ones_whose_spec_prints_hbm():
    """HBM as the spec source prints it, or stated (the NVL cards); never a GDDR card or Apple's unified memory."""
    hbm = {d.name for d in devices.CATALOG if d.hbm}
    assert {"NVIDIA H100 SXM", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA A100 80GB", "AMD Instinct MI300X",
            "AMD Instinct MI250X"} <= hbm
    assert not hbm & {"NVIDIA GeForce RTX 4090", "NVIDIA L40S", "AMD Radeon RX 7900 XTX", "Apple M2 Ultra"}
    for d in devices.CATALOG:
        assert d.hbm == (d.hbm_stated or "hbm" in d.source.lower())


def test_catalog_has_the_pages_gpus_with_the_pages_bandwidths():
    for s in page.SPEEDS:
        d = devices.lookup(s.device)
        assert (d.bandwidth_gb_s, d.vendor) == (s.bandwidth_gb_s, s.vendor)


def test_spec_bandwidths():
    assert devices.lookup("H100 SXM").bandwidth_gb_s == 3352
    assert devices.lookup("H200").bandwidth_gb_s == 4800
    assert devices.lookup("A100 80GB").bandwidth_gb_s == 2039
    assert devices.lookup("RTX 3090").bandwidth_gb_s == 936
    assert devices.lookup("RTX 5090").bandwidth_gb_s == 1792


def test_cpu_bandwidth_probe_small():
    d = bandwidth.measure_cpu_bandwidth_detail(seconds=0.05, array_mib=8, threads=2)
    assert d["copy_gb_s"] > 0 and d["triad_gb_s"] > 0 and d["gb_s"] == max(d["copy_gb_s"], d["triad_gb_s"])
    assert d["threads"] == 2 and d["trials"] >= 3 and "STREAM" in d["method"]


def test_cpu_bandwidth_probe_default():
    """The default probe gives a bandwidth in a physical range (its duration is measured in
    benchmarks/timings.py)."""
    gb_s = bandwidth.measure_cpu_bandwidth()
    assert 0.1 < gb_s < 10_000


def test_cpu_device():
    d = devices.cpu_device("Some CPU", 12.5, 8 * 1024**3, "numpy")
    assert (d.vendor, d.bandwidth_gb_s, d.source) == ("cpu", 12.5, "measured: numpy")


def test_env_entries(monkeypatch):
    assert env.catalog_entry({"name": "NVIDIA H100 80GB HBM3"})["bandwidth_gb_s"] == 3352
    assert env.catalog_entry({"name": "Some Future GPU"}) is None
    assert env.catalog_entry(None) is None
    monkeypatch.setattr(bandwidth, "measure_cpu_bandwidth_compiled", lambda: {
        "gb_s": 20.004, "sum_gb_s": 20.004, "triad_gb_s": 18.0, "ratio": 1.1113, "method": "compiled"})
    assert env.memory_bandwidth() == {"measured_gb_s": 20.0, "sum_gb_s": 20.0, "triad_gb_s": 18.0, "ratio": 1.111,
                                      "method": "compiled"}
    monkeypatch.setattr(bandwidth, "measure_cpu_bandwidth_compiled", lambda: None)  # no compiler: numpy's
    monkeypatch.setattr(bandwidth, "measure_cpu_bandwidth_detail", lambda: {
        "gb_s": 12.345, "copy_gb_s": 12.345, "triad_gb_s": 6.0, "method": "test"})
    assert env.memory_bandwidth() == {"measured_gb_s": 12.35, "copy_gb_s": 12.35, "triad_gb_s": 6.0,
                                      "method": "test"}

    def broken():
        raise MemoryError("no room")

    monkeypatch.setattr(bandwidth, "measure_cpu_bandwidth_detail", broken)
    assert env.memory_bandwidth() is None


def test_compiled_stream_kernels_compute_and_measure():
    import ctypes

    import numpy as np

    lib = bandwidth._stream_lib()
    assert lib is not None, "a C compiler with OpenMP builds the STREAM kernels (the project needs one anyway)"
    n = 1 << 16
    a, b, c = np.empty(n), np.empty(n), np.empty(n)
    dp = ctypes.POINTER(ctypes.c_double)
    lib.harness_init(a.ctypes.data_as(dp), b.ctypes.data_as(dp), c.ctypes.data_as(dp), n, 2)
    out = ctypes.c_double()
    lib.harness_sum(b.ctypes.data_as(dp), n, 2, ctypes.byref(out))
    assert out.value == n  # b is all ones
    lib.harness_triad(a.ctypes.data_as(dp), b.ctypes.data_as(dp), c.ctypes.data_as(dp), 3.0, n, 2)
    assert (a == 1.0 + 3.0 * 2.0).all()
    d = bandwidth.measure_cpu_bandwidth_compiled(threads=2, array_mib=16, trials=10)
    assert d["sum_gb_s"] > 0 and d["triad_gb_s"] > 0 and d["gb_s"] == d["sum_gb_s"] and d["trials"] == 10
    assert d["ratio"] == max(d["sum_gb_s"], d["triad_gb_s"]) / min(d["sum_gb_s"], d["triad_gb_s"])
    assert "read-only sum" in d["method"]
    assert bandwidth.measure_cpu_bandwidth_compiled.__defaults__ == (None, None, 10)  # >= 10 trials by default
