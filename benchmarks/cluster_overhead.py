"""Benchmark: the cluster's overhead per cell. The same sweep of the tiny model (6 quants x pp/tg x 4
repetitions) run locally and through `run --cluster` on a one-node local Ray cluster (in a loopback-only network
namespace: needs root and unshare), back to back on this machine; prints both wall times, the ratio and the
overhead per cell.

    python benchmarks/cluster_overhead.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    cluster, local = [], []
    for _ in range(a.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["unshare", "-n", sys.executable, str(REPO / "tests" / "cluster_scenario.py"), "plain",
                            tmp], check=True, capture_output=True)
            sc = json.loads((Path(tmp) / "scenario.json").read_text())
            if sc.get("rc") or sc.get("local_rc"):
                print(sc.get("stderr", "")[-2000:])
                return 1
            cluster.append(sc["seconds"])
            local.append(sc["local_seconds"])
    cells = 6 * 2 * 4
    c, lo = statistics.median(cluster), statistics.median(local)
    print(f"sweep of {cells} cells: cluster {c:.1f} s, local {lo:.1f} s (medians of {a.rounds}); "
          f"ratio {c / lo:.2f}x; overhead {(c - lo) / cells * 1e3:+.0f} ms per cell "
          f"({(c - lo) / 6:+.2f} s per quant task)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
