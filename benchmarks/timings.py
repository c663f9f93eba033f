"""Timing targets that used to be pass/fail assertions, measured here instead (a shared machine's timings are
noise to a test): how long the default CPU bandwidth probe takes, and how fast the one GGUF header reader gets
through Llama 3.2 1B's header (128K-token vocabulary and merges).

    .venv/bin/python benchmarks/timings.py [--reps 5]

Prints each figure (median and range over the repetitions) beside its target; exits 1 if a median misses it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

TARGETS = {  # seconds
    "bandwidth probe (default settings)": 3.0,
    "bandwidth probe, compiled STREAM (what a run uses)": 5.0,
    "GGUF header of the 1B's vocabulary (validate.check)": 0.5,
}


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    from test_reliability import header_heavy_gguf

    from harness.gguf import validate
    from harness.measure import bandwidth

    with tempfile.TemporaryDirectory() as tmp:
        path = header_heavy_gguf(Path(tmp) / "vocab.gguf")
        results = {
            "bandwidth probe (default settings)": timed(bandwidth.measure_cpu_bandwidth, a.reps),
            "bandwidth probe, compiled STREAM (what a run uses)": timed(bandwidth.measure_cpu_bandwidth_compiled,
                                                                        a.reps),
            "GGUF header of the 1B's vocabulary (validate.check)": timed(lambda: validate.check(path), a.reps),
        }
    bad = 0
    for name, ts in results.items():
        med = statistics.median(ts)
        ok = med < TARGETS[name]
        bad += not ok
        print(f"{name}: median {med * 1e3:,.1f} ms (range {min(ts) * 1e3:,.1f}-{max(ts) * 1e3:,.1f}, n={len(ts)}); "
              f"target < {TARGETS[name] * 1e3:,.0f} ms: {'ok' if ok else 'MISSED'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
