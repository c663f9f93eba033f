"""scripts/detect-backend.sh, which set-up and gpu-check.sh share: what it builds for, on fake machines."""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import pytest

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


def _cuda_include() -> Path | None:
    """A CUDA toolkit's include folder holding cuda.h: nvcc's, else /usr/local/cuda*'s."""
    nvcc = subprocess.run(["which", "nvcc"], capture_output=True, text=True).stdout.strip()
    roots = [Path(nvcc).resolve().parent.parent] if nvcc else []
    roots += sorted(Path("/usr/local").glob("cuda*"))
    for root in roots:
        for inc in [root / "include", *root.glob("targets/*/include")]:
            if (inc / "cuda.h").is_file():
                return inc
    return None


def test_cuda_driver_stub_is_linked_where_an_empty_one_is_dropped(tmp_path):
    """The stub scripts/build-cuda-wheel.sh links ggml-cuda against: exporting the driver API is what makes the
    linker keep libcuda.so.1 (NEEDED); an empty stub, as the first CUDA build had, is dropped under --as-needed and
    the library then fails to load on any machine (undefined cuMemCreate). Each call fails as NVIDIA's stub's do."""
    inc = _cuda_include()
    if inc is None:
        pytest.skip("no CUDA toolkit's cuda.h on this machine")
    stub = tmp_path / "stub" / "libcuda.so"
    subprocess.run(["bash", str(REPO / "scripts/cuda-driver-stub.sh"), str(inc), str(stub)], check=True,
                   capture_output=True)
    (tmp_path / "empty.c").write_text("void nothing(void) {}\n")
    empty = tmp_path / "empty" / "libcuda.so"
    empty.parent.mkdir()
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(empty), str(tmp_path / "empty.c")],
                   check=True)
    # a library using the driver API as ggml-cuda's virtual-memory pool does
    (tmp_path / "user.c").write_text("int cuMemCreate(void *, unsigned long, const void *, unsigned long long);\n"
                                     "int pool(void) { return cuMemCreate(0, 0, 0, 0); }\n")

    def needed(lib: Path) -> list[str]:
        out = tmp_path / f"user-{lib.parent.name}.so"
        subprocess.run(["cc", "-shared", "-fPIC", "-Wl,--as-needed", "-o", str(out), str(tmp_path / "user.c"),
                        str(lib)], check=True)
        dyn = subprocess.run(["readelf", "-d", str(out)], capture_output=True, text=True, check=True).stdout
        return [line.split("[")[1].rstrip("]") for line in dyn.splitlines() if "(NEEDED)" in line]

    assert "libcuda.so.1" in needed(stub)
    assert "libcuda.so.1" not in needed(empty)
    drv = ctypes.CDLL(str(stub))
    assert drv.cuInit(0) == 34  # CUDA_ERROR_STUB_LIBRARY
    for sym in ("cuMemCreate", "cuMemMap", "cuMemAddressReserve", "cuDeviceGetAttribute", "cuGetProcAddress",
                "cuMemAlloc_v2", "cuMemAlloc"):
        assert getattr(drv, sym)() == 34
