"""The batched test: many users decoding at once, by llama-batched-bench's protocol.

``tools/batched-bench/batched-bench.cpp`` of the pinned llama.cpp, with its names: ``-npp``, ``-ntg``, ``-npl``
take lists and every combination (pp, tg, pl) is a cell; a cell needs ``pl*(pp+tg)`` KV cells (``-pps``, one
prompt shared by all: ``pp + pl*tg`` in a unified cache, ``pl*pp + pl*tg`` in one split by sequence) and is
skipped where that exceeds a fixed context (``-c``). After an untimed warm-up of 16 random tokens, each cell:

- prompt phase (timed): the cache cleared, ``pl`` prompts of ``pp`` random tokens (one with ``-pps``), logits for
  each one's last token, decoded in ``n_batch`` chunks, synchronized once at the end;
- with ``-pps``: sequence 0 copied to the others (untimed; outside a unified cache one dummy token applies it);
- generation phase (timed): ``tg`` steps of one token for each of the ``pl`` sequences, synchronized each step.

``S_PP = pl*pp/t_pp`` (``pp/t_pp`` shared), ``S_TG = pl*tg/t_tg``, ``S = (pl*pp + pl*tg)/t``, as its jsonl has
them. llama-batched-bench runs each cell once in one context of ``-c`` tokens and ``n_seq_max = max(npl)``; the
harness repeats each cell (its own repetitions and rounds) and, by default (``ctx: 0``), gives each cell a context
of exactly what it needs with ``n_seq_max = pl``, so that a cell's memory is what ``pl`` users at that context
hold. Each record also has the per-user generation speed (``S_TG / pl``) and the time to first token of ``pl``
users arriving at once (``t_pp``: every first token comes out of the prompt phase's last decode).
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.config import FLASH_ATTN_TYPES
from harness.measure import breakdown, machine, memory

log = logging.getLogger(__name__)

WARMUP_TOKENS = 16  # llama-batched-bench's warm-up: 16 random tokens of sequence 0


@dataclass(frozen=True)
class BatchedCell:
    pp: int  # prompt tokens per user
    tg: int  # tokens generated per user
    pl: int  # users (parallel sequences)
    pps: bool  # one prompt shared by every user (-pps)
    rep: int  # repetition, 0-based

    def n_kv(self, unified: bool) -> int:
        """KV cells the cell needs (batched-bench's n_ctx_req)."""
        if self.pps:
            return (self.pp if unified else self.pl * self.pp) + self.pl * self.tg
        return self.pl * (self.pp + self.tg)

    @property
    def key(self) -> tuple:
        return ("batched", self.pp, self.tg, self.pl, self.pps, self.rep)

    @classmethod
    def of_record(cls, r) -> BatchedCell:
        b = r.batched or {}
        return cls(b.get("pp", r.n_prompt), b.get("tg", r.n_gen), b.get("pl", 1), bool(b.get("is_pp_shared")), r.rep)


def cells(bench: dict[str, Any]) -> list[BatchedCell]:
    """The batched test's cells in llama-batched-bench's order (pp, then tg, then pl), repetition by repetition
    (each pass over the cells is one repetition of each, so a slow spell spreads over cells)."""
    b = bench.get("batched") or {}
    if not b.get("npl"):
        return []
    return [BatchedCell(pp, tg, pl, bool(b.get("pps")), rep) for rep in range(b.get("repetitions", 1))
            for pp in b["npp"] for tg in b["ntg"] for pl in b["npl"]]


def too_big(bench: dict[str, Any]) -> list[BatchedCell]:
    """Cells (repetition 0) that need more KV cells than a fixed context (`ctx`) has: batched-bench skips them."""
    b = bench.get("batched") or {}
    ctx = b.get("ctx") or 0
    return [c for c in cells(bench) if c.rep == 0 and ctx and c.n_kv(bool(b.get("kv_unified"))) > ctx]


class _SeqBatch:
    """A llama_batch of up to `capacity` tokens, one sequence id each, and views of it in `n_batch` chunks (the
    sub-batches batched-bench's decode_helper hands llama_decode), built before anything is timed."""

    def __init__(self, lib, capacity: int):
        self.lib = lib
        self.capacity = capacity
        self.batch = lib.llama_batch_init(capacity, 0, 1)
        for i in range(capacity):
            self.batch.n_seq_id[i] = 1

    def fill(self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, logits: np.ndarray) -> None:
        n = len(tokens)
        b = self.batch
        ctypes.memmove(b.token, np.ascontiguousarray(tokens, dtype=np.int32).ctypes.data, n * 4)
        ctypes.memmove(b.pos, np.ascontiguousarray(pos, dtype=np.int32).ctypes.data, n * 4)
        ctypes.memmove(b.logits, np.ascontiguousarray(logits, dtype=np.int8).ctypes.data, n)
        for i, s in enumerate(seq.tolist()):
            b.seq_id[i][0] = s
        b.n_tokens = n

    def chunks(self, n_batch: int) -> list:
        """llama_batch views of the filled batch, `n_batch` tokens each."""
        b, lib, out = self.batch, self.lib, []
        i32, i8, ptr = ctypes.sizeof(ctypes.c_int32), ctypes.sizeof(ctypes.c_int8), ctypes.sizeof(ctypes.c_void_p)
        for i in range(0, b.n_tokens, n_batch):
            n = min(n_batch, b.n_tokens - i)
            out.append(lib.llama_batch(
                n_tokens=n,
                token=ctypes.cast(ctypes.addressof(b.token.contents) + i * i32, type(b.token)),
                embd=None,
                pos=ctypes.cast(ctypes.addressof(b.pos.contents) + i * i32, type(b.pos)),
                n_seq_id=ctypes.cast(ctypes.addressof(b.n_seq_id.contents) + i * i32, type(b.n_seq_id)),
                seq_id=ctypes.cast(ctypes.addressof(b.seq_id.contents) + i * ptr, type(b.seq_id)),
                logits=ctypes.cast(ctypes.addressof(b.logits.contents) + i * i8, type(b.logits))))
        return out

    def free(self) -> None:
        self.lib.llama_batch_free(self.batch)


def _decode_all(lib, ctx, views: list, sync_each: bool) -> None:
    for v in views:
        rc = lib.llama_decode(ctx, v)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} (a batch of {v.n_tokens} tokens)")
        if sync_each:
            lib.llama_synchronize(ctx)


