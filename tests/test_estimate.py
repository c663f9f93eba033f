"""`python -m harness estimate` end to end through harness.cli.main."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_calibrate import ENV_CPU, frame, make_records

from harness import cli
from harness.analysis import calibration, predict


def run(capsys, *args):
    rc = cli.main(["estimate", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def cpu_cal(tmp_path_factory):
    cal = calibration.calibrate(frame(make_records(noise=0.002)), ENV_CPU, run_id="cpu-run")
    return calibration.write(cal, tmp_path_factory.mktemp("cal") / "cpu.json")


@pytest.fixture(scope="module")
def h100_cal(tmp_path_factory):
    df = frame(make_records(device="cuda", gpu_name="NVIDIA H100 80GB HBM3", bw=3352, eff=0.5, overhead=0.002,
                            fam={}, noise=0.002, run_id="h100-run"))
    cal = calibration.calibrate(df, {"gpu": {"name": "NVIDIA H100 80GB HBM3"}}, run_id="h100-run")
    return calibration.write(cal, tmp_path_factory.mktemp("cal") / "h100.json")


@pytest.mark.parametrize("device,printed", [("RTX 4090", 799), ("H100 SXM", 2657), ("MI300X", 3555),
                                            ("MI250X", 2198)])
def test_page_estimate_reproduces_the_page(capsys, device, printed):
    rc, out, _ = run(capsys, "--device", device, "--quant", "Q4_K_M")
    assert rc == 0
    assert f"~{printed:,} tok/s printed" in out
    assert "VRAM 0.8 GB" in out and "file 0.74 GB" in out
    # the shipped cross-device calibration of llama.cpp's rows: one figure with a range from the held-out error
    # (by source, nested) of its case, what it rests on (a device's own rows where it has them, else its
    # family's, and its back end's per-token floor), no "upper bound" where the pooled floor stands behind it
    assert "on llama.cpp with an empty cache" in out and "(likely " in out and "rests on: " in out
    rests = {"RTX 4090": "this device's own (nvidia-cuda on NVIDIA GeForce RTX 4090)",
             "H100 SXM": "its family's (nvidia-cuda-hbm)",
             "MI300X": "this device's own (amd-rocm-hbm on AMD Instinct MI300X)",
             "MI250X": "its family's (amd-rocm-hbm)"}[device]
    assert f"rests on: {rests} efficiency" in out and "back end's per-token floor" in out
    assert "the range is the held-out error (leave one source out, with every row on its devices (nested: the " \
           "model choice inside the folds))" in out
    assert "upper bound" not in out
    # memory in llama.cpp's own terms (its no_alloc arithmetic, shipped): device model + KV + compute, host part
    import json

    data = json.loads((Path(__file__).resolve().parent.parent / "harness/data/buffers-1b.json").read_text())
    cell = data["quants"]["Q4_K_M"]["on:2048"]
    dev = (cell["device_model"] + cell["device_context"] + cell["device_compute"]) / 1e9
    assert f"memory:     on the GPU {dev:.2f} GB + the runtime's fixed cost" in out
    assert f"token_embd {cell['host_model'] / 1e9:.3f} GB" in out and "not in it: the runtime's fixed cost" in out
    assert cell["device_context"] == 2048 * 32 * 1024  # 16 layers x 8 KV heads x 64 x 2 (K, V) x f16


def test_unknown_device_and_quant(capsys):
    rc, out, err = run(capsys, "--device", "RTX 4900", "--quant", "Q4_K_M")
    assert rc == 2 and out == "" and err.count("\n") == 1 and "did you mean 'NVIDIA GeForce RTX 4090'" in err
    rc, out, err = run(capsys, "--device", "RTX 4090", "--quant", "Q4_KM")
    assert rc == 2 and err.count("\n") == 1 and "did you mean 'Q4_K_M'" in err


def test_bad_calibration_file(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    rc, _, err = run(capsys, "--device", "RTX 4090", "--quant", "Q4_K_M", "--calibration", str(bad))
    assert rc == 2 and "not a calibration file" in err


def test_a_cpu_calibration_is_never_carried_to_a_gpu(capsys, cpu_cal):
    """A CPU's fit (kernel-bound) is not scaled to a GPU: the shipped cross-device calibration answers, and its
    figure is the family's model on the quant's measured size at the GPU's spec bandwidth."""
    from harness.analysis import crossgpu

    rc, out, _ = run(capsys, "--device", "RTX 4090", "--quant", "Q4_K_M", "--context", "8192",
                     "--calibration", str(cpu_cal))
    assert rc == 0
    assert "the calibrations given are of CPUs" in out and "factors from Test CPU" not in out
    xcal = crossgpu.load_shipped()
    size = xcal["llama_3_2_1b"]["model_size_bytes"]["Q4_K_M"]
    expected, fam, family = crossgpu.predict_tok_s(xcal, "nvidia", 1008, size, "Q4_K_M",
                                                   device="NVIDIA GeForce RTX 4090")
    # the device's own rows, after CUDA's per-token floor (they predict better than the family's, held out)
    assert family == "nvidia-cuda on NVIDIA GeForce RTX 4090" and fam["basis"] == "device"
    m = re.search(r"tg ~([\d,.]+) tok/s \(likely [^)]*\) on llama.cpp with an empty cache", out)
    assert float(m[1].replace(",", "")) == pytest.approx(expected, abs=0.5)
    # by hand: time per token = overhead + bytes / (efficiency x the k/i-quants' factor x bandwidth)
    k = xcal["kinds"]["k/i-quants"]["factor"]
    assert fam["kind_factor"] == k < 1
    assert expected == pytest.approx(1 / (fam["overhead_s"] + size / (fam["efficiency"] * k * 1008e9)))
    assert "at 8,192 tokens" in out and "KV 0.268 GB" in out  # 8,192 cells x 32 KiB


