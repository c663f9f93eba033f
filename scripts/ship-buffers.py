"""Rebuild harness/data/buffers-1b.json: llama.cpp's own memory arithmetic for Llama 3.2 1B fully offloaded to a
device, per quant and context (model on the device and on the host, KV, compute), which `estimate` uses for a
GPU's memory. Simulated (no_alloc, nothing allocated) on llama.cpp's RPC device on loopback: the same buffer types
a GPU gets (a device's model, KV and compute buffers; token_embd on the host), from the shape-faithful synthetic
files, which have the real model's tensor shapes and types.

    .venv/bin/python scripts/ship-buffers.py [--cache-dir DIR]    # builds the 12 quants first where missing

What no simulation has: the runtime's fixed cost on a real GPU (CUDA context, cuBLAS workspace, pools)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = REPO / "harness" / "data" / "buffers-1b.json"
CONTEXTS = [512, 2048, 8192, 32768, 131072]


def main() -> int:
    from harness import config
    from harness.catalog import quants
    from harness.llamalog import LogCapture
    from harness.measure import devices, env
    from harness.measure.breakdown import Simulator, totals
    from harness.sources import quantize

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default=None)
    a = p.parse_args()
    cache = Path(a.cache_dir) if a.cache_dir else config.from_dict({"name": "x"}).resolved_cache_dir
    bench = {"n_gpu_layers": -1, "n_batch": 512, "n_ubatch": 512, "threads": 1}
    out = {"what": __doc__.split("\n\n")[0], "command": "scripts/ship-buffers.py",
           "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "llama_cpp_python": quantize.llama_cpp_version(), "cpu": env.cpu_model(),
           "n_ubatch": 512, "n_batch": 512, "kv": "f16/f16", "contexts": CONTEXTS, "quants": {}}
    with devices.RpcServer(1) as srv:
        devices.add_rpc_servers([srv.endpoint])
        with LogCapture():
            for q in quants.PAGE_QUANTS:
                path, _ = quantize.ensure_synthetic(cache, "llama-3.2-1b", 0, q, imatrix=True)
                sim = Simulator(str(path), bench)
                try:
                    cells = {}
                    for fa in ("on", "off"):
                        for n in CONTEXTS:
                            bd, _ = sim.cell(n, ("f16", "f16"), fa)
                            cells[f"{fa}:{n}"] = totals(bd)
                    out["quants"][q] = cells
                finally:
                    sim.free()
                print(q, cells["on:512"], file=sys.stderr)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
