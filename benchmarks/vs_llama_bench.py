"""Benchmark: the harness's tok/s against llama.cpp's own llama-bench, side by side on the same files.

Not a test: timings on shared machines are noisy, so this runs both tools in alternating rounds
(llama-bench, harness, llama-bench, harness, ...) with the same file, threads and batch sizes, and reports
the ratio of medians. The harness must agree within 3%.

    python benchmarks/vs_llama_bench.py --llama-bench /path/to/llama-bench FILE.gguf [FILE.gguf ...]

llama-bench comes from the llama.cpp sources inside the llama-cpp-python source package
(vendor/llama.cpp); build it with the same compiler flags as the wheel (see scripts/build-llama-bench.sh).
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
sys.path.insert(0, str(REPO))


def run_llama_bench(exe: str, path: str, a) -> dict[str, list[float]]:
    cmd = [exe, "-m", path, "-p", str(a.n_prompt), "-n", str(a.n_gen), "-r", str(a.reps), "-t", str(a.threads),
           "-b", str(a.n_batch), "-ub", str(a.n_ubatch), "-ngl", str(a.ngl), "-o", "jsonl"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out: dict[str, list[float]] = {}
    for line in r.stdout.splitlines():
        d = json.loads(line)
        kind = "pp" if d["n_prompt"] > 0 else "tg"
        out[kind] = [float(x) for x in d["samples_ts"]]
    return out


def run_harness(path: str, a) -> dict[str, list[float]]:
    from harness.measure import runner, worker

    bench = {"n_prompt": a.n_prompt, "n_gen": a.n_gen, "depths": [0], "repetitions": a.reps, "warmup": 1,
             "n_gpu_layers": a.ngl, "flash_attn": "auto", "threads": a.threads, "n_batch": a.n_batch,
             "n_ubatch": a.n_ubatch, "seed": 42, "memory_limit_mb": None}
    out: dict[str, list[float]] = {"pp": [], "tg": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = {"run_id": "vs-llama-bench", "quant": "file", "weights": "local", "weights_ref": path,
                "file_path": path, "file_bytes": 0, "file_sha256": "-", "llama_cpp_version": None}
        job = worker.make_job(path, bench, base, Path(tmp) / "llama.log", expect_arch=None)  # any architecture
        res = runner.measure_in_child(job, 3600, lambda rec: out[rec["test"]].append(rec["tokens_per_s"]),
                                      lambda msg: None, Path(tmp) / "stderr")
    if res.error:
        raise RuntimeError(res.error)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--llama-bench", required=True)
    p.add_argument("--n-prompt", type=int, default=256)
    p.add_argument("--n-gen", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2,
                   help="alternating rounds of each tool per file: more, shorter rounds cancel the drift of a shared "
                        "machine's load better")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-batch", type=int, default=512)
    p.add_argument("--n-ubatch", type=int, default=512)
    p.add_argument("--ngl", type=int, default=99)
    p.add_argument("--json", help="write the raw samples here")
    a = p.parse_args()
    rows, raw = [], {}
    for f in a.files:
        samples = {"llama-bench": {"pp": [], "tg": []}, "harness": {"pp": [], "tg": []}}
        tools = [("llama-bench", lambda f=f: run_llama_bench(a.llama_bench, f, a)),
                 ("harness", lambda f=f: run_harness(f, a))]
        for i in range(a.rounds):
            # ABBA order: a drift in the machine's speed over the run hits both tools alike
            for tool, fn in tools if i % 2 == 0 else tools[::-1]:
                got = fn()
                for k in ("pp", "tg"):
                    samples[tool][k] += got.get(k, [])
        raw[f] = samples
        for k in ("pp", "tg"):
            if not samples["llama-bench"][k] or not samples["harness"][k]:
                continue
            lb = statistics.median(samples["llama-bench"][k])
            hv = statistics.median(samples["harness"][k])
            rows.append((Path(f).name, k, lb, hv, hv / lb - 1))
            print(f"{Path(f).name:<40} {k}  llama-bench {lb:9.2f} t/s  harness {hv:9.2f} t/s  "
                  f"diff {100 * (hv / lb - 1):+5.1f}%", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "samples": raw}, indent=1))
    worst = max(abs(r[4]) for r in rows)
    print(f"worst |diff| {100 * worst:.1f}% ({'within' if worst <= 0.03 else 'OUTSIDE'} 3%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