def test_same_device_calibration_is_used_unscaled(capsys, cpu_cal, h100_cal):
    rc, out, _ = run(capsys, "--device", "NVIDIA H100 80GB HBM3", "--quant", "Q4_K_M",
                     "--calibration", str(cpu_cal), str(h100_cal))
    assert rc == 0
    assert "factors from NVIDIA H100 SXM (measured on this device)" in out and "bandwidth ratio" not in out
    expected, _, _ = predict.predict_tg_tok_s(calibration.load(h100_cal), "Q4_K_M", 0)
    m = re.search(r"tg ~([\d,.]+) tok/s", out)
    assert float(m[1].replace(",", "")) == pytest.approx(expected, rel=1e-3)


def test_nearest_bandwidth_wins_among_other_devices(capsys, cpu_cal, h100_cal):
    rc, out, _ = run(capsys, "--device", "H200", "--quant", "Q8_0", "--calibration", str(cpu_cal), str(h100_cal))
    assert rc == 0 and "factors from NVIDIA H100 SXM (nearest bandwidth" in out


XEON = Path(__file__).resolve().parent / "hostsim" / "cpuinfo-xeon-amx.txt"
Q4_K_PROBE = 2.5e-12  # s per weight: the made-up calibration's Q4_K kernel probe


@pytest.fixture
def as_xeon(monkeypatch):
    """This machine taken as an Intel Xeon host (its identity from tests/hostsim/), whose bandwidth measures 20 GB/s
    now; returns a function that sets the bandwidth measured now and the kernel probe's cost measured now."""
    from harness.analysis import probe_here
    from harness.measure import env

    monkeypatch.setenv("HARNESS_CPUINFO", str(XEON))
    now = {"gb_s": 20.0, "q4_k": Q4_K_PROBE}
    monkeypatch.setattr(env, "memory_bandwidth", lambda: {"measured_gb_s": now["gb_s"], "method": "test"})
    asked = []

    def costs(types, fresh=False, **kw):
        asked.append((sorted(types), fresh))
        return {t: {"s_per_weight": now["q4_k"] if t == "Q4_K" else 4e-12} for t in types}

    monkeypatch.setattr(probe_here, "kernel_costs", costs)
    return now, asked


def xeon_calibration(tmp_path, bandwidth_gb_s=20.0) -> Path:
    """A calibration made on the Xeon identity, with its fingerprint and a Q4_K probe."""
    from harness.measure import fingerprint

    fp = fingerprint.collect(bandwidth_gb_s)
    env = {**ENV_CPU, "cpu": {"model": fp["model_name"], "fingerprint": fp},
           "memory_bandwidth": {"measured_gb_s": bandwidth_gb_s, "method": "test"}}
    cal = calibration.calibrate(frame(make_records(noise=0.002)), env, run_id="xeon")
    cal["probes"] = {"Q4_K": {"s_per_weight": Q4_K_PROBE}}
    return calibration.write(cal, tmp_path / "xeon.json")


