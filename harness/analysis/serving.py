"""Serving arithmetic: the memory N users at C tokens each need, and a batched step model of their speed.

Memory, term by term, as llama.cpp 0.3.36 allocates it (``src/llama-context.cpp``, ``src/llama-kv-cache.cpp`` in
the pinned source): a context of ``N x C`` tokens is padded to 256 cells; split by user (llama.cpp's default, and
the batched test's), each user's share ``n_ctx / N`` is padded to 256 again, so the cache holds ``N x pad(C)``
cells; unified (``--kv-unified``), ``pad(N x C)`` cells in one stream. A cell holds, per layer, one K row and one V
row of ``n_head_kv x head_dim`` elements of the cache's types (ggml's block sizes: f16 2 bytes, q8_0 34 per 32,
...). The compute buffer follows the context *per user* (``n_ctx_seq``), not the number of users (checked with
``harness simulate -np``); the output buffer holds ``n_seq_max`` rows of logits.

Speed: one generation step of N users reads the weights once, each user's KV cache, and computes each user's
token, so ``t_step = t_w + N x (g + ctx x kv_bytes x k)``; aggregate tok/s = N / t_step, per user 1 / t_step. The
prompt phase of N users arriving at once takes ``N x P x (tau + mu x P)``. The terms are fitted on measured batched
records (``batched.jsonl``: :func:`cells_of`, :func:`fit_step`, :func:`fit_prompt`) or on the published rows of
``harness/data/batched-published.json`` (:func:`published_terms`). Pure functions of their inputs.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from harness.sources.synthetic import ARCHS

log = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parent.parent / "data"
ARCH_1B = ARCHS["llama-3.2-1b"]
KV_PAD = 256  # llama.cpp pads n_ctx, and a split cache's n_ctx_seq, to a multiple of 256 cells
LLAMA_MAX_SEQ = 256  # src/llama-cparams.h of the pinned llama.cpp
LOGIT_BYTES = 4  # llama.cpp's output buffer: float logits, n_vocab per output row
GIB = 1024**3


class ServingError(ValueError):
    """Input the serving estimate cannot take; the message is one line."""


# --- memory ------------------------------------------------------------------------------------------------------

def pad(n: int, to: int = KV_PAD) -> int:
    return -(-int(n) // to) * to


def kv_row_bytes(type_name: str, n: int) -> int:
    """Bytes of one row of `n` elements of a KV cache type, from ggml's block size and bytes per block."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    except KeyError:
        raise ServingError(f"unknown KV cache type {type_name!r} (f16, bf16, f32, q8_0, q4_0, q4_1, q5_0, q5_1, "
                           "iq4_nl)") from None
    if n % block:
        raise ServingError(f"{type_name} blocks of {block} do not divide a row of {n} elements")
    return n // block * size


def kv_bytes_per_cell(arch=ARCH_1B, type_k: str = "f16", type_v: str = "f16") -> int:
    """Bytes one KV cell (one token of one user) takes: per layer, a K row and a V row of n_head_kv x head_dim."""
    n = arch.n_head_kv * arch.head_dim
    return arch.n_layer * (kv_row_bytes(type_k, n) + kv_row_bytes(type_v, n))


