"""Child-process entry: measure one model file, speak JSON lines to the parent.

``python -m harness.measure.worker`` reads one job (JSON) on stdin and writes messages on its original stdout, one
JSON object per line: ``{"kind": "record", "record": {...}}`` per measured repetition,
``{"kind": "progress", "msg": "..."}`` and, on a failure it can report, ``{"kind": "error", "error": "..."}``.
Before llama.cpp is even imported, the file's header is checked in Python (:mod:`harness.gguf.validate`): a damaged
or hostile file becomes an "invalid GGUF" error, never llama.cpp's problem. llama.cpp's log goes to the job's
log file. Anything else that writes to stdout (C code's printf) is moved to stderr first, so it cannot corrupt
the protocol. A crash or hang is the parent's to report (:mod:`harness.measure.runner`): whatever was already sent is
kept. On Linux the process is killed when its parent dies, so a killed sweep leaves nothing measuring.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
import traceback
from typing import Any


def _protocol_stream():
    # Keep the real stdout for messages; point fd 1 at stderr for everyone else.
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", buffering=1, encoding="utf-8")


def _limit_memory(mb: int | None) -> None:
    if not mb:
        return
    import resource

    limit = mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _die_with_parent() -> None:
    # Linux: SIGKILL this process when the sweep that started it dies (kill -9 of the sweep), rather than
    # measuring on as an orphan beside the resumed run until its next message hits a broken pipe.
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def make_job(path: str | os.PathLike, bench: dict[str, Any], record_base: dict[str, Any], log_path: str | os.PathLike,
             *, skip_cells: list | None = None, skip_mem: list | None = None, expect_arch: str | None = "llama"
             ) -> dict[str, Any]:
    """The one job this worker takes (JSON on stdin): the file, the resolved bench settings with the cells
    already measured (`skip_cells` [test, depth, rep], `skip_mem` memory-test and batched keys), the fields every
    record of it starts from, where llama.cpp's log goes, and the architecture its header must name (checked before
    llama.cpp opens it; None accepts any)."""
    return {
        "path": str(path),
        "bench": {**bench, "skip_cells": list(skip_cells or []), "skip_mem": list(skip_mem or [])},
        "log_path": str(log_path),
        "expect_arch": expect_arch,
        "record_base": dict(record_base),
    }


def run_quality_job(job: dict[str, Any], send) -> int:
    """The quality test: every quant against the reference on the job's text (harness.measure.quality), one
    record per quant, sent when all chunks are scored."""
    from harness import schema
    from harness.gguf import validate
    from harness.llamalog import LogCapture
    from harness.measure import quality

    files = {"reference": job["reference"], **job["quants"]}
    for label, path in files.items():
        try:
            validate.check(path, None)
        except validate.InvalidGGUF as e:
            send({"kind": "error", "error": f"{label}: invalid GGUF, not loaded: {e}"})
            return 3
    text = open(job["text_path"], encoding="utf-8", errors="replace").read()
    log_file = open(job["log_path"], "a", encoding="utf-8") if job.get("log_path") else None  # noqa: SIM115

    def emit(label: str, stats: dict[str, Any], run: dict[str, Any]) -> None:
        rec = schema.make(**{**job["bases"][label], "status": "ok", "test": "quality", "n_prompt": run["n_ctx"],
                             "n_gen": 0, "n_depth": 0, "rep": 0, "wall_ns": run["wall_ns"], "n_ctx": run["n_ctx"],
                             "model_desc": run["model_desc"], "model_size_bytes": run["model_size_bytes"],
                             "model_n_params": run["model_n_params"],
                             "n_threads": job["threads"], "n_gpu_layers": job["n_gpu_layers"], "quality": stats,
                             "extra": {**job["extra"], **{k: run[k] for k in ("n_tokens_text", "n_chunks",
                                                                               "n_chunks_max", "reference_wall_ns")}},
                             "utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
        send({"kind": "record", "record": json.loads(rec.to_json())})

    try:
        with LogCapture(echo=(lambda line: log_file.write(line + "\n")) if log_file else None):
            quality.measure(job["reference"], job["quants"], text, job["n_ctx"], job.get("chunks"), job["threads"],
                            job["n_gpu_layers"], emit, progress=lambda m: send({"kind": "progress", "msg": m}))
        return 0
    except quality.QualityError as e:
        send({"kind": "error", "error": str(e)})
        return 3
    finally:
        if log_file:
            log_file.close()


def run_job(job: dict[str, Any], send) -> int:
    from harness.gguf import validate

    if job.get("kind") == "quality":
        return run_quality_job(job, send)

    # Check the header in Python before llama.cpp is even imported: a hostile or damaged file must not reach
    # its parser (absurd allocations, assertion aborts, reads past the mapping).
    try:
        header = validate.check(job["path"], job.get("expect_arch", "llama"))
    except validate.InvalidGGUF as e:
        send({"kind": "error", "error": f"invalid GGUF, not loaded: {e}"})
        return 3
    from harness import schema
    from harness.llamalog import LogCapture
    from harness.measure import bench

    limit_mb = job["bench"].get("memory_limit_mb")
    log_file = open(job["log_path"], "a", encoding="utf-8") if job.get("log_path") else None  # noqa: SIM115

    def echo(line: str) -> None:
        if log_file:
            log_file.write(line + "\n")

    from harness.measure import machine

    pinned = machine.pin(job["bench"].get("threads"))
    # what every record of this file carries besides its measurement: the job's fields, the file's tensor types
    # and shape from the header just validated, and the CPUs the measurement is pinned to
    base = {**job["record_base"], "tensor_types": header.tensor_types(),
            "extra": {**(job["record_base"].get("extra") or {}), "shape": header.shape(),
                      **({"affinity": pinned} if pinned is not None else {})}}

    def emit(measured: dict[str, Any]) -> None:
        rec = schema.make(**{**base, "status": "ok", **measured,
                             "extra": {**base["extra"], **(measured.get("extra") or {})},
                             "utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
        send({"kind": "record", "record": json.loads(rec.to_json())})

    try:
        with contextlib.ExitStack() as stack:
            b = job["bench"]
            if b.get("rpc") == "local":  # this file's own RPC server on loopback (harness.measure.devices)
                from harness.measure import devices

                try:
                    srv = stack.enter_context(devices.RpcServer(b["threads"], log_path=(
                        f"{job['log_path']}.rpc-server" if job.get("log_path") else None)))
                except devices.DeviceError as e:
                    raise bench.BenchError(str(e)) from None
                b = {**b, "rpc_endpoints": [srv.endpoint], "rpc_server_pid": srv.pid}
            cap = stack.enter_context(LogCapture(echo=echo))
            bench.measure(job["path"], b, emit, cap, progress=lambda msg: send({"kind": "progress", "msg": msg}))
        return 0
    except bench.BenchError as e:
        msg = str(e)
        if limit_mb and ("alloc" in msg or "memory" in msg):  # say which limit it ran into
            msg += f" (the measuring process is limited to bench.memory_limit_mb = {limit_mb} MB of address space)"
        send({"kind": "error", "error": msg})
        return 3
    except MemoryError:
        why = f"bench.memory_limit_mb = {limit_mb} MB" if limit_mb else "Python MemoryError"
        send({"kind": "error", "error": f"out of memory ({why}, in the measuring process)"})
        return 3
    finally:
        if log_file:
            log_file.close()


def main() -> int:
    _die_with_parent()
    # On an assertion ggml attaches gdb to print a backtrace: slow, and its chatter would bury the one line
    # the parent reports ("...: GGML_ASSERT(...) failed") under "[Inferior 1 (process N) detached]".
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    out = _protocol_stream()

    def send(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    try:
        job = json.loads(sys.stdin.read())
        _limit_memory((job.get("bench") or {}).get("memory_limit_mb"))
        return run_job(job, send)
    except Exception as e:  # noqa: BLE001 - every failure must reach the parent as one line
        traceback.print_exc()
        send({"kind": "error", "error": f"{type(e).__name__}: {e}"})
        return 4


if __name__ == "__main__":
    sys.exit(main())
