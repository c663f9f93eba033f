"""Benchmark: the harness's batched test against llama.cpp's own llama-batched-bench, cell by cell.

Not a test: timings on shared machines are noisy, so both tools run in alternating rounds (A B B A ...) on the same
file, threads, batch sizes and contexts, and the medians of S_PP and S_TG are compared per cell (pp, tg, pl). The
harness must agree within 5%.

    python benchmarks/batched_vs_llama.py --batched-bench PATH/llama-batched-bench FILE.gguf [FILE.gguf ...] \
        [-npp 128] [-ntg 128] [-npl 1,2,4,8,16,32] [--rounds 2] [--per-cell]

Contexts: by default both tools use llama-batched-bench's one context of -c = max(npl) * (pp + tg) tokens with
n_seq_max = max(npl) (the harness's `bench.batched.ctx`); `--per-cell` instead gives every cell its own context of
exactly what it needs with n_seq_max = pl (the harness's default), llama-batched-bench then run once per cell with
the same -c and -npl. llama-batched-bench is built from the pinned llama.cpp with the wheel's flags:
`TARGETS=llama-batched-bench scripts/build-llama-bench.sh`.
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

Cell = tuple[int, int, int]  # (pp, tg, pl)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def run_batched_bench(exe: str, path: str, a, npl: list[int], ctx: int) -> dict[Cell, dict[str, float]]:
    cmd = [exe, "-m", path, "-c", str(ctx), "-b", str(a.n_batch), "-ub", str(a.n_ubatch), "-t", str(a.threads),
           "-ngl", str(a.ngl), "-npp", ",".join(map(str, a.npp)), "-ntg", ",".join(map(str, a.ntg)),
           "-npl", ",".join(map(str, npl)), "--output-format", "jsonl"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed ({r.returncode}): {r.stderr.strip().splitlines()[-3:]}")
    out = {}
    for line in (r.stdout + "\n" + r.stderr).splitlines():  # its LOG goes to stdout or stderr by build
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            d = json.loads(line)
            out[(d["pp"], d["tg"], d["pl"])] = {"speed_pp": d["speed_pp"], "speed_tg": d["speed_tg"],
                                               "n_kv_max": d["n_kv_max"]}
    return out


def run_harness(path: str, a, npl: list[int], ctx: int) -> dict[Cell, dict[str, float]]:
    from harness.measure import runner, worker

    bench = {"n_prompt": 0, "n_gen": 0, "depths": [0], "repetitions": 1, "warmup": 1, "n_gpu_layers": a.ngl,
             "flash_attn": "auto", "threads": a.threads, "n_batch": a.n_batch, "n_ubatch": a.n_ubatch, "seed": 42,
             "memory_limit_mb": None, "cache_type_k": ["f16"], "cache_type_v": ["f16"],
             "batched": {"npp": a.npp, "ntg": a.ntg, "npl": npl, "pps": False, "ctx": ctx, "kv_unified": False,
                         "repetitions": 1}}
    out: dict[Cell, dict[str, float]] = {}

    def on_record(rec: dict) -> None:
        b = rec.get("batched")
        if rec["status"] == "ok" and b:
            out[(b["pp"], b["tg"], b["pl"])] = {"speed_pp": b["speed_pp"], "speed_tg": b["speed_tg"],
                                                "n_kv_max": b["n_kv_max"]}

    with tempfile.TemporaryDirectory() as tmp:
        base = {"run_id": "batched-vs-llama", "quant": "file", "weights": "local", "weights_ref": path,
                "file_path": path, "file_bytes": 0, "file_sha256": "-", "llama_cpp_version": None}
        job = worker.make_job(path, bench, base, Path(tmp) / "llama.log", expect_arch=None)
        res = runner.measure_in_child(job, 3600, on_record, lambda msg: None, Path(tmp) / "stderr")
    if res.error:
        raise RuntimeError(res.error)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--batched-bench", required=True, help="llama-batched-bench built from the pinned llama.cpp")
    p.add_argument("-npp", type=ints, default=[128])
    p.add_argument("-ntg", type=ints, default=[128])
    p.add_argument("-npl", type=ints, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of each tool (A B B A ...)")
    p.add_argument("--per-cell", action="store_true", help="a context per cell (the harness's default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-batch", type=int, default=2048)
    p.add_argument("--n-ubatch", type=int, default=512)
    p.add_argument("--ngl", type=int, default=99)
    p.add_argument("--json", help="write the raw samples here")
    a = p.parse_args()
    need = max(pp + tg for pp in a.npp for tg in a.ntg)
    if a.per_cell:
        plans = [([pl], pl * need) for pl in a.npl]  # each cell its own context, as the harness's default
    else:
        plans = [(a.npl, max(a.npl) * need)]  # llama-batched-bench's one context for every cell
    rows, raw = [], {}
    worst = 0.0
    for f in a.files:
        samples: dict[str, dict[Cell, list[dict]]] = {"llama-batched-bench": {}, "harness": {}}
        tools = [("llama-batched-bench", lambda npl, ctx, f=f: run_batched_bench(a.batched_bench, f, a, npl, ctx)),
                 ("harness", lambda npl, ctx, f=f: run_harness(f, a, npl, ctx))]
        for i in range(a.rounds):
            for tool, fn in tools if i % 2 == 0 else tools[::-1]:
                for npl, ctx in plans:
                    for cell, d in fn(npl, ctx).items():
                        samples[tool].setdefault(cell, []).append(d)
                print(f"  round {i + 1}/{a.rounds}: {tool} done", file=sys.stderr, flush=True)
        raw[f] = {tool: {str(c): v for c, v in s.items()} for tool, s in samples.items()}
        for cell in sorted(samples["llama-batched-bench"]):
            if cell not in samples["harness"]:
                continue
            row = [Path(f).name, *cell]
            for k in ("speed_pp", "speed_tg"):
                lb = statistics.median(d[k] for d in samples["llama-batched-bench"][cell])
                hv = statistics.median(d[k] for d in samples["harness"][cell])
                row += [lb, hv, hv / lb - 1]
                worst = max(worst, abs(hv / lb - 1))
            n_kv = {d["n_kv_max"] for t in samples for d in samples[t][cell]}
            rows.append(row)
            print(f"{row[0]:<34} pp {cell[0]:>4} tg {cell[1]:>4} pl {cell[2]:>3}  S_PP {row[4]:9.1f} vs {row[5]:9.1f} "
                  f"({100 * row[6]:+5.1f}%)  S_TG {row[7]:8.1f} vs {row[8]:8.1f} ({100 * row[9]:+5.1f}%)  "
                  f"n_kv_max {sorted(n_kv)}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "samples": raw}, indent=1))
    print(f"worst |diff| {100 * worst:.1f}% ({'within' if worst <= 0.05 else 'OUTSIDE'} 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
