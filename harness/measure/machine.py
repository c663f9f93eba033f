"""The machine's state around a measurement: CPU time of the measuring process and the host's steal time over
each repetition (a repetition descheduled by a busy host is flagged, not silently averaged in), and the CPU's
frequency, governor and load for env.json. Linux /proc and /sys where readable; nulls elsewhere."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any, NamedTuple

DESCHEDULED_STEAL = 0.05  # more than 5% of the host's CPU time stolen during a repetition
DESCHEDULED_UTIL = 0.6  # on a CPU, the measuring threads ran less than 60% of the wall time


class Snapshot(NamedTuple):
    cpu_s: float  # user + system CPU time of this process (all its threads)
    steal: int | None  # host-wide steal ticks (/proc/stat)
    total: int | None  # host-wide ticks of every kind


def _proc_stat() -> tuple[int | None, int | None]:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None, None
    if not fields or fields[0] != "cpu":
        return None, None
    ticks = [int(x) for x in fields[1:]]
    return (ticks[7] if len(ticks) > 7 else None), sum(ticks[:8])


def snapshot() -> Snapshot:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    steal, total = _proc_stat()
    return Snapshot(ru.ru_utime + ru.ru_stime, steal, total)


def during(a: Snapshot, b: Snapshot, wall_s: float, threads: int | None, device: str | None) -> dict[str, Any]:
    """What happened over one repetition: the process's CPU time, its use of the threads it was given, the
    share of the host's time stolen, and whether the repetition was descheduled (flagged, kept)."""
    cpu = b.cpu_s - a.cpu_s
    util = cpu / (wall_s * threads) if wall_s > 0 and threads else None
    steal = None
    if a.steal is not None and b.steal is not None and b.total and a.total and b.total > a.total:
        steal = (b.steal - a.steal) / (b.total - a.total)
    desched = bool((steal is not None and steal > DESCHEDULED_STEAL)
                   or (device == "cpu" and util is not None and util < DESCHEDULED_UTIL))
    return {"cpu_s": round(cpu, 6), "cpu_util": None if util is None else round(util, 4),
            "steal_frac": None if steal is None else round(steal, 4), "descheduled": desched}


def pin(threads: int | None) -> list[int] | None:
    """Pin this process to `threads` of the CPUs it may use (the first ones), so its threads do not wander;
    the CPUs it runs on, or None where affinity cannot be set."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
        use = allowed[:threads] if threads and threads < len(allowed) else allowed
        os.sched_setaffinity(0, use)
        return use
    except (AttributeError, OSError):
        return None


def host_state() -> dict[str, Any]:
    """The CPU's frequency and governor (where /sys says), the load averages and the steal ticks so far."""
    out: dict[str, Any] = {"utc_s": time.time()}
    try:
        out["loadavg"] = list(os.getloadavg())
    except OSError:
        out["loadavg"] = None
    cpu0 = Path("/sys/devices/system/cpu/cpu0/cpufreq")
    for key, name in (("governor", "scaling_governor"), ("cur_khz", "scaling_cur_freq"),
                      ("max_khz", "cpuinfo_max_freq")):
        try:
            v = (cpu0 / name).read_text().strip()
            out[key] = int(v) if v.isdigit() else v
        except OSError:
            out[key] = None
    if out.get("cur_khz") is None:
        try:
            mhz = [float(x.split(":")[1]) for x in Path("/proc/cpuinfo").read_text().splitlines()
                   if x.startswith("cpu MHz")]
            out["cpuinfo_mhz"] = sum(mhz) / len(mhz) if mhz else None
        except OSError:
            pass
    out["steal_ticks"], out["total_ticks"] = _proc_stat()
    return out
