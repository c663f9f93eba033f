"""Provenance of a run: which code, which llama.cpp, which machine (written to env.json)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from harness.catalog import devices
from harness.measure import bandwidth, fingerprint, machine, memory

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


cpu_model = devices.cpu_model  # the catalog's reader: sources (a layer below) name this CPU the same way


def default_threads() -> int:
    """llama-bench's default: the physical cores (logical where that is unknown)."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def llama_info() -> dict[str, Any]:
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    out = {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": info,
        "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
    }
    if "CUDA" in info:  # ggml-cuda lists its compile-time features there (ARCHS, USE_GRAPHS, FA_QUANTS, ...)
        out["cuda_graphs"] = "USE_GRAPHS = 1" in info and not os.environ.get("GGML_CUDA_DISABLE_GRAPHS")
    return out


def memory_bandwidth() -> dict[str, Any] | None:
    """The CPU's sustained memory bandwidth, measured (about 2 s): the page's speed formula needs one for a
    CPU, and the calibration reports efficiency against it."""
    try:
        c = bandwidth.measure_cpu_bandwidth_compiled()
        if c is not None:
            return {"measured_gb_s": round(c["gb_s"], 2), "sum_gb_s": round(c["sum_gb_s"], 2),
                    "triad_gb_s": round(c["triad_gb_s"], 2), "ratio": round(c["ratio"], 3), "method": c["method"]}
        d = bandwidth.measure_cpu_bandwidth_detail()  # no C compiler: numpy's (its kernels disagree more)
    except Exception as e:  # noqa: BLE001 - provenance must not stop a run
        log.warning("could not measure the memory bandwidth: %s", e)
        return None
    return {"measured_gb_s": round(d["gb_s"], 2), "copy_gb_s": round(d["copy_gb_s"], 2),
            "triad_gb_s": round(d["triad_gb_s"], 2), "method": d["method"]}


def catalog_entry(gpu: dict[str, Any] | None) -> dict[str, Any] | None:
    """The device catalog's spec sheet for the GPU NVML found (None without a GPU or for an unknown one)."""
    d = devices.find(gpu.get("name")) if gpu else None
    return d.as_dict() if d else None


def collect() -> dict[str, Any]:
    nvml = memory.nvml_probe()
    vm = psutil.virtual_memory()
    bw = memory_bandwidth()
    return {
        "utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "harness": git_info(),
        "llama": llama_info(),
        "cpu": {
            "model": cpu_model(),
            "physical_cores": psutil.cpu_count(logical=False),
            "logical_cores": psutil.cpu_count(logical=True),
            "machine": platform.machine(),
            # what a CPU calibration of this run must match to count as another machine's own
            "fingerprint": fingerprint.collect((bw or {}).get("measured_gb_s")),
        },
        "ram_bytes": vm.total,
        "gpu": nvml.info() if nvml else None,
        "machine_state": machine.host_state(),
        "memory_bandwidth": bw,
        "catalog": catalog_entry(nvml.info() if nvml else None),
        "python": sys.version.split()[0],
        "os": platform.platform(),
        "hostname": socket.gethostname(),
    }
