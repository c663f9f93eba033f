"""``python -m harness simulate``: llama.cpp's memory arithmetic for contexts, with nothing allocated.

    python -m harness simulate -m FILE.gguf [-c 512,4096,131072] [-np 1,4,16] [-kvu] [-ctk f16,q8_0] [-fa on,off]
        [--rpc local]

Each file is loaded with no_alloc and every context x parallel sequences x K/V type x flash-attention cell is
created on the devices at hand (fully offloaded unless -ngl), and llama.cpp's own breakdown read
(:mod:`harness.measure.breakdown`). With -np N a context serves N users (llama.cpp's --parallel): split evenly
between them, each user's context n_ctx / N padded to 256 as llama.cpp pads it, or one KV cache of n_ctx shared by
all with -kvu (--kv-unified).
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
    p.add_argument("-np", "--parallel", dest="np", default="1",
                   help="parallel sequences (users) sharing each context (comma list), as llama.cpp's --parallel")
    p.add_argument("-kvu", "--kv-unified", dest="kvu", action="store_true",
                   help="one KV cache shared by all sequences, as llama.cpp's --kv-unified (else split evenly)")
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
    from harness.measure.breakdown import max_seq

    def ints(s: str, what: str) -> list[int]:
        try:
            v = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"{what} must be comma-separated integers, got {s!r}") from None
        if not v or min(v) < 1:
            raise ConfigError(f"{what} must be positive, got {s!r}")
        return v

    ctxs = ints(args.contexts, "--contexts")
    nps = ints(args.np, "-np (--parallel)")
    if max(nps) > max_seq():
        raise ConfigError(f"-np {max(nps)}: llama.cpp takes at most {max_seq()} parallel sequences in one context "
                          "(LLAMA_MAX_SEQ)")
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
        head = ["file", "n_ctx", "np", "ctx/user", "K/V", "fa", "model dev MiB", "model host MiB", "KV dev MiB",
                "KV host MiB", "compute dev MiB", "compute host MiB", "ms"]
        rows = []
        resized: dict[tuple[int, int], int] = {}  # (n_ctx asked, np): the n_ctx llama.cpp made, where not that
        cells = [(n, np_, kv, fa) for n in ctxs for np_ in nps for kv in kvs for fa in fas]
        for m in args.model:
            sim = Simulator(str(m), bench)
            try:
                for n, np_, kv, fa in cells:
                    try:
                        c = sim.context(n, kv, fa, n_seq_max=np_, kv_unified=args.kvu)
                    except SimulateError as e:
                        rows.append([m.name, str(n), str(np_), "", "/".join(kv), fa, f"refused: {e}"])
                        continue
                    bd, ns = c.breakdown, c.ns
                    t = totals(bd)
                    if args.json:
                        print(json.dumps({"file": str(m), "n_ctx": n, "n_seq_max": np_, "kv_unified": args.kvu,
                                          "llama_n_ctx": c.n_ctx, "llama_n_ctx_seq": c.n_ctx_seq,
                                          "type_k": kv[0], "type_v": kv[1], "flash_attn": fa, "breakdown": bd,
                                          "ns": ns}))
                        continue
                    if c.n_ctx != n:
                        resized[(n, np_)] = c.n_ctx
                    rows.append([m.name, str(c.n_ctx), str(np_), str(c.n_ctx_seq), "/".join(kv), fa] + [
                        f"{t[k] / 2**20:,.2f}" for k in ("device_model", "host_model", "device_context",
                                                         "host_context", "device_compute", "host_compute")]
                        + [f"{ns / 1e6:,.1f}"])
            finally:
                sim.free()
    if not args.json:
        from harness.analysis.summary import _fixed_width

        print("\n".join(_fixed_width(head, rows)))
        for (n, np_), made in sorted(resized.items()):
            split = "" if args.kvu or np_ == 1 else f"; split: {np_} users x (n_ctx / {np_} padded to 256)"
            print(f"-c {n} -np {np_}: llama.cpp makes n_ctx {made} (padded to 256{split})")
        if args.kvu:
            print("-kvu: one KV cache of n_ctx shared by the np users (ctx/user: what one user may fill)")
        print("llama.cpp's own arithmetic (llama_get_memory_breakdown of a no_alloc model): nothing was allocated; "
              "the runtime's fixed cost (CUDA context, cuBLAS, pools) is not in it")
    return 0
