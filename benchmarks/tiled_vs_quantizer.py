"""Benchmark: the tiled synthetic quants of the full 1B against llama.cpp's quantizer: build time, fidelity, speed.

Not a test (minutes of llama.cpp's quantizer, timings on a shared machine). Three steps, each on one cache folder:

    .venv/bin/python benchmarks/tiled_vs_quantizer.py build CACHE      # the 12 quants from an empty cache, timed
    nice -n 10 .venv/bin/python benchmarks/tiled_vs_quantizer.py fidelity CACHE   # + llama.cpp's quantizer's files
    .venv/bin/python benchmarks/tiled_vs_quantizer.py speed CACHE --quants Q4_K_M,IQ3_M,Q8_0

``build``: each quant built as a run builds it (``quantize.ensure_synthetic``, a progress bar per file), the
seconds per quant and in all; target: under 2 minutes for the 12 on a 2-core machine. ``fidelity``: the same
quants made the slow way (``quantize.ensure_reference``: the full F16 file of seeded values, then llama.cpp's
quantizer, 1-3 min a quant), and per quant the size of each, whether the headers (keys, tensor order, types,
offsets) are equal to the byte, the tensors whose type differs, and the tensors whose first rows differ.
``speed``: the harness's tg and pp (llama-bench's protocol, the measuring child of a run) on the tiled file and
on the quantizer's, in alternating runs (A B B A A B ...: a drift of the machine's speed falls on both), the
median of each and the ratio tiled / quantizer per test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

SEED = 0
BUILD_TARGET_S = 120.0


def _quants(a) -> list[str]:
    from harness.catalog import quants

    return a.quants.split(",") if a.quants else list(quants.PAGE_QUANTS)


def build(a) -> int:
    from harness.sources import quantize

    times = {}
    t_all = time.perf_counter()
    for q in _quants(a):
        t0 = time.perf_counter()
        path, built = quantize.ensure_synthetic(a.cache, a.arch, SEED, q, imatrix=True, progress=True)
        times[q] = time.perf_counter() - t0
        print(f"{q:8s} {times[q]:6.1f} s  {path.stat().st_size:>14,} bytes{'' if built else '  (cached)'}", flush=True)
    total = time.perf_counter() - t_all
    print(f"all {len(times)}: {total:.1f} s (target < {BUILD_TARGET_S:.0f} s: "
          f"{'ok' if total < BUILD_TARGET_S else 'MISSED'})")
    return 0 if total < BUILD_TARGET_S else 1


def compare(built: Path, reference: Path) -> dict:
    """What the tiled file shares with the quantizer's: sizes, header bytes, types, first rows."""
    import gguf
    from test_tiled import header, tensors

    from harness.sources import tiled

    types = [{t.name: t.tensor_type.name for t in gguf.GGUFReader(p).tensors} for p in (built, reference)]
    ours, theirs = tensors(built), tensors(reference)
    first_rows_differ = [n for n, rows in ours.items()
                         if not (rows[:tiled.TILE_ROWS] == theirs[n][:tiled.TILE_ROWS]).all()]
    return {"size": built.stat().st_size, "ref_size": reference.stat().st_size, "n_tensors": len(types[0]),
            "header_equal": header(built) == header(reference),
            "types_differ": sorted(n for n in types[0] if types[0][n] != types[1].get(n)),
            "first_rows_differ": first_rows_differ}


def fidelity(a) -> int:
    from harness.sources import quantize

    print("| quant | tiled bytes | quantizer bytes | equal | tensors | types differ | header equal | first rows "
          "differ | quantizer s |")
    print("|---|---|---|---|---|---|---|---|---|")
    bad = 0
    for q in _quants(a):
        built, _ = quantize.ensure_synthetic(a.cache, a.arch, SEED, q, imatrix=True, progress=True)
        t0 = time.perf_counter()
        reference, made = quantize.ensure_reference(a.cache, a.arch, SEED, q, imatrix=True, progress=True)
        secs = f"{time.perf_counter() - t0:.0f}" if made else "cached"
        c = compare(built, reference)
        same = c["size"] == c["ref_size"] and c["header_equal"] and not c["types_differ"] and not c["first_rows_differ"]
        bad += not same
        print(f"| {q} | {c['size']:,} | {c['ref_size']:,} | {'yes' if c['size'] == c['ref_size'] else 'NO'} | "
              f"{c['n_tensors']} | {len(c['types_differ'])} | {'yes' if c['header_equal'] else 'NO'} | "
              f"{len(c['first_rows_differ'])} | {secs} |", flush=True)
    return 1 if bad else 0


def speed(a) -> int:
    from vs_llama_bench import run_harness

    from harness.sources import quantize

    rows = []
    for q in _quants(a):
        files = {"tiled": quantize.synthetic_file(a.cache, a.arch, SEED, q, True),
                 "quantizer": quantize.reference_file(a.cache, a.arch, SEED, q, True)}
        missing = [str(p) for p in files.values() if not p.exists()]
        if missing:
            print(f"{q}: run build and fidelity first (missing {', '.join(missing)})")
            return 1
        samples = {k: {"pp": [], "tg": []} for k in files}
        for i in range(a.rounds):
            # A B B A A B ...: a linear drift of the machine's speed, and whatever the run before leaves behind
            # (page cache, frequency), falls on both files alike
            for kind in ("tiled", "quantizer") if i % 2 == 0 else ("quantizer", "tiled"):
                got = run_harness(str(files[kind]), a)
                for test in ("pp", "tg"):
                    samples[kind][test] += got[test]
                print(f"  {q} round {i + 1} {kind}: pp {statistics.median(got['pp']):.2f} "
                      f"tg {statistics.median(got['tg']):.2f} tok/s", flush=True)
        rows.append((q, samples))
    print("\n| quant | test | tiled tok/s (median, range) | quantizer tok/s (median, range) | tiled / quantizer |")
    print("|---|---|---|---|---|")
    for q, s in rows:
        for test in ("tg", "pp"):
            t, r = s["tiled"][test], s["quantizer"][test]
            print(f"| {q} | {test} | {statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f}) | "
                  f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f}) | "
                  f"{statistics.median(t) / statistics.median(r):.3f} |")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=("build", "fidelity", "speed"))
    p.add_argument("cache", type=Path, help="the cache folder (build: a new or empty one)")
    p.add_argument("--arch", default="llama-3.2-1b", help="a synthetic architecture (tiny: a check in seconds)")
    p.add_argument("--quants", help="comma-separated (default: the page's 12; speed: Q4_K_M,IQ3_M,Q8_0)")
    p.add_argument("--rounds", type=int, default=4, help="speed: runs of each file, alternating")
    p.add_argument("--n-prompt", type=int, default=128)
    p.add_argument("--n-gen", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-batch", type=int, default=512)
    p.add_argument("--n-ubatch", type=int, default=512)
    p.add_argument("--ngl", type=int, default=99)
    a = p.parse_args()
    if a.step == "speed" and not a.quants:
        a.quants = "Q4_K_M,IQ3_M,Q8_0"
    return {"build": build, "fidelity": fidelity, "speed": speed}[a.step](a)


if __name__ == "__main__":
    sys.exit(main())
