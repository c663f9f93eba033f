"""Provenance of a run: which code, which llama.cpp, which machine (written to env.json)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from harness import memory

REPO = Path(__file__).resolve().parent.parent


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


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_threads() -> int:
    """llama-bench's default: the physical cores (logical where that is unknown)."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def llama_info() -> dict[str, Any]:
    import llama_cpp

    return {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
    }


def collect() -> dict[str, Any]:
    nvml = memory.nvml_probe()
    vm = psutil.virtual_memory()
    return {
        "utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "harness": git_info(),
        "llama": llama_info(),
        "cpu": {
            "model": cpu_model(),
            "physical_cores": psutil.cpu_count(logical=False),
            "logical_cores": psutil.cpu_count(logical=True),
            "machine": platform.machine(),
        },
        "ram_bytes": vm.total,
        "gpu": nvml.info() if nvml else None,
        "python": sys.version.split()[0],
        "os": platform.platform(),
        "hostname": socket.gethostname(),
    }
