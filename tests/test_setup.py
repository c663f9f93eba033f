"""scripts/detect-backend.sh, which set-up and gpu-check.sh share: what it builds for, on fake machines."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def detect(tmp_path: Path, tools: dict[str, str], **env: str) -> tuple[int, dict[str, str], str]:
    """Run the detection with only `tools` (name: shell script body) and the basics on PATH."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    for name, body in tools.items():
        (bin_ / name).write_text("#!/bin/sh\n" + body)
        (bin_ / name).chmod(0o755)
    for tool in ("sed", "tr", "sort", "paste", "head", "grep", "uname", "bash", "cat"):
        src = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        if src and not (bin_ / tool).exists():
            os.symlink(src, bin_ / tool)
    e = {"PATH": str(bin_), **env}
    p = subprocess.run(["bash", str(REPO / "scripts/detect-backend.sh")], capture_output=True, text=True, env=e)
    out = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    return p.returncode, out, p.stderr


NVIDIA = ('case "$*" in *compute_cap*) printf "9.0\\n8.6\\n" ;; *name*) echo "NVIDIA H200" ;; esac\n')


def test_no_gpu_builds_for_the_cpu_with_rpc(tmp_path):
    rc, out, _ = detect(tmp_path, {})
    assert rc == 0 and out["backend"] == "cpu" and "no GPU found" in out["why"]
    assert out["cmake"] == "-DGGML_RPC=ON"


def test_nvidia_gpu_builds_cuda_for_its_architectures(tmp_path):
    rc, out, _ = detect(tmp_path, {"nvidia-smi": NVIDIA})
    assert rc == 0 and out["backend"] == "cuda" and "NVIDIA H200" in out["why"]
    assert "-DGGML_CUDA=ON" in out["cmake"] and "-DCMAKE_CUDA_ARCHITECTURES=86;90" in out["cmake"]
    assert "-DGGML_RPC=ON" in out["cmake"]


def test_override_and_its_validation(tmp_path):
    rc, out, _ = detect(tmp_path, {"nvidia-smi": NVIDIA}, HARNESS_BACKEND="cpu")
    assert rc == 0 and out["backend"] == "cpu" and out["why"] == "HARNESS_BACKEND=cpu"
    rc, _, err = detect(tmp_path, {}, HARNESS_BACKEND="cuda12")
    assert rc == 2 and "not one of cpu, cuda, hip, vulkan, metal" in err


def test_vulkan_device_with_old_headers_falls_back_to_the_cpu_and_says_why(tmp_path):
    vk = 'echo "        deviceName         = Fake GPU"\n'
    rc, out, _ = detect(tmp_path, {"vulkaninfo": vk})
    assert rc == 0 and out["backend"] in ("cpu", "vulkan")
    if out["backend"] == "cpu":  # this machine's headers (Debian 12: 1.3.239) are too old for the pinned llama.cpp
        assert "older than the 1.3.275" in out["why"] and "Fake GPU" in out["why"]
