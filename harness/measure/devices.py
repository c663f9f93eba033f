"""llama.cpp's devices as ggml sees them: names, kinds, free and total memory; RPC devices and servers.

llama-cpp-python binds llama.h only. The device registry (``ggml_backend_dev_*``) and the RPC back end
(``ggml_backend_rpc_*``) live in the libggml beside it, bound here with ctypes. These are what llama.cpp itself
uses to place layers, so "the device's memory" means the same on every back end: CUDA's and HIP's from the
driver, Metal's recommended working set, an RPC device's from its server (the server's own device, for a CPU
server the host's available memory), the CPU's the host's.

RPC: :func:`add_rpc_servers` registers servers as llama-bench's ``--rpc`` does (their devices then take offloaded
layers like a GPU, ``RPC0[host:port]``); :func:`serve` is the server side (``ggml_backend_rpc_start_server`` on
this process's CPU device), run by :class:`RpcServer` as a child process on loopback.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

KINDS = ("cpu", "gpu", "igpu", "accel", "meta")  # enum ggml_backend_dev_type, in order


class DeviceError(RuntimeError):
    """No such device, no RPC support in this build, a server that does not answer: one clear line."""


class Device(NamedTuple):
    index: int  # position in ggml's device registry (llama.cpp offloads to the non-CPU ones in this order)
    name: str  # ggml's name: "CPU", "CUDA0", "ROCm0", "Vulkan0", "MTL0", "RPC0[127.0.0.1:50052]", ...
    description: str  # the driver's name of it: "NVIDIA H200", "AMD EPYC ...", ...
    kind: str  # "cpu", "gpu", "igpu", "accel" or "meta"
    free_bytes: int  # free memory as the device reports it now
    total_bytes: int  # total memory as the device reports it


def lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).resolve().parent / "lib"


_ggml = None


def ggml():
    """The libggml that llama-cpp-python loaded (the same library: symbols are resolved in one copy)."""
    global _ggml
    if _ggml is not None:
        return _ggml
    import llama_cpp  # noqa: F401 - loads libllama and with it libggml

    path = _loaded("libggml.") or _loaded("libggml-base.")
    if path is None:
        cands = sorted(glob.glob(str(lib_dir() / "libggml.so.*")) + glob.glob(str(lib_dir() / "libggml*.dylib")))
        if not cands:
            raise DeviceError(f"no libggml in {lib_dir()}")
        path = cands[0]
    cands = [path]
    lib = ctypes.CDLL(cands[0], mode=ctypes.RTLD_GLOBAL)
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    for name, res, args in (
        ("ggml_backend_dev_count", sz, []), ("ggml_backend_dev_get", vp, [sz]),
        ("ggml_backend_dev_name", ctypes.c_char_p, [vp]), ("ggml_backend_dev_description", ctypes.c_char_p, [vp]),
        ("ggml_backend_dev_memory", None, [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]),
        ("ggml_backend_dev_type", ctypes.c_int, [vp]), ("ggml_backend_dev_by_type", vp, [ctypes.c_int]),
        ("ggml_backend_reg_by_name", vp, [ctypes.c_char_p]),
        ("ggml_backend_reg_get_proc_address", vp, [vp, ctypes.c_char_p]),
        ("ggml_backend_register", None, [vp]), ("ggml_backend_reg_count", sz, []),
        ("ggml_backend_reg_get", vp, [sz]), ("ggml_backend_reg_name", ctypes.c_char_p, [vp]),
        ("ggml_backend_reg_dev_count", sz, [vp]),
    ):
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    _ggml = lib
    return lib


def _loaded(prefix: str) -> str | None:
    """The path of a library of llama-cpp-python's that this process has already mapped: the one libllama linked
    (by its soname, libggml.so.0). A wheel holds libggml.so, .so.0 and .so.0.x as three copies of one file, and
    loading another name would load a second copy with a device registry of its own."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if line.count(" ") >= 5 and "/" in line}
    except OSError:
        return None
    here = str(lib_dir())
    found = sorted(p for p in paths if p.startswith(here) and os.path.basename(p).startswith(prefix))
    return found[0] if found else None


def _device(i: int) -> Device:
    g = ggml()
    d = g.ggml_backend_dev_get(i)
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    g.ggml_backend_dev_memory(d, ctypes.byref(free), ctypes.byref(total))
    t = g.ggml_backend_dev_type(d)
    return Device(i, (g.ggml_backend_dev_name(d) or b"").decode(errors="replace"),
                  (g.ggml_backend_dev_description(d) or b"").decode(errors="replace"),
                  KINDS[t] if 0 <= t < len(KINDS) else str(t), int(free.value), int(total.value))


def list_devices() -> list[Device]:
    """Every device ggml has registered, in registry order, with its memory now."""
    return [_device(i) for i in range(ggml().ggml_backend_dev_count())]


def memory_now() -> dict[str, dict[str, int]]:
    """{device name: {"free_bytes", "total_bytes"}} for every device but the CPU's (which is the host: RSS says
    this process's part of it)."""
    return {d.name: {"free_bytes": d.free_bytes, "total_bytes": d.total_bytes}
            for d in list_devices() if d.kind != "cpu"}


def _registry() -> list[tuple[str, int]]:
    """(name, devices) of each back end registered, in registry order; no device is opened."""
    g = ggml()
    regs = [g.ggml_backend_reg_get(i) for i in range(g.ggml_backend_reg_count())]
    return [(g.ggml_backend_reg_name(r).decode(), int(g.ggml_backend_reg_dev_count(r))) for r in regs]