def run_cell(s, ctx, cell: BatchedCell, unified: bool, n_batch: int, rng: np.random.Generator) -> dict[str, float]:
    """One cell on context `ctx` (of at least cell.n_kv() cells and pl sequences): its two timed phases.
    Returns {t_pp, t_tg} in seconds."""
    lib = s.lib
    mem = lib.llama_get_memory(ctx)
    pp, tg, pl = cell.pp, cell.tg, cell.pl
    n_prompts = 1 if cell.pps else pl
    big = _SeqBatch(lib, max(n_prompts * pp, pl, 1))
    step = _SeqBatch(lib, pl)
    try:
        # everything drawn and laid out before the clock starts
        big.fill(rng.integers(0, s.n_vocab, n_prompts * pp, dtype=np.int32),
                 np.tile(np.arange(pp, dtype=np.int32), n_prompts),
                 np.repeat(np.arange(n_prompts, dtype=np.int32), pp),
                 np.tile((np.arange(pp) == pp - 1).astype(np.int8), n_prompts))
        views = big.chunks(n_batch)
        gen = rng.integers(0, s.n_vocab, (tg, pl), dtype=np.int32)
        lib.llama_memory_clear(mem, False)
        t0 = time.perf_counter_ns()
        _decode_all(lib, ctx, views, sync_each=False)
        lib.llama_synchronize(ctx)
        t_pp = time.perf_counter_ns() - t0
        if cell.pps:
            for i in range(1, pl):
                lib.llama_memory_seq_cp(mem, 0, i, -1, -1)
            if not unified:  # one dummy token applies the copy, then it is removed
                step.fill(rng.integers(0, s.n_vocab, 1, dtype=np.int32), np.array([pp]), np.array([0]),
                          np.array([1]))
                _decode_all(lib, ctx, [step.batch], sync_each=True)
                lib.llama_memory_seq_rm(mem, 0, pp, -1)
        step.fill(gen[0], np.full(pl, pp, dtype=np.int32), np.arange(pl, dtype=np.int32), np.ones(pl, dtype=np.int8))
        b = step.batch
        # each step's tokens and positions laid out before the clock starts: a step only copies two rows in
        pos = np.ascontiguousarray(np.repeat(np.arange(pp, pp + tg, dtype=np.int32)[:, None], pl, axis=1))
        tok_at, pos_at, row = gen.ctypes.data, pos.ctypes.data, pl * 4
        memmove, decode, sync = ctypes.memmove, lib.llama_decode, lib.llama_synchronize
        t0 = time.perf_counter_ns()
        for i in range(tg):
            memmove(b.token, tok_at + i * row, row)
            memmove(b.pos, pos_at + i * row, row)
            rc = decode(ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc} (generation step {i} of {pl} users)")
            sync(ctx)
        t_tg = time.perf_counter_ns() - t0
    finally:
        big.free()
        step.free()
    return {"t_pp": t_pp / 1e9, "t_tg": t_tg / 1e9}