def kv_cells(users: int, context: int, unified: bool = False) -> tuple[int, int]:
    """(cells in the cache, cells per user's stream) for `users` x `context` tokens, as llama.cpp 0.3.36 sizes
    them: n_ctx = pad(users x context); split by user, n_ctx_seq = pad(n_ctx / users) and n_ctx = users x n_ctx_seq;
    unified, one stream of n_ctx (every user may use all of it)."""
    n_ctx = pad(users * context)
    if unified:
        return n_ctx, n_ctx
    per = pad(n_ctx // users)
    return users * per, per


@lru_cache(maxsize=1)
def buffers_1b() -> dict[str, Any]:
    """harness/data/buffers-1b.json: llama.cpp's buffers of the 12 quants fully offloaded (scripts/ship-buffers.py)."""
    return json.loads((DATA / "buffers-1b.json").read_text())


def compute_buffers(quant: str, ctx_per_user: int, flash_attn: str = "on") -> dict[str, Any]:
    """llama.cpp's compute buffers (device, host) for one user's context of `ctx_per_user` cells, from
    buffers-1b.json (one sequence; the buffer follows n_ctx_seq, not the users): exact at a tabulated context,
    linear between two (exact where the buffer is affine in the context, as it is with flash attention), the
    smallest context's figure below it, the last two's line beyond the largest."""
    b = buffers_1b()
    cells = b["quants"][quant]
    ctxs = sorted(b["contexts"])
    n = max(ctx_per_user, 1)

    def at(c: int) -> tuple[int, int]:
        x = cells[f"{flash_attn}:{c}"]
        return x["device_compute"], x["host_compute"]

    if n in ctxs or n < ctxs[0]:
        c = n if n in ctxs else ctxs[0]
        dev, host = at(c)
        how = (f"at {c:,} tokens" if n in ctxs else
               f"at {c:,} tokens, its smallest tabulated context (a smaller one needs no more)")
    else:
        lo, hi = ((ctxs[-2], ctxs[-1]) if n > ctxs[-1] else
                  next((a, z) for a, z in zip(ctxs, ctxs[1:], strict=False) if a < n < z))
        (d0, h0), (d1, h1) = at(lo), at(hi)
        f = (n - lo) / (hi - lo)
        dev, host = round(d0 + f * (d1 - d0)), round(h0 + f * (h1 - h0))
        how = (f"{'extrapolated from' if n > hi else 'interpolated between'} {lo:,} and {hi:,} tokens"
               + (" (affine in the context with flash attention)" if flash_attn == "on" else ""))
    return {"device": dev, "host": host, "how": how, "n_ubatch": b.get("n_ubatch"), "flash_attn": flash_attn}


def model_buffers(quant: str) -> dict[str, int]:
    """llama.cpp's model buffers of the 1B `quant` fully offloaded: on the device, and token_embd on the host."""
    x = buffers_1b()["quants"][quant][f"on:{min(buffers_1b()['contexts'])}"]
    return {"device": x["device_model"], "host": x["host_model"]}


def memory(quant: str, users: int, context: int, type_k: str = "f16", type_v: str = "f16", unified: bool = False,
           arch=ARCH_1B) -> dict[str, Any]:
    """The terms of `users` x `context` tokens of Llama 3.2 1B `quant` fully offloaded, llama.cpp's way: model
    buffers (device, host), KV cells x bytes per cell, compute buffers (device, host) at the context per user,
    output buffer (host). Bytes; the runtime's fixed cost is not in it."""
    if quant not in buffers_1b()["quants"]:
        from harness.catalog.quants import suggest

        have = buffers_1b()["quants"]
        raise ServingError(f"no llama.cpp buffers of Llama 3.2 1B {quant!r}{suggest(quant, have)}; it has "
                           f"{', '.join(have)}")
    cells, per = kv_cells(users, context, unified)
    per_cell = kv_bytes_per_cell(arch, type_k, type_v)
    w = model_buffers(quant)
    comp = compute_buffers(quant, per)
    out = users * arch.n_vocab * LOGIT_BYTES
    return {"weights_device": w["device"], "weights_host": w["host"], "kv": cells * per_cell, "kv_cells": cells,
            "kv_cells_per_user": per, "kv_bytes_per_cell": per_cell, "n_ctx": cells, "compute_device": comp["device"],
            "compute_host": comp["host"], "compute_how": comp["how"], "n_ubatch": comp["n_ubatch"],
            "output": out, "type_k": type_k, "type_v": type_v, "unified": unified}


def max_users(quant: str, context: int, budget_bytes: float, on_device: bool, type_k: str = "f16",
              type_v: str = "f16", unified: bool = False) -> int:
    """The most users (1..LLAMA_MAX_SEQ) whose terms fit in `budget_bytes` at `context` tokens each: on a device,
    its model, KV and compute buffers; else (a CPU) every term. 0 where one user does not fit."""
    best = 0
    for n in range(1, LLAMA_MAX_SEQ + 1):
        m = memory(quant, n, context, type_k, type_v, unified)
        if total(m, on_device) > budget_bytes:
            break
        best = n
    return best


def total(m: dict[str, Any], on_device: bool) -> int:
    """A memory breakdown's total on the device (model + KV + compute there), or in RAM (a CPU: all of it)."""
    dev = m["weights_device"] + m["kv"] + m["compute_device"]
    return dev if on_device else dev + m["weights_host"] + m["compute_host"] + m["output"]


# --- measured batched records -> cells ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """One batched cell (quant x pp x tg x pl) of a run: its repetitions' medians."""
    quant: str
    size_bytes: float  # the model file's tensors (model_size_bytes)
    pl: int  # users
    pp: int  # prompt tokens per user
    tg: int  # tokens generated per user
    t_step_s: float  # median over repetitions of t_tg / tg: one generation step of pl users
    t_pp_s: float  # median of t_pp: the prompt phase of pl users (their time to first token)
    kv_bytes_per_cell: float  # of the run's model and K/V types
    reps: int

    @property
    def ctx(self) -> float:
        """The mean context of a generated token: the prompt and half the generation."""
        return self.pp + self.tg / 2


def cells_of(records: list[dict[str, Any]]) -> tuple[list[Cell], list[str]]:
    """The ok batched records (each user its own prompt) grouped by quant x pp x tg x pl, with notes on what was
    left out. KV bytes per cell from the record's own shape and K/V types."""
    from types import SimpleNamespace

    groups: dict[tuple, list[dict]] = {}
    notes = []
    shared = 0
    for r in records:
        b = r.get("batched") or {}
        if r.get("test") != "batched" or r.get("status", "ok") != "ok" or not b.get("t_tg") or not b.get("tg"):
            continue
        if b.get("is_pp_shared"):
            shared += 1
            continue
        groups.setdefault((r["quant"], b["pp"], b["tg"], b["pl"]), []).append(r)
    if shared:
        notes.append(f"{shared} records with one prompt shared by all users (-pps) left out: their KV is not "
                     "each user's own")
    out = []
    for (q, pp, tg, pl), rs in sorted(groups.items()):
        shape = ((rs[0].get("extra") or {}).get("shape")) or {}
        try:
            arch = SimpleNamespace(n_layer=shape["n_layer"], n_head_kv=shape["n_head_kv"], head_dim=shape["head_dim"])
            per_cell = kv_bytes_per_cell(arch, rs[0].get("cache_type_k") or "f16", rs[0].get("cache_type_v") or "f16")
        except (KeyError, TypeError):
            per_cell = rs[0]["kv_bytes"] / rs[0]["n_ctx"] if rs[0].get("kv_bytes") and rs[0].get("n_ctx") else math.nan
        out.append(Cell(q, float(rs[0].get("model_size_bytes") or rs[0].get("file_bytes") or math.nan), pl, pp, tg,
                        statistics.median(r["batched"]["t_tg"] / tg for r in rs),
                        statistics.median(r["batched"]["t_pp"] for r in rs), per_cell, len(rs)))
    return out, notes


# --- the step model's fit ----------------------------------------------------------------------------------------

def fit_step(cells: list[Cell], kv_s_per_byte: float | None = None, kv_basis: str = "") -> dict[str, Any]:
    """Fit t_step = t_w(q) + pl x g(q) + pl x ctx x kv_bytes_per_cell x k to the cells, least squares on the
    relative error (each cell weighs alike). t_w (weights read once a step, and the step's fixed work) and g (a
    user's compute) per quant; k (seconds per KV byte read) shared, fitted where the cells' contexts tell it apart
    from g, else `kv_s_per_byte` (and `kv_basis` says where it is from). A quant with fewer than two distinct pl
    is left out (t_w and g need two). Returns {"quants": {q: {"t_w_s", "g_s", "size_bytes", "pl", "n_cells"}},
    "k_s_per_byte", "k_basis", "rms_rel", "worst_rel", "n_cells", "notes"}."""
    notes: list[str] = []
    by_q: dict[str, list[Cell]] = {}
    for c in cells:
        by_q.setdefault(c.quant, []).append(c)
    use = {q: cs for q, cs in by_q.items() if len({c.pl for c in cs}) >= 2}
    for q in sorted(set(by_q) - set(use)):
        notes.append(f"{q}: one number of users only ({by_q[q][0].pl}): a step's fixed and per-user parts cannot be "
                     "told apart, left out")
    if not use:
        raise ServingError("no quant has batched records at two numbers of users or more: the step model needs them")
    qs = sorted(use)
    rows = [c for q in qs for c in use[q]]
    y = np.array([c.t_step_s for c in rows])
    kv = np.array([c.pl * c.ctx * c.kv_bytes_per_cell for c in rows])
    base = np.zeros((len(rows), 2 * len(qs)))
    for i, c in enumerate(rows):
        j = qs.index(c.quant)
        base[i, 2 * j], base[i, 2 * j + 1] = 1.0, c.pl
    w = 1.0 / y  # relative error
    full = np.column_stack([base, kv])
    k, k_basis = None, kv_basis
    if np.linalg.matrix_rank(full) > np.linalg.matrix_rank(base):
        sol, *_ = np.linalg.lstsq(full * w[:, None], y * w, rcond=None)
        if sol[-1] > 0:
            k = float(sol[-1])
            ctxs = sorted({c.ctx for c in rows})
            k_basis = (f"fitted on these records' contexts ({ctxs[0]:,.0f}-{ctxs[-1]:,.0f} tokens per user, mean over "
                       "each generation)")
        else:
            notes.append("the KV term fitted negative on these records (their contexts differ too little for the "
                         "noise): taken from " + (kv_basis or "nothing") + " instead")
    if k is None:
        if kv_s_per_byte is None:
            raise ServingError("the records' contexts do not tell the KV term apart and no other basis for it was "
                               "given")
        k = float(kv_s_per_byte)
    sol, *_ = np.linalg.lstsq(base * w[:, None], (y - k * kv) * w, rcond=None)
    fitted = base @ sol + k * kv
    rel = np.abs(fitted / y - 1)
    out_q = {}
    for j, q in enumerate(qs):
        t_w, g = float(sol[2 * j]), float(sol[2 * j + 1])
        if g < 0:
            notes.append(f"{q}: the per-user term fitted negative ({g * 1e3:.3f} ms): held at 0")
            g = 0.0
            t_w = float(np.median([(c.t_step_s - k * c.pl * c.ctx * c.kv_bytes_per_cell) for c in use[q]]))
        out_q[q] = {"t_w_s": t_w, "g_s": g, "size_bytes": use[q][0].size_bytes,
                    "pl": sorted({c.pl for c in use[q]}), "n_cells": len(use[q])}
    return {"quants": out_q, "k_s_per_byte": k, "k_basis": k_basis, "rms_rel": float(np.sqrt(np.mean(rel ** 2))),
            "worst_rel": float(rel.max()), "n_cells": len(rows), "notes": notes}


def weights_cost(fit: dict[str, Any]) -> tuple[float, float] | None:
    """(fixed seconds, seconds per byte of weights) of a step, from the fitted t_w of quants of different sizes;
    None with fewer than two sizes."""
    pts = [(v["size_bytes"], v["t_w_s"]) for v in fit["quants"].values() if v["size_bytes"] == v["size_bytes"]]
    if len({round(s) for s, _ in pts}) < 2:
        return None
    s, t = np.array(pts).T
    slope, icpt = np.polyfit(s, t, 1)
    return float(icpt), float(slope)


def predict_step(fit: dict[str, Any], quant: str, size_bytes: float, users: int, context: float,
                 kv_bytes_per_cell: float) -> dict[str, Any]:
    """A step of `users` at `context` tokens each from a fit: its terms (seconds) and how the quant's were had."""
    q = fit["quants"].get(quant)
    how = "measured"
    if q is None:  # the nearest measured quant by size, its terms scaled by the sizes' ratio
        near = min(fit["quants"].items(), key=lambda kv: abs(math.log(kv[1]["size_bytes"] / size_bytes)))
        r = size_bytes / near[1]["size_bytes"]
        q = {"t_w_s": near[1]["t_w_s"] * r, "g_s": near[1]["g_s"] * r}
        how = f"not measured: {near[0]}'s terms scaled by the files' sizes ({r:.2f}x)"
    kv = users * context * kv_bytes_per_cell * fit["k_s_per_byte"]
    step = q["t_w_s"] + users * q["g_s"] + kv
    return {"weights_s": q["t_w_s"], "compute_s": users * q["g_s"], "g_s": q["g_s"], "kv_s": kv, "step_s": step,
            "how": how}


def fit_prompt(cells: list[Cell]) -> dict[str, Any]:
    """Seconds per prompt token: tau(q) + mu x pp (mu shared, where the cells have two prompt lengths or more),
    from the prompt phase of pl users (t_pp / (pl x pp))."""
    by_q: dict[str, list[Cell]] = {}
    for c in cells:
        if c.pp > 0:
            by_q.setdefault(c.quant, []).append(c)
    if not by_q:
        raise ServingError("no batched record with a prompt (pp > 0)")
    pps = sorted({c.pp for cs in by_q.values() for c in cs})
    mu = 0.0
    if len(pps) >= 2:
        qs = sorted(by_q)
        rows = [c for q in qs for c in by_q[q]]
        a = np.zeros((len(rows), len(qs) + 1))
        for i, c in enumerate(rows):
            a[i, qs.index(c.quant)], a[i, -1] = 1.0, c.pp
        y = np.array([c.t_pp_s / (c.pl * c.pp) for c in rows])
        sol, *_ = np.linalg.lstsq(a / y[:, None], np.ones(len(y)), rcond=None)
        mu = max(float(sol[-1]), 0.0)
    tau = {q: float(np.median([c.t_pp_s / (c.pl * c.pp) - mu * c.pp for c in cs])) for q, cs in by_q.items()}
    return {"tau_s": tau, "mu_s": mu, "pp": pps,
            "size_bytes": {q: cs[0].size_bytes for q, cs in by_q.items()}}


def predict_ttft(pf: dict[str, Any], quant: str, size_bytes: float, users: int, prompt: int
                 ) -> tuple[float, float, str]:
    """Seconds until the first token of `users` arriving at once with `prompt` tokens each, the seconds per
    prompt token used, and how the quant's rate was had."""
    tau = pf["tau_s"].get(quant)
    how = "measured"
    if tau is None:
        near = min(pf["tau_s"], key=lambda q: abs(math.log(pf["size_bytes"][q] / size_bytes)))
        tau = pf["tau_s"][near] * size_bytes / pf["size_bytes"][near]
        how = f"not measured: {near}'s rate scaled by the files' sizes"
    per = tau + pf["mu_s"] * prompt
    return users * prompt * per, per, how


# --- published rows ----------------------------------------------------------------------------------------------

def _num(s: str) -> float:
    """A figure as printed ("7.54 GiB", "7.62 B", "2379.83")."""
    v, *unit = s.split()
    scale = {"GiB": GIB, "MiB": 1024**2, "B": 1e9, "M": 1e6}.get(unit[0], 1.0) if unit else 1.0
    return float(v) * scale


def published_rows(source: dict[str, Any]) -> list[dict[str, float]]:
    """A source's rows, parsed from their printed text by its header's column names."""
    cols = [c.strip() for c in source["header"].strip().strip("|").split("|")]
    out = []
    for line in source["rows"]:
        vals = [v.strip() for v in line.strip().strip("|").split("|")]
        if len(vals) != len(cols):
            raise ServingError(f"{source['id']}: a row does not have the header's {len(cols)} columns: {line!r}")
        out.append(dict(zip(cols, map(float, vals), strict=True)))
    return out


@lru_cache(maxsize=1)
def published() -> dict[str, Any]:
    return json.loads((DATA / "batched-published.json").read_text())


def published_terms(source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The step and prompt terms of a published source's rows (the first used one by default): a generation step
    of B users = a + B x g + B x ctx x k (ctx = PP + TG/2), least squares on the relative error; the prompt's
    seconds per token = tau + mu x PP; s_per_byte = a over the weights' bytes (its fixed work folded in)."""
    src = source or next(s for s in published()["sources"] if s.get("used"))
    rows = published_rows(src)
    y = np.array([r["T_TG s"] / r["TG"] for r in rows])
    a = np.column_stack([np.ones(len(rows)), [r["B"] for r in rows], [r["B"] * (r["PP"] + r["TG"] / 2) for r in rows]])
    sol, *_ = np.linalg.lstsq(a / y[:, None], np.ones(len(y)), rcond=None)
    rel = np.abs(a @ sol / y - 1)
    yp = np.array([r["T_PP s"] / (r["B"] * r["PP"]) for r in rows])
    ap = np.column_stack([np.ones(len(rows)), [r["PP"] for r in rows]])
    solp, *_ = np.linalg.lstsq(ap / yp[:, None], np.ones(len(yp)), rcond=None)
    size = _num(src["size"])
    return {"source": src, "a_s": float(sol[0]), "g_s": float(sol[1]), "k_s_per_token": float(sol[2]),
            "tau_s": float(solp[0]), "mu_s": float(solp[1]), "size_bytes": size, "params": _num(src["params"]),
            "s_per_byte": float(sol[0]) / size, "rms_rel": float(np.sqrt(np.mean(rel ** 2))),
            "worst_rel": float(rel.max()), "n_rows": len(rows), "pp": sorted({int(r["PP"]) for r in rows}),
            "b": sorted({int(r["B"]) for r in rows})}
