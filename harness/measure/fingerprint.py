"""This machine's fingerprint: what llama.cpp's CPU kernels and a CPU calibration depend on, beyond a name.

Hypervisors report one name ("Intel(R) Xeon(R) Processor", "AMD EPYC") for many processors, and two machines
of one name have measured 1.6x apart here. A CPU calibration is "this machine's" only where its fingerprint's
identity fields (:data:`IDENTITY`) equal this machine's and this machine's memory bandwidth, measured now, is
within :data:`BANDWIDTH_BAND` of the calibration's (the estimate then confirms it with a short kernel probe).

Read from /proc/cpuinfo (``$HARNESS_CPUINFO`` names another file: the test suite's second pass runs as another
CPU that way), /sys and the llama.cpp build; every field None where the system does not say.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import psutil

from harness.catalog import devices

# x86 flags (as /proc/cpuinfo spells them) that select ggml's CPU kernels (ggml-cpu's feature checks and the
# repack paths); on ARM the whole Features line is kept, as ggml checks most of it (dotprod, i8mm, sve, ...).
X86_ISA = ("sse3", "pni", "ssse3", "avx", "avx2", "f16c", "fma", "bmi2", "avx_vnni", "avx512f", "avx512bw",
           "avx512vl", "avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
# The fields that must be equal for two fingerprints to be one machine's (the bandwidth is compared in a band).
IDENTITY = ("arch", "vendor", "family", "model", "stepping", "model_name", "isa", "physical_cores",
            "logical_cores", "threads_allowed", "l2_bytes", "l3_bytes", "ram_gib", "numa_nodes", "llama_build")
# Two measurements of one machine's bandwidth (compiled STREAM, ~2 s) on these shared hosts: within this share.
BANDWIDTH_BAND = 0.25


def cpuinfo_text() -> str:
    """/proc/cpuinfo, or the file $HARNESS_CPUINFO names (another CPU's identity, for testing)."""
    try:
        return devices.cpuinfo_path().read_text()
    except OSError:
        return ""


def _first_block(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if out:
                break
            continue
        k, _, v = line.partition(":")
        out.setdefault(k.strip().lower(), v.strip())
    return out


def _int(v: str | None) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def isa_flags(info: dict[str, str]) -> list[str]:
    """The instruction-set features ggml's kernels use, sorted."""
    if "flags" in info:
        have = set(info["flags"].split())
        return sorted(f for f in X86_ISA if f in have)
    return sorted(set(info.get("features", "").split()))


def _size(text: str) -> int | None:
    text = text.strip().upper()
    mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
    n = _int(text.rstrip("KMG"))
    return None if n is None else n * mult


def cache_sizes(cpu: int = 0) -> dict[str, int | None]:
    """The L2 and L3 (unified) cache sizes of one core as /sys lists them."""
    out: dict[str, int | None] = {"l2_bytes": None, "l3_bytes": None}
    for idx in sorted(Path(f"/sys/devices/system/cpu/cpu{cpu}/cache").glob("index*")):
        try:
            level = (idx / "level").read_text().strip()
            size = _size((idx / "size").read_text())
        except OSError:
            continue
        if level in ("2", "3"):
            out[f"l{level}_bytes"] = size
    return out


def numa_nodes() -> int | None:
    nodes = list(Path("/sys/devices/system/node").glob("node[0-9]*"))
    return len(nodes) or None


def threads_allowed() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def llama_build() -> str | None:
    """llama-cpp-python's version and the CPU features llama.cpp was compiled with (its system info)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return f"llama-cpp-python {llama_cpp.__version__}; {info}"


def collect(bandwidth_gb_s: float | None = None, build: str | None = None) -> dict[str, Any]:
    """This machine's fingerprint; `bandwidth_gb_s`: its measured memory bandwidth (not measured here), `build`:
    the llama.cpp build (default: the one importable now)."""
    info = _first_block(cpuinfo_text())
    fp: dict[str, Any] = {
        "arch": platform.machine(),
        "vendor": info.get("vendor_id") or info.get("cpu implementer"),
        "family": _int(info.get("cpu family")) if "cpu family" in info else info.get("cpu architecture"),
        "model": _int(info.get("model")) if "model" in info else info.get("cpu part"),
        "stepping": _int(info.get("stepping")) if "stepping" in info else info.get("cpu revision"),
        "model_name": devices.cpu_model(),
        "isa": isa_flags(info),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "threads_allowed": threads_allowed(),
        **cache_sizes(),
        "ram_gib": round(psutil.virtual_memory().total / 1024**3),
        "numa_nodes": numa_nodes(),
        "llama_build": build if build is not None else llama_build(),
        "bandwidth_gb_s": None if bandwidth_gb_s is None else round(float(bandwidth_gb_s), 2),
        "bandwidth_band": BANDWIDTH_BAND,
    }
    fp["id"] = identity_key(fp)
    return fp


def identity(fp: dict[str, Any]) -> dict[str, Any]:
    return {k: fp.get(k) for k in IDENTITY}


def identity_key(fp: dict[str, Any]) -> str:
    """A short hash of the identity fields: one key per machine kind (the probe cache's, the run's)."""
    return hashlib.sha256(json.dumps(identity(fp), sort_keys=True).encode()).hexdigest()[:12]


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The identity fields where `a` and `b` differ, as "field: a vs b"."""
    out = []
    for k in IDENTITY:
        if a.get(k) != b.get(k):
            va, vb = a.get(k), b.get(k)
            if isinstance(va, list) and isinstance(vb, list):
                va, vb = sorted(set(va) - set(vb)) or "-", sorted(set(vb) - set(va)) or "-"
            out.append(f"{k}: {va} vs {vb}")
    return out


def same_machine(cal_fp: dict[str, Any] | None, here: dict[str, Any]) -> tuple[bool, str]:
    """Whether a calibration's fingerprint is this machine's (`here`, with its bandwidth measured now), and why
    in one line. Without a fingerprint (calibrations before fingerprints): another machine's."""
    if not cal_fp:
        return False, "the calibration has no machine fingerprint (made before fingerprints): another machine's"
    diff = differences(cal_fp, here)
    if diff:
        return False, "another machine: " + "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")
    then, now = cal_fp.get("bandwidth_gb_s"), here.get("bandwidth_gb_s")
    band = cal_fp.get("bandwidth_band") or BANDWIDTH_BAND
    if not then or not now:
        return False, "the fingerprint matches, but a bandwidth to compare is missing"
    if abs(now / then - 1) > band:
        return False, (f"the fingerprint matches, but the bandwidth measured now ({now:.1f} GB/s) is not within "
                       f"±{band:.0%} of the calibration's ({then:.1f} GB/s): another machine of this kind, or a "
                       "busy one")
    return True, (f"fingerprint equal ({describe(here)}), bandwidth {now:.1f} GB/s now vs {then:.1f} then "
                  f"(within ±{band:.0%})")


def describe(fp: dict[str, Any]) -> str:
    """One short line: vendor family/model/stepping, the widest ISA, cores."""
    isa = fp.get("isa") or []
    top = [f for f in ("amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni", "avx2", "avx") if f in isa]
    arm = [f for f in ("sve2", "sve", "i8mm", "asimddp") if f in isa]
    return (f"{fp.get('model_name')}, {fp.get('vendor')} {fp.get('family')}/{fp.get('model')}/{fp.get('stepping')}, "
            f"{(top or arm or ['no SIMD flags'])[0]}, {fp.get('threads_allowed')} threads")