def figures(cell: BatchedCell, t: dict[str, float], settings: dict[str, Any]) -> dict[str, Any]:
    """A cell's `batched` field: llama-batched-bench's jsonl fields, by its names and formulas, and the serving
    figures derived from them."""
    pp, tg, pl = cell.pp, cell.tg, cell.pl
    t_pp, t_tg = t["t_pp"], t["t_tg"]
    tt = t_pp + t_tg
    n_pp = pp if cell.pps else pl * pp
    speed_tg = pl * tg / t_tg if t_tg > 0 else None
    return {
        **settings, "is_pp_shared": int(cell.pps), "pp": pp, "tg": tg, "pl": pl,
        "n_kv": cell.n_kv(bool(settings.get("kv_unified"))),
        "t_pp": t_pp, "speed_pp": n_pp / t_pp if t_pp > 0 else None,
        "t_tg": t_tg, "speed_tg": speed_tg, "t": tt, "speed": (n_pp + pl * tg) / tt if tt > 0 else None,
        # what a server's users see: each one's reading speed, and the wait for the first token of pl users who
        # arrive together (their prompts decoded in one phase: every first token comes out of its last decode)
        "speed_tg_per_user": speed_tg / pl if speed_tg else None,
        "ttft_s": t_pp,
    }


def run(s, bench: dict[str, Any], model_fields: dict[str, Any], todo: list[BatchedCell], emit, progress,
        watch, after_load: dict[str, Any], context_fields: Callable, capture, sim=None) -> None:
    """The batched cells `todo` on loaded session `s`: one record each (an error record for a cell whose context
    or decode fails; the others go on). With `sim` (a breakdown.Simulator of the same file) each record also has
    the same context by llama.cpp's arithmetic alone."""
    b = bench["batched"]
    unified = bool(b.get("kv_unified"))
    fixed = int(b.get("ctx") or 0)
    rng = np.random.default_rng(bench["seed"])
    shared = None  # batched-bench's one context (-c), where the config fixes it
    warmed = False
    try:
        for cell in todo:
            need = cell.n_kv(unified)
            label = f"pp{cell.pp} tg{cell.tg} pl{cell.pl}" + (" pps" if cell.pps else "")
            progress(f"batched {label} rep {cell.rep}")
            base = {**model_fields, "test": "batched", "n_prompt": cell.pp, "n_gen": cell.tg, "n_depth": 0,
                    "rep": cell.rep}
            if fixed and need > fixed:
                continue  # listed when the run starts (too_big), as batched-bench skips it
            n_ctx, n_seq = (fixed, max(b["npl"])) if fixed else (need, cell.pl)
            try:
                if fixed and shared is None:
                    shared = _context(s, bench, n_ctx, n_seq, unified)
                ctx, ctx_log = shared if fixed else _context(s, bench, n_ctx, n_seq, unified)
            except Exception as e:  # noqa: BLE001 - BenchError: llama.cpp could not make it (memory): this cell
                emit({**base, "n_ctx": n_ctx, "status": "error",
                      "error": f"{label}: {e} ({cell.pl} users need a context of {need:,} tokens; fewer users "
                               "(-npl) or shorter prompts and generations need less)"})
                continue
            try:
                ctx_fields = context_fields(ctx_log, model_fields)
                after_ctx = watch.read()
                if not fixed or not warmed:
                    _warm_up(s, ctx, rng)
                    warmed = True
                with capture.paused(breakdown.null_log()):
                    st0 = machine.snapshot()
                    # llama.cpp lowers a context's batch to its n_ctx where that is smaller: chunks of what it takes
                    t = run_cell(s, ctx, cell, unified, min(bench["n_batch"], s.lib.llama_n_batch(ctx)), rng)
                state = machine.during(st0, machine.snapshot(), t["t_pp"] + t["t_tg"], bench["threads"], s.device)
                n_kv_max = int(s.lib.llama_n_ctx(ctx))
                settings = {"n_kv_max": n_kv_max, "n_batch": bench["n_batch"], "n_ubatch": bench["n_ubatch"],
                            "flash_attn": FLASH_ATTN_TYPES[bench["flash_attn"]],
                            "n_gpu_layers": bench["n_gpu_layers"], "n_threads": bench["threads"],
                            "n_threads_batch": bench["threads"], "n_seq_max": n_seq, "kv_unified": unified}
                fig = figures(cell, t, settings)
                dev = watch.fields({"after_load": after_load, "after_context": after_ctx, "after_test": watch.read()})
                dev["memory_breakdown"] = breakdown.breakdown(ctx)
                if sim is not None:  # the same context (n_ctx asked, K/V, fa, n_seq_max, unified) with no_alloc
                    kv = (bench.get("cache_type_k") or ["f16"])[0], (bench.get("cache_type_v") or ["f16"])[0]
                    try:
                        dev["memory_breakdown_simulated"], dev["simulate_ns"] = sim.cell(
                            n_ctx, kv, bench["flash_attn"], n_seq_max=n_seq, kv_unified=unified)
                    except breakdown.SimulateError as e:
                        log.warning("%s", e)
                emit({**base, **ctx_fields, **dev, "n_ctx": n_kv_max, "wall_ns": int(fig["t"] * 1e9),
                      "tokens_per_s": fig["speed"], "batched": fig,
                      "rss_bytes": memory.rss_bytes(), "rss_peak_bytes": memory.peak_rss_bytes(), **memory.rss_parts(),
                      "extra": {**ctx_fields["extra"], "machine": state}})
            except RuntimeError as e:
                emit({**base, "n_ctx": n_ctx, "status": "error", "error": f"{label}: {e}"})
            finally:
                if not fixed:
                    s.lib.llama_free(ctx)
    finally:
        if shared is not None:
            s.lib.llama_free(shared[0])


def _context(s, bench: dict[str, Any], n_ctx: int, n_seq: int, unified: bool):
    kv = (bench.get("cache_type_k") or ["f16"])[0], (bench.get("cache_type_v") or ["f16"])[0]
    return s.new_context(n_ctx, kv, bench["flash_attn"], n_seq_max=n_seq, kv_unified=unified)


def _warm_up(s, ctx, rng: np.random.Generator) -> None:
    """batched-bench's warm-up: 16 random tokens of sequence 0 (fewer where the context's batch is smaller),
    decoded and synchronized, untimed."""
    lib = s.lib
    n = min(WARMUP_TOKENS, lib.llama_n_batch(ctx))
    w = _SeqBatch(lib, n)
    try:
        w.fill(rng.integers(0, s.n_vocab, n, dtype=np.int32), np.arange(n), np.zeros(n, dtype=np.int32),
               np.zeros(n, dtype=np.int8))
        _decode_all(lib, ctx, [w.batch], sync_each=True)
    finally:
        w.free()
        lib.llama_memory_clear(lib.llama_get_memory(ctx), False)
