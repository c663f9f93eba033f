"""What the allocation-only memory test costs: all 12 quants of the synthetic 1B, 5 context sizes (512 to 128K),
K and V each in f16, q8_0 and q4_0 (9 pairs), flash attention on: 540 contexts, none decoded.

    .venv/bin/python benchmarks/context_sweep.py [--quants Q4_K_M,Q8_0] [--out DIR]

Builds the 1B quants first if the cache lacks them (not timed). Prints the wall time of the sweep, the time per
context (from the records) and per model file, and the largest KV and compute buffers seen; target: minutes,
not hours, on 2 cores (exit 1 past 30 minutes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGET_S = 30 * 60


def main() -> int:
    from harness import config, schema
    from harness.catalog import quants
    from harness.measure import runner
    from harness.sources import quantize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quants", default=",".join(quants.PAGE_QUANTS))
    ap.add_argument("--out", type=Path, help="results folder (default: a temporary one)")
    a = ap.parse_args()
    qs = [q for q in a.quants.split(",") if q]
    cfg = config.from_dict({
        "name": "context-sweep", "quants": qs, "probes": False,
        "model": {"source": "synthetic", "architecture": "llama-3.2-1b", "seed": 0, "imatrix": True},
        "bench": {"n_prompt": 0, "n_gen": 0, "repetitions": 1, "contexts": [512, 2048, 8192, 32768, 131072],
                  "cache_type_k": ["f16", "q8_0", "q4_0"], "cache_type_v": ["f16", "q8_0", "q4_0"],
                  "context_flash_attn": ["on"]},
    })
    for q in qs:  # build what the cache lacks, outside the timed sweep
        quantize.ensure_synthetic(cfg.resolved_cache_dir, "llama-3.2-1b", 0, q, imatrix=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or Path(tmp) / "run"
        t0 = time.perf_counter()
        run_dir, errors = runner.run(cfg, out=out, progress=False, echo=lambda s: None)
        wall = time.perf_counter() - t0
        recs = schema.read_records(run_dir / "contexts.jsonl")
    ok = [r for r in recs if r.status == "ok"]
    per_ctx = [r.wall_ns / 1e9 for r in ok]
    print(f"{len(recs)} contexts ({len(ok)} made, {len(recs) - len(ok)} refused) on {len(qs)} quants in {wall:,.1f} s "
          f"({wall / len(qs):,.1f} s per model file, loading included); creating one context: median "
          f"{statistics.median(per_ctx) * 1e3:,.0f} ms, max {max(per_ctx) * 1e3:,.0f} ms")
    big = max(ok, key=lambda r: r.kv_bytes or 0)
    print(f"largest: {big.n_ctx:,} tokens {big.cache_type_k}/{big.cache_type_v}: KV {big.kv_bytes / 2**20:,.0f} MiB, "
          f"compute {big.compute_bytes / 2**20:,.0f} MiB; errors: {errors or 'none'}")
    print(f"target < {TARGET_S / 60:.0f} min: {'ok' if wall < TARGET_S else 'MISSED'}")
    return 0 if wall < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
