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


@pytest.fixture
def cpu_cal(tmp_path):
    cal = calibration.calibrate(frame(make_records(noise=0.002)), ENV_CPU, run_id="cpu-run")
    return calibration.write(cal, tmp_path / "cpu.json")


@pytest.fixture
def h100_cal(tmp_path):
    df = frame(make_records(device="cuda", gpu_name="NVIDIA H100 80GB HBM3", bw=3352, eff=0.5, overhead=0.002,
                            fam={}, noise=0.002, run_id="h100-run"))
    cal = calibration.calibrate(df, {"gpu": {"name": "NVIDIA H100 80GB HBM3"}}, run_id="h100-run")
    return calibration.write(cal, tmp_path / "h100.json")


@pytest.mark.parametrize("device,printed", [("RTX 4090", 799), ("H100 SXM", 2657), ("MI300X", 3555),
                                            ("MI250X", 2198)])
def test_page_estimate_reproduces_the_page(capsys, device, printed):
    rc, out, _ = run(capsys, "--device", device, "--quant", "Q4_K_M")
    assert rc == 0
    assert f"~{printed:,} tok/s" in out
    assert "VRAM 0.8 GB" in out and "file 0.74 GB" in out
    # the shipped cross-device calibration: a GPU with published rows of its own (RTX 4090, MI300X) from them,
    # one without (H100 SXM, MI250X) from its family, each with its held-out error; the memory terms named
    assert "cross-device: efficiency" in out
    if device in ("RTX 4090", "MI300X"):
        assert "from this device's own" in out and "(leave one row out)" in out
    else:
        family = "amd-rocm" if device.startswith("MI") else "nvidia-cuda"
        assert f"held-out error (leave one device out) of {family}" in out
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
    assert family == "nvidia-cuda on NVIDIA GeForce RTX 4090"  # the 4090's own published CUDA rows
    m = re.search(r"tg ~([\d,.]+) tok/s with an empty cache", out)
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


def test_cpu_device_takes_the_bandwidth_of_a_calibration_of_this_cpu(capsys, tmp_path):
    from harness.measure import env

    here = {**ENV_CPU, "cpu": {"model": env.cpu_model()}}  # measured on this machine's CPU
    cal = calibration.write(calibration.calibrate(frame(make_records(noise=0.002)), here, run_id="here"),
                            tmp_path / "here.json")
    rc, out, _ = run(capsys, "--device", "cpu", "--quant", "IQ3_M", "--calibration", str(cal))
    assert rc == 0 and "(20.0 GB/s" in out and "~17 tok/s" in out  # the page: 20 / 0.64 x 0.55 = 17.2
    assert "(measured on this device)" in out and "this CPU was not measured" not in out


def test_quant_not_on_the_page(capsys, cpu_cal):
    rc, out, _ = run(capsys, "--device", "RTX 4090", "--quant", "Q2_K", "--bandwidth", "1000")
    assert rc == 0 and "no row for Q2_K" in out and "(1,000.0 GB/s" in out
    rc, out, _ = run(capsys, "--device", "RTX 4090", "--quant", "Q2_K", "--calibration", str(cpu_cal))
    assert rc == 0 and "calibrated: none (Q2_K: no measured size of Llama 3.2 1B" in out
    rc, out, _ = run(capsys, "--device", "cpu", "--quant", "Q2_K", "--calibration", str(cpu_cal))
    assert rc == 0 and "calibrated: none (Q2_K was not measured" in out


def test_another_cpus_calibration_says_so_and_carries_the_cross_cpu_error(capsys, cpu_cal):
    """A calibration of another CPU ("Test CPU", not this machine's) neither lends this machine its bandwidth nor
    its same-device ±: the ± is the shipped cross-CPU error, and the output says this CPU was not measured."""
    from harness.analysis import crossgpu

    rc, out, _ = run(capsys, "--device", "cpu", "--quant", "Q4_K_M", "--bandwidth", "50",
                     "--calibration", str(cpu_cal))
    assert rc == 0
    err = crossgpu.load_shipped()["cpu_transfer"]["all"]
    assert f"±{err['median_ape']:.0%}" in out and "this CPU was not measured" in out
    assert "carrying a calibration from one CPU to another" in out and "(LOQO)" not in out
    assert "(50.0 GB/s" in out and "from " not in out.splitlines()[0]  # the bandwidth given, not the calibration's


def test_an_estimate_from_rows_of_large_models_only_says_it_is_an_upper_bound(capsys):
    """The H100 SXM's family (A100 / H100 PCIe rows, 8B models) has no 1B-3B row: no per-token floor is in its
    fit, and the estimate says so; the M2 Max's own rows include 1B and 3B models, and it does not."""
    rc, out, _ = run(capsys, "--device", "H100", "--quant", "Q4_K_M")
    assert rc == 0 and "nvidia-cuda-hbm" in out and "upper bound" in out
    rc, out, _ = run(capsys, "--device", "M2 Max", "--quant", "Q4_K_M")
    assert rc == 0 and "apple-metal on Apple M2 Max" in out and "upper bound" not in out
