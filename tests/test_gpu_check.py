"""The GPU check (scripts/gpu-check.sh, scripts/prepare-gpu-bundle.sh, configs/1b-synthetic-gpu.yaml): what a CPU
machine can check, and the one thing only a GPU can (a CUDA build's records say device=cuda)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from harness import config, schema
from harness.measure import devices, runner

SCRIPTS = [REPO / "scripts" / "gpu-check.sh", REPO / "scripts" / "prepare-gpu-bundle.sh"]
BUNDLE = REPO / "vendor" / "gpu-bundle"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    assert script.is_file() and os.access(script, os.X_OK), f"{script} missing or not executable"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_gpu_config_loads():
    cfg = config.load(REPO / "configs" / "1b-synthetic-gpu.yaml")
    base = config.load(REPO / "configs" / "1b-synthetic.yaml")
    assert cfg.name == "llama-3.2-1b-synthetic-gpu"
    assert cfg.model == base.model and cfg.quants == base.quants
    b = cfg.bench
    assert (b.n_prompt, b.n_gen, b.repetitions, b.timeout_s, b.n_gpu_layers) == (512, 128, 5, 300, -1)
    # the models are built outside the repository, so they never travel with it
    assert cfg.cache_dir and not cfg.resolved_cache_dir.resolve().is_relative_to(REPO)


def test_usage_errors(tmp_path):
    script = str(SCRIPTS[0])
    r = subprocess.run(["bash", script], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "usage" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    r = subprocess.run(["bash", script, str(tmp_path / "full")], capture_output=True, text=True)
    assert r.returncode == 2 and "not empty" in r.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi: not the no-GPU case")
def test_without_gpu_stops_at_stage_1(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(SCRIPTS[0]), str(out)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "GPU_CHECK_DRY_RUN": "0", "PYTHON": sys.executable})
    assert r.returncode == 3, r.stdout + r.stderr
    assert "gpu-check: FAILED: no NVIDIA GPU on this machine" in r.stdout
    stages = (out / "stages.tsv").read_text().splitlines()
    assert stages[0].split("\t") == ["stage", "name", "status", "wall_s"]
    assert [s.split("\t")[:2] for s in stages[1:]] == [["1", "detect"], ["5", "collect"]]
    assert "failed" in stages[1]
    # the device tool returns at most 8 files from OUT_DIR
    assert len(list(out.iterdir())) <= 8


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi: not the no-GPU case")
@pytest.mark.skipif(not (BUNDLE / "wheels").is_dir(), reason="no vendor/gpu-bundle: run scripts/prepare-gpu-bundle.sh")
def test_dry_run_without_gpu(tmp_path):
    """Stages 1-2 against the local bundle, no compile; then the clear 'no NVIDIA GPU' line and exit 3."""
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable, "GPU_CHECK_VENV": str(tmp_path / "venv")}
    r = subprocess.run(["bash", str(SCRIPTS[0]), str(out)], capture_output=True, text=True, timeout=300, env=env)
    log = r.stdout
    assert r.returncode == 3, log + r.stderr
    assert "no NVIDIA GPU: nvidia-smi" in log
    assert "gpu-check: FAILED: no NVIDIA GPU on this machine" in log
    assert "dry run: not compiling llama-cpp-python" in log
    assert "harness needs:" in log  # every runtime dependency found, in the version pyproject.toml asks for
    stages = [s.split("\t") for s in (out / "stages.tsv").read_text().splitlines()[1:]]
    assert [s[:2] for s in stages] == [["1", "detect"], ["2", "build"], ["5", "collect"]]
    assert stages[1][2].startswith("ok (dry run")
    assert (out / "gpu-check.log").read_text().count("no NVIDIA GPU") >= 2
    assert (out / "gpu-check.tar.gz").is_file() and len(list(out.iterdir())) <= 8
    # the venv holds the bundled build back end, and the harness from this checkout
    vpy = tmp_path / "venv" / "bin" / "python"
    probe = subprocess.run([str(vpy), "-c", "import scikit_build_core, harness; print(harness.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode == 0 and probe.stdout.startswith(str(REPO)), probe.stderr


@pytest.mark.skipif(not (BUNDLE / "wheels").is_dir(), reason="no vendor/gpu-bundle: run scripts/prepare-gpu-bundle.sh")
def test_dry_run_reads_the_architecture_off_nvidia_smi(tmp_path):
    """With a stand-in nvidia-smi (an H100 and an H200: compute capability 9.0), the build would target 90 only."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$*" in\n'
                   '  *compute_cap\\ *|*=compute_cap) printf "9.0\\n9.0\\n" ;;\n'
                   '  *--query-gpu*) printf "NVIDIA H100 80GB HBM3, 9.0, 81559 MiB, 580.159.04\\n'
                   'NVIDIA H200, 9.0, 143771 MiB, 580.159.04\\n" ;;\n'
                   '  *) echo "stand-in nvidia-smi" ;;\nesac\n')
    smi.chmod(0o755)
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable, "GPU_CHECK_VENV": str(tmp_path / "venv"),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GPU_CHECK_LIMIT_S": "300"}
    r = subprocess.run(["bash", str(SCRIPTS[0]), str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                       env=env)
    log = r.stdout
    assert "deadline: 270 s after the start (GPU_CHECK_LIMIT_S=300" in log  # the call's limit, less 30 s
    assert "GPU: NVIDIA H100 80GB HBM3, 9.0" in log
    assert "CUDA architecture(s) to build for: 90\n" in log
    assert "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 " in log
    assert "no NVIDIA GPU" not in log
    # exit 0 where the CUDA toolkit is complete; 4, naming what is missing (cuBLAS, nvcc, ...), where it is not
    assert r.returncode == 0 and "dry run done: GPU found" in log or r.returncode == 4 and "missing:" in log, log


@pytest.mark.gpu
@pytest.mark.skipif("CUDA" not in devices.gpu_backends(),
                    reason="needs a CUDA build that finds its GPU (this build has no CUDA device, whatever NVML "
                           "says): scripts/gpu-check.sh makes one and runs it")
def test_cuda_build_offloads(tiny_cache, tmp_path):
    """On a GPU with a CUDA build (scripts/gpu-check.sh makes one): a 1-quant smoke run runs on the GPU."""
    d = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    d["cache_dir"] = str(tiny_cache)
    d["quants"] = ["Q4_K_M"]
    cfg = config.from_dict(d)
    run_dir, errors = runner.run(cfg, out=tmp_path / "run", progress=False, echo=lambda s: None)
    assert errors == {}
    recs = schema.read_records(run_dir / "records.jsonl")
    assert recs and all(r.status == "ok" and r.device == "cuda" for r in recs)
    assert all(r.gpu_name and r.gpu_used_peak_bytes for r in recs)
    env = json.loads((run_dir / "env.json").read_text())
    assert env["llama"]["gpu_offload_supported"] is True and not env.get("warnings")