def test_a_calibration_is_this_machines_by_its_fingerprint_once_a_kernel_probe_confirms_it(capsys, tmp_path,
                                                                                          as_xeon):
    _, asked = as_xeon
    cal = xeon_calibration(tmp_path)
    rc, out, _ = run(capsys, "--device", "cpu", "--quant", "Q4_K_M", "--calibration", str(cal))
    assert rc == 0 and "on Intel(R) Xeon(R) Processor (20.0 GB/s" in out
    assert asked == [(["Q4_K"], True)]  # one probe, measured now (not taken from the cache)
    assert "calibrated: tg ~" in out and "this machine's calibration: fingerprint equal" in out
    assert "confirmed by a Q4_K kernel probe measured now: 2.50 ps/weight vs 2.50" in out
    expected, _, _ = predict.predict_tg_tok_s(calibration.load(cal), "Q4_K_M", 0)
    assert float(re.search(r"tg ~([\d,.]+) tok/s", out)[1].replace(",", "")) == pytest.approx(expected, rel=1e-2)


def test_a_probe_that_disagrees_leaves_the_calibration_unused(capsys, tmp_path, as_xeon):
    now, _ = as_xeon
    cal = xeon_calibration(tmp_path)
    now["q4_k"] = Q4_K_PROBE * 1.6  # one fingerprint, another machine's kernels (a busy host, another part)
    rc, out, _ = run(capsys, "--device", "cpu", "--quant", "Q4_K_M", "--calibration", str(cal))
    assert rc == 0 and "calibrated:" not in out and "measured:   tg ~" in out
    assert "NOT confirmed by a Q4_K kernel probe measured now: 4.00 ps/weight vs 2.50" in out


@pytest.mark.parametrize("change,why", [
    ("bandwidth", "not within ±25% of the calibration's (20.0 GB/s)"),
    ("cpu", "another machine: vendor: GenuineIntel vs AuthenticAMD"),
    ("none", "no machine fingerprint"),
])
def test_another_machines_calibration_is_never_this_machines(capsys, tmp_path, monkeypatch, as_xeon, change, why):
    """One name, not one machine: the bandwidth measured now out of the band, another CPU's identity, or a
    calibration without a fingerprint (every committed one before fingerprints) -- this machine's own kernels."""
    now, asked = as_xeon
    cal = xeon_calibration(tmp_path)
    if change == "bandwidth":
        now["gb_s"] = 30.0
    elif change == "cpu":
        other = tmp_path / "cpuinfo"
        other.write_text(XEON.read_text().replace("GenuineIntel", "AuthenticAMD"))
        monkeypatch.setenv("HARNESS_CPUINFO", str(other))
    else:
        doc = calibration.load(cal)
        doc["device"].pop("fingerprint")
        calibration.write(doc, cal)
    rc, out, _ = run(capsys, "--device", "cpu", "--quant", "Q4_K_M", "--calibration", str(cal))
    assert rc == 0 and "measured:   tg ~" in out and "calibrated:" not in out
    assert why in out and all(not fresh for _, fresh in asked)  # no confirming probe: not this machine's


def test_quant_not_on_the_page(capsys, cpu_cal):
    rc, out, _ = run(capsys, "--device", "RTX 4090", "--quant", "Q2_K", "--bandwidth", "1000")
    assert rc == 0 and "no row for Q2_K" in out and "(1,000.0 GB/s" in out
    rc, out, _ = run(capsys, "--device", "RTX 4090", "--quant", "Q2_K", "--calibration", str(cpu_cal))
    assert rc == 0 and "calibrated: none (Q2_K: no measured size of Llama 3.2 1B" in out
    rc, out, _ = run(capsys, "--device", "cpu", "--quant", "Q2_K", "--calibration", str(cpu_cal))
    assert rc == 0 and "calibrated: none (no tensor types known for Q2_K" in out


AMD_RUN = Path(__file__).resolve().parent.parent / "reports" / "20261128T055841Z-llama-3.2-1b-synthetic"


@pytest.fixture
def probes_here(monkeypatch):
    """This machine's kernel costs, as the committed run of this project's AMD EPYC measured them (its
    calibration's probes), in place of measuring the 1B's probes again (about a minute cold):
    tests/test_probe_here.py measures them for real, on the tiny shape."""
    import json

    from harness.analysis import probe_here

    costs = json.loads((AMD_RUN / "calibration.json").read_text())["probes"]
    asked = []
    monkeypatch.setattr(probe_here, "kernel_costs", lambda types, **kw: asked.append(sorted(types)) or
                        {t: costs[t] for t in types})
    return asked