def backends() -> list[str]:
    """The registered back ends that have devices, as llama-bench's `backends` column names them (RPC once)."""
    regs = _registry()
    out = [name for name, _ in regs if name != "CPU" and not name.startswith("RPC")]
    rpc = any(n > 0 for name, n in regs if name.startswith("RPC"))
    return out + (["RPC"] if rpc else []) or ["CPU"]


def gpu_backends() -> list[str]:
    """The build's GPU back ends that found a device ("CUDA", "Vulkan", "Metal", ...): where llama.cpp can put
    weights on a GPU. Neither the CPU nor RPC counts (an RPC device is a server's, reached over the network);
    no device is opened (a CUDA device's memory query would create its context)."""
    return [name for name, n in _registry() if name != "CPU" and not name.startswith("RPC") and n > 0]


def rpc_supported() -> bool:
    return bool(ggml().ggml_backend_reg_by_name(b"RPC"))


_added: set[str] = set()


def add_rpc_servers(endpoints: list[str] | tuple[str, ...]) -> list[Device]:
    """Register RPC servers ("host:port") as llama-bench's --rpc does; their devices take offloaded layers from
    then on, in this process. Returns the devices they added. Registering one endpoint twice is a no-op."""
    g = ggml()
    reg = g.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise DeviceError("this llama.cpp build has no RPC back end (built without -DGGML_RPC=ON): "
                          "run scripts/setup.sh, which builds it in")
    addr = g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    if not addr:
        raise DeviceError("this llama.cpp's RPC back end has no ggml_backend_rpc_add_server")
    add = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(addr)
    before = {d.name for d in list_devices()}
    for ep in endpoints:
        if ep in _added:
            continue
        host, port = split_endpoint(ep)
        if not reachable(host, port):
            raise DeviceError(f"RPC server {ep}: nothing answers there (start one: ggml-rpc-server -H {host} "
                              f"-p {port}, or let the harness start its own with bench.device: rpc)")
        r = add(ep.encode())
        if not r:
            raise DeviceError(f"RPC server {ep}: llama.cpp could not add it (see its log)")
        g.ggml_backend_register(r)
        _added.add(ep)
    return [d for d in list_devices() if d.name not in before]


def split_endpoint(ep: str) -> tuple[str, int]:
    host, _, port = ep.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeviceError(f"RPC endpoint {ep!r} is not HOST:PORT (e.g. 127.0.0.1:50052)")
    return host, int(port)


def reachable(host: str, port: int, timeout_s: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(endpoint: str, threads: int) -> None:
    """Serve this process's CPU device over RPC at `endpoint` (blocks: llama.cpp's server loop)."""
    g = ggml()
    if not g.ggml_backend_reg_by_name(b"RPC"):
        raise DeviceError("this llama.cpp build has no RPC back end (built without -DGGML_RPC=ON)")
    path = _loaded("libggml-rpc.")
    rpc = ctypes.CDLL(path) if path else g
    start = rpc.ggml_backend_rpc_start_server
    start.restype = None
    start.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                      ctypes.POINTER(ctypes.c_void_p)]
    cpu = g.ggml_backend_dev_by_type(0)
    devs = (ctypes.c_void_p * 1)(cpu)
    start(endpoint.encode(), None, threads, 1, devs)


class RpcServer:
    """llama.cpp's RPC server on loopback, in a child process (``python -m harness.measure.devices serve``),
    for as long as the context lasts. The measuring process starts one per model file: a fresh server holds only
    that file's buffers (a server kept across files would reuse the last one's freed heap, and its growth would
    understate the next). Its pid is kept: the server's own resident memory is what its device holds
    (the "process" figure of an RPC device, as NVML's per-process figure is a CUDA device's)."""

    def __init__(self, threads: int, host: str = "127.0.0.1", port: int | None = None,
                 log_path: str | os.PathLike | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.threads = threads
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> RpcServer:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "harness.measure.devices", "serve", self.endpoint, str(self.threads)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out)  # in its parent's process group: killed with it
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        deadline = time.monotonic() + 30
        while not reachable(self.host, self.port, 0.2):
            if self.proc.poll() is not None:
                raise DeviceError(f"the RPC server on {self.endpoint} exited with status {self.proc.returncode} "
                                  f"before it listened" + (f" (log: {self.log_path})" if self.log_path else ""))
            if time.monotonic() > deadline:
                self.__exit__()
                raise DeviceError(f"the RPC server on {self.endpoint} did not listen within 30 s")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()


def process_rss(pid: int | None) -> dict[str, int] | None:
    """A process's resident memory (total and anonymous), from /proc; None where it cannot be read."""
    if not pid:
        return None
    try:
        import psutil

        p = psutil.Process(pid)
        mi = p.memory_info()
        out = {"rss_bytes": int(mi.rss)}
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Anonymous:"):
                        out["anon_bytes"] = int(line.split()[1]) * 1024
        return out
    except Exception:  # noqa: BLE001 - a server that just died: no reading
        return None


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "serve":
        if sys.platform.startswith("linux"):  # die with the measuring process that started it
            import signal

            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        serve(argv[1], int(argv[2]))
        return 0
    for d in list_devices():
        print(f"{d.index}: {d.name} ({d.kind}) {d.description}: {d.free_bytes / 2**20:,.0f} MiB free of "
              f"{d.total_bytes / 2**20:,.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
