"""``python -m harness simulate``: llama.cpp's memory arithmetic for contexts, with nothing allocated.

    python -m harness simulate -m FILE.gguf [-c 512,4096,131072] [-ctk f16,q8_0] [-fa on,off] [--rpc local]

Each file is loaded with no_alloc and every context x K/V type x flash-attention cell is created on the devices at
hand (fully offloaded unless -ngl), and llama.cpp's own breakdown read (:mod:`harness.measure.breakdown`).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from harness.measure.breakdown import SimulateError, Simulator, shim, shim_error, totals


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="llama.cpp's memory arithmetic for contexts, with nothing allocated",
                       description="Load each file with no_alloc and read llama.cpp's own breakdown (model, KV, "
                                   "compute per buffer type) for every context x K/V type x flash-attention cell, "
                                   "as fully offloaded to the devices at hand (or -ngl).")
    p.add_argument("-m", "--model", action="append", required=True, type=Path, metavar="FILE.gguf")
    p.add_argument("-c", "--contexts", default="512,2048,8192,32768,131072", help="context sizes (tokens)")
    p.add_argument("-ctk", "--cache-type-k", dest="ctk", default="f16")
    p.add_argument("-ctv", "--cache-type-v", dest="ctv", default="f16")
    p.add_argument("-fa", "--flash-attn", dest="fa", default="on", help="on, off, auto (comma list)")
    p.add_argument("-ngl", "--n-gpu-layers", dest="ngl", type=int, default=-1)
    p.add_argument("-ub", "--ubatch-size", dest="ub", type=int, default=512)
    p.add_argument("--rpc", default="", help="RPC servers HOST:PORT[,...] or 'local' (one on loopback)")
    p.add_argument("--json", action="store_true", help="one JSON object per cell instead of the table")


def main(args) -> int:
    import json

    from harness.config import CACHE_TYPES, FLASH_ATTN, ConfigError
    from harness.llamalog import LogCapture
    from harness.measure import devices

    def ints(s: str, what: str) -> list[int]:
        try:
            v = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"{what} must be comma-separated integers, got {s!r}") from None
        if not v or min(v) < 1:
            raise ConfigError(f"{what} must be positive, got {s!r}")
        return v

    ctxs = ints(args.contexts, "--contexts")
    kvs = [(k, v) for k in args.ctk.split(",") for v in args.ctv.split(",")]
    for t in {x for kv in kvs for x in kv}:
        if t not in CACHE_TYPES:
            raise ConfigError(f"cache type {t!r} is not one of {', '.join(CACHE_TYPES)}")
    fas = args.fa.split(",")
    for fa in fas:
        if fa not in FLASH_ATTN:
            raise ConfigError(f"--flash-attn {fa!r} is not one of {', '.join(FLASH_ATTN)}")
    for m in args.model:
        if not m.is_file():
            raise ConfigError(f"--model {m}: no such file")
    with contextlib.ExitStack() as stack:
        if args.rpc == "local":
            srv = stack.enter_context(devices.RpcServer(1))
            devices.add_rpc_servers([srv.endpoint])
        elif args.rpc:
            try:
                devices.add_rpc_servers(args.rpc.split(","))
            except devices.DeviceError as e:
                raise ConfigError(str(e)) from None
        stack.enter_context(LogCapture())  # llama.cpp's log kept off the terminal
        if shim() is None:
            print(f"error: {shim_error()}", file=sys.stderr)
            return 1
        bench = {"n_gpu_layers": args.ngl, "n_batch": max(args.ub, 512), "n_ubatch": args.ub, "threads": 1}
        head = ["file", "n_ctx", "K/V", "fa", "model dev MiB", "model host MiB", "KV dev MiB", "KV host MiB",
                "compute dev MiB", "compute host MiB", "ms"]
        rows = []
        for m in args.model:
            sim = Simulator(str(m), bench)
            try:
                for n in ctxs:
                    for kv in kvs:
                        for fa in fas:
                            try:
                                bd, ns = sim.cell(n, kv, fa)
                            except SimulateError as e:
                                rows.append([m.name, str(n), "/".join(kv), fa, f"refused: {e}"])
                                continue
                            t = totals(bd)
                            if args.json:
                                print(json.dumps({"file": str(m), "n_ctx": n, "type_k": kv[0], "type_v": kv[1],
                                                  "flash_attn": fa, "breakdown": bd, "ns": ns}))
                                continue
                            rows.append([m.name, str(n), "/".join(kv), fa] + [
                                f"{t[k] / 2**20:,.2f}" for k in ("device_model", "host_model", "device_context",
                                                                 "host_context", "device_compute", "host_compute")]
                                + [f"{ns / 1e6:,.1f}"])
            finally:
                sim.free()
    if not args.json:
        from harness.analysis.summary import _fixed_width

        print("\n".join(_fixed_width(head, rows)))
        print("llama.cpp's own arithmetic (llama_get_memory_breakdown of a no_alloc model): nothing was allocated; "
              "the runtime's fixed cost (CUDA context, cuBLAS, pools) is not in it")
    return 0
