"""The machine's state around a repetition: CPU time, steal, the descheduled flag; pinning; the host's state."""

from __future__ import annotations

import os

from harness.measure import machine


def test_a_repetition_the_host_stole_from_is_flagged():
    a = machine.Snapshot(cpu_s=10.0, steal=1000, total=100_000)
    ok = machine.during(a, machine.Snapshot(11.8, 1010, 101_000), wall_s=1.0, threads=2, device="cpu")
    assert ok == {"cpu_s": 1.8, "cpu_util": 0.9, "steal_frac": 0.01, "descheduled": False}
    stolen = machine.during(a, machine.Snapshot(11.8, 1100, 101_000), wall_s=1.0, threads=2, device="cpu")
    assert stolen["steal_frac"] == 0.1 and stolen["descheduled"]
    idle = machine.during(a, machine.Snapshot(10.5, 1000, 101_000), wall_s=1.0, threads=2, device="cpu")
    assert idle["cpu_util"] == 0.25 and idle["descheduled"]  # the threads ran a quarter of the time
    # on a GPU the CPU threads wait on the device: low CPU use is no sign of a slow spell
    assert not machine.during(a, machine.Snapshot(10.1, 1000, 101_000), 1.0, 2, "cuda")["descheduled"]


def test_pin_and_host_state():
    before = os.sched_getaffinity(0)
    try:
        got = machine.pin(1)
        assert got == sorted(before)[:1] and os.sched_getaffinity(0) == set(got)
    finally:
        os.sched_setaffinity(0, before)
    st = machine.host_state()
    assert {"loadavg", "governor", "steal_ticks", "total_ticks"} <= set(st)
    assert st["total_ticks"] is None or st["total_ticks"] > 0
