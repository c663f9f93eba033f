"""A test double of NVML's Python module (nvidia-ml-py's ``pynvml``): an NVIDIA driver that sees one H200, for
running the suite as on a GPU host whose llama.cpp build is a CPU or RPC one (README.md beside this file).

Only the calls the harness makes. Device memory in use stays at a driver's idle figure and no process of this
host is on the device: a CPU build allocates nothing there.
"""

from __future__ import annotations

from types import SimpleNamespace

NVML_CLOCK_MEM = 2
_TOTAL = 150_754_820_096  # an H200's 141 GB (the NVIDIA spec sheet's; 140.4 GiB)
_USED = 565_182_464  # a driver's idle reservation on an empty device


class NVMLError(Exception):
    pass


def nvmlInit() -> None:
    pass


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return 1


def nvmlDeviceGetHandleByIndex(index: int):
    if index != 0:
        raise NVMLError("Invalid Argument")
    return SimpleNamespace(index=0)


def nvmlDeviceGetName(handle) -> str:
    return "NVIDIA H200"


def nvmlDeviceGetMemoryInfo(handle):
    return SimpleNamespace(total=_TOTAL, used=_USED, free=_TOTAL - _USED)


def nvmlSystemGetDriverVersion() -> str:
    return "580.95.05"


def nvmlSystemGetCudaDriverVersion() -> int:
    return 13000


def nvmlDeviceGetCudaComputeCapability(handle) -> tuple[int, int]:
    return 9, 0


def nvmlDeviceGetMemoryBusWidth(handle) -> int:
    return 6144


def nvmlDeviceGetMaxClockInfo(handle, clock: int) -> int:
    return 3201


def nvmlDeviceGetComputeRunningProcesses(handle) -> list:
    return []
