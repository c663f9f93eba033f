"""Rebuild harness/data/crossgpu.json, the cross-device calibration that ships with the package, from
data/published/ and a measured run's calibration.json (Llama 3.2 1B's model size per quant).

    .venv/bin/python scripts/ship-crossgpu.py [--sizes reports/<run>/calibration.json]

tests/test_published.py checks that the shipped file is what this builds from the repository's data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SIZES = REPO / "reports" / "20261128T055841Z-llama-3.2-1b-synthetic" / "calibration.json"
# the latest committed run of each CPU: how far a calibration carries from one CPU to another
CPUS = [REPO / "reports" / f"{r}-llama-3.2-1b-synthetic" / "calibration.json"
        for r in ("20261128T005750Z", "20261128T055841Z")]


def main() -> int:
    from harness import importer
    from harness.analysis import crossgpu

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=Path, default=SIZES)
    a = p.parse_args()
    cal = importer.build_shipped(REPO / "data" / "published", a.sizes, CPUS)
    crossgpu.SHIPPED.parent.mkdir(exist_ok=True)
    crossgpu.SHIPPED.write_text(json.dumps(cal, indent=1, default=float, sort_keys=True) + "\n")
    print("\n".join(crossgpu.lines(cal)))
    print(f"-> {crossgpu.SHIPPED.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