def test_this_cpu_is_estimated_from_its_own_kernels_not_another_cpus_fit(capsys, probes_here):
    """`--device cpu` with the oldest committed calibration (an Intel Xeon's, no probe model): this machine's
    kernel probes of the quant's tensor types (Q4_K, Q6_K), f = 1, not the Xeon's fit carried by bandwidth. On
    the AMD EPYC that measured those probes the same run measured Q4_K_M at the tg rate in its summary.csv."""
    import csv

    xeon = AMD_RUN.parent / "20261127T225014Z-llama-3.2-1b-synthetic" / "calibration.json"
    rc, out, _ = run(capsys, "--device", "cpu", "--quant", "Q4_K_M", "--bandwidth", "40", "--calibration", str(xeon))
    assert rc == 0 and probes_here == [["Q4_K", "Q6_K"]]
    assert "measured:   tg ~" in out and "kernel probes measured on this machine" in out
    assert "Intel(R) Xeon(R) Processor's calibration has no probe model" in out and "bandwidth ratio" not in out
    rate = float(re.search(r"measured:   tg ~([\d,.]+) tok/s", out)[1].replace(",", ""))
    with open(AMD_RUN / "summary.csv") as f:
        measured = next(float(r["tg_tok_s"]) for r in csv.DictReader(f) if r["quant"] == "Q4_K_M")
    assert abs(rate / measured - 1) < 0.15  # the probes alone (f = 1, no per-token overhead) come near
    # with this machine's own calibration the probe model's factor and ± come with it
    rc, out, _ = run(capsys, "--device", "cpu", "--quant", "Q4_K_M", "--bandwidth", "40", "--json",
                     "--calibration", str(xeon.parent.parent / "20261128T005750Z-llama-3.2-1b-synthetic" /
                                          "calibration.json"))
    import json

    doc = json.loads(out)
    c = doc["calibrated"]
    assert rc == 0 and c["basis"] == "kernel probes measured here" and c["model"] == "probe-kernels"
    assert abs(c["tok_s"] / measured - 1) < 0.15 and 0 < c["tok_s_rel"] < 0.2
    assert c["memory_bytes"] and any("not the RSS peak" in n for n in c["notes"])


def test_another_cpu_is_declined_without_a_band_across_enough_cpus(capsys, cpu_cal):
    """A CPU that is not this machine, with another CPU's calibration: the shipped cross-CPU band rests on two
    CPUs only, so the carried estimate is declined, and says why and what to do."""
    rc, out, _ = run(capsys, "--device", "AMD Ryzen 9 7950X", "--quant", "Q4_K_M", "--bandwidth", "60",
                     "--calibration", str(cpu_cal))
    assert rc == 0 and "calibrated: none (AMD Ryzen 9 7950X was not measured" in out
    assert "measured across 2 CPUs only" in out and "at least 3 are needed): declined" in out


def test_an_uncatalogued_gpu_with_its_bandwidth_and_json(capsys):
    rc, out, err = run(capsys, "--device", "Zork GPU 9000", "--quant", "Q4_K_M", "--bandwidth", "900")
    assert rc == 2 and "give --vendor" in err
    rc, out, _ = run(capsys, "--device", "RTX PRO 6000 Blackwell", "--quant", "Q4_K_M", "--bandwidth", "1792")
    assert rc == 0 and "not in the catalog: bandwidth given with --bandwidth, vendor nvidia from its name" in out
    assert "no speed printed for this device and quant; its rule extrapolated: ~1,420 tok/s" in out
    import json

    rc, out, _ = run(capsys, "--device", "Zork GPU 9000", "--vendor", "amd", "--quant", "Q4_K_M", "--bandwidth",
                     "900", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["device"]["vendor"] == "amd" and doc["cross_device"]["family"] == "amd-rocm"
    assert doc["cross_device"]["runtime"] == "llama.cpp" and doc["page"]["printed_tok_s"] is None
    assert doc["cross_device"]["tok_s"] > 0 and doc["cross_device"]["buffers"]["n_ctx"] == 2048


def test_an_estimate_from_rows_of_large_models_borrows_its_back_ends_floor(capsys):
    """The H100 SXM's family (A100 / H100 PCIe rows, 8B models) has no 1B-3B row: CUDA's per-token floor, from
    the other CUDA families' small rows, stands behind it, with the held-out error of that case (no "upper
    bound"); the M2 Max's own rows include 1B and 3B models."""
    rc, out, _ = run(capsys, "--device", "H100", "--quant", "Q4_K_M")
    assert rc == 0 and "nvidia-cuda-hbm" in out and "upper bound" not in out
    assert "cuda back end's per-token floor" in out and "a family without 1B-3B rows" in out
    rc, out, _ = run(capsys, "--device", "M2 Max", "--quant", "Q4_K_M")
    assert rc == 0 and "apple-metal" in out and "upper bound" not in out
