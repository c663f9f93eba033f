"""Measured points: one row per (quant, depth) of tg records, with the bytes each token reads and, where the
records carry them, the weights per tensor type and family and the kernel probes' time; and the memory points.
Pure functions of the records DataFrame."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import pandas as pd

from harness import llamalog
from harness.sources.probes import UNPROBED
from harness.sources.synthetic import ARCHS

log = logging.getLogger(__name__)

ARCH = ARCHS["llama-3.2-1b"]
KV_TYPE_BYTES = 2  # llama.cpp's default KV cache type is f16
KV_PAD_CELLS = 256  # llama.cpp 0.3.36 rounds a KV cache up to a multiple of 256 cells


def kv_cells(n_ctx):
    """The cells llama.cpp allocates for a context of `n_ctx` tokens (rounded up to a multiple of 256); works
    on numbers and numpy arrays alike."""
    return -(-n_ctx // KV_PAD_CELLS) * KV_PAD_CELLS


def kv_bytes_per_token(arch=ARCH) -> int:
    """Bytes of f16 K and V per cached token: 2 x n_layer x n_kv_heads x head_dim x 2 (32 KiB for the 1B)."""
    return 2 * arch.n_layer * arch.n_head_kv * arch.head_dim * KV_TYPE_BYTES


# --- quant families -----------------------------------------------------------------------------------------

_IQ_TYPES = {"IQ3_M": "iq3_s", "IQ3_S": "iq3_s", "IQ3_XS": "iq3_xxs", "IQ3_XXS": "iq3_xxs", "IQ2_M": "iq2_s",
             "IQ2_S": "iq2_xs", "IQ2_XS": "iq2_xs", "IQ2_XXS": "iq2_xxs", "IQ1_S": "iq1_s", "IQ1_M": "iq1_m",
             "IQ4_XS": "iq4_xs", "IQ4_NL": "iq4_nl"}


def quant_family(quant: str) -> str:
    """The kernel family of a quant's main tensor type: "iq" (importance grids), "k" (K super-blocks),
    "legacy" (Q4_0, Q5_0, Q8_0 blocks) or "float"."""
    q = quant.upper()
    if q.startswith("IQ"):
        return "iq"
    if re.match(r"^Q\d_K", q):
        return "k"
    if re.match(r"^Q\d_\d$", q):
        return "legacy"
    if q in ("F16", "BF16", "F32"):
        return "float"
    return "other"


def quant_type(quant: str) -> str:
    """The ggml type of a quant's bulk tensors, e.g. "q4_k" for Q4_K_M, "iq3_s" for IQ3_M."""
    q = quant.upper()
    if q in _IQ_TYPES:
        return _IQ_TYPES[q]
    m = re.match(r"^(Q\d_K)", q)
    if m:
        return m[1].lower()
    return q.lower()


# --- measured points ----------------------------------------------------------------------------------------

def ok_records(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.status == "ok"] if len(df) else df


def ggml_type_family(type_name: str) -> str | None:
    """The kernel family of a ggml tensor type ("Q6_K" -> "k", "IQ4_NL" -> "iq", "Q8_0" -> "legacy"); None for
    float types (norms, rope factors: too few weights to cost anything)."""
    t = type_name.upper()
    if t.startswith("IQ"):
        return "iq"
    if t.endswith("_K"):
        return "k"
    if re.match(r"^Q\d_\d$", t):
        return "legacy"
    return None


def mix_columns(types: dict[str, Any] | None) -> dict[str, float]:
    """Weights per quantized ggml type and per family, as point columns ("mix:q6_k", "mix_family:k"), from a
    {type name: n_elements or inspect's {"n_elements": ...}} mapping of one file."""
    out: dict[str, float] = {}
    for name, v in (types or {}).items():
        fam = ggml_type_family(name)
        if fam is None:
            continue
        n = float(v["n_elements"] if isinstance(v, dict) else v)
        out[f"mix:{name.lower()}"] = out.get(f"mix:{name.lower()}", 0.0) + n
        out[f"mix_family:{fam}"] = out.get(f"mix_family:{fam}", 0.0) + n
    return out


def tensor_types_from_records(df: pd.DataFrame) -> dict[str, dict[str, int]] | None:
    """{quant: {ggml type: weights}} from the records' `tensor_types` (read from each file's header when it was
    measured), or None where an ok quant's records carry none (records older than that field): the mix and
    probe models then sit out. No file is opened."""
    ok = ok_records(df)
    if not len(ok) or "tensor_types" not in ok.columns:
        return None
    out: dict[str, dict[str, int]] = {}
    for quant, d in ok.groupby("quant", sort=False):
        tt = next((x for x in d.tensor_types if isinstance(x, dict) and x), None)
        if tt is None:
            return None
        out[str(quant)] = {t: int(v["n_weights"] if isinstance(v, dict) else v) for t, v in tt.items()}
    return out or None


def kernel_seconds(types: dict[str, Any] | None, probe_costs: dict[str, dict] | None) -> float:
    """Seconds per token the kernel probes predict for a file of these tensor types (NaN where a quantized
    type has no probe, or no types or probes are known)."""
    if not types or not probe_costs:
        return math.nan
    total = 0.0
    for name, v in types.items():
        if name.upper() in UNPROBED:
            continue  # F32 norms
        cost = (probe_costs.get(name.upper()) or {}).get("s_per_weight")
        if cost is None:
            return math.nan
        total += float(v["n_elements"] if isinstance(v, dict) else v) * cost
    return total


def tg_points(df: pd.DataFrame, arch=ARCH, tensor_types: dict[str, dict] | None = None,
              probe_costs: dict[str, dict] | None = None) -> pd.DataFrame:
    """One row per (quant, depth) of tg records: median tok/s, its range, and the bytes read per token.
    `tensor_types` ({quant: {ggml type: n_elements}}, from the GGUF files) adds the weights per type and family
    (columns "mix:*", "mix_family:*"; 0 where a quant has none of a type) for the mix models; with
    `probe_costs` ({ggml type: {"s_per_weight": ...}}, :func:`harness.analysis.kernels.costs`) also the probes' kernel
    time per token (column "kernel_s") for the probe models."""
    ok = ok_records(df)
    ok = ok[ok.test == "tg"] if len(ok) else ok
    rows = []
    kvt = kv_bytes_per_token(arch)
    for (quant, depth), d in ok.groupby(["quant", "n_depth"], sort=False):
        tok = d.tokens_per_s.astype(float)
        size = d.model_size_bytes.dropna()
        if size.empty:
            continue
        n_gen = int(d.n_gen.iloc[0] or 1)
        kv_read = kvt * (int(depth) + (n_gen - 1) / 2)  # cached tokens, averaged over the generated ones
        params = d.model_n_params.dropna()
        rows.append({
            "quant": quant, "n_depth": int(depth), "n_gen": n_gen, "n": len(tok),
            "tok_s": float(tok.median()), "tok_s_min": float(tok.min()), "tok_s_max": float(tok.max()),
            "t_s": 1.0 / float(tok.median()),
            "model_size_bytes": int(size.iloc[0]),
            "n_params": int(params.iloc[0]) if len(params) else arch.n_params(),
            "kv_read_bytes": kv_read, "bytes_per_token": int(size.iloc[0]) + kv_read,
            "family": quant_family(quant), "type": quant_type(quant),
            **(mix_columns(tensor_types.get(quant)) if tensor_types else {}),
            "kernel_s": kernel_seconds((tensor_types or {}).get(quant), probe_costs),
        })
    out = pd.DataFrame(rows)
    if len(out) and out.kernel_s.isna().any():  # a quant with an unprobed type: no probe model for this run
        out = out.drop(columns=["kernel_s"])
    mix = [c for c in out.columns if c.startswith("mix")]
    if mix:
        if out[mix].isna().all(axis=1).any():  # a quant without its file: no mix model for this run
            out = out.drop(columns=mix)
        else:
            out[mix] = out[mix].fillna(0.0)
    return out


def device_bytes(bufs: Any, total: Any, device_side: bool) -> float:
    """Bytes in llama.cpp's buffers; on a GPU only the device's own (not CPU_Mapped or pinned host memory)."""
    if isinstance(bufs, dict) and bufs:
        if device_side:
            return float(sum(v for k, v in bufs.items() if not llamalog.is_host_buffer(k)))
        return float(sum(bufs.values()))
    return float(total) if total is not None and not pd.isna(total) else math.nan


def weights_needed(bufs: Any, total: Any, device_side: bool) -> float:
    """The weights' memory with llama.cpp's CPU repacking counted once. With mmap, the file's pages of a
    repacked tensor are read once into the repacked (anonymous) buffer and then stay resident only as clean,
    reclaimable page cache: CPU_Mapped + CPU_REPACK counts those weights twice. Without mmap llama.cpp never
    keeps the source copy, and the buffers already add up to the model's size."""
    b = device_bytes(bufs, total, device_side)
    if not device_side and isinstance(bufs, dict):
        repack = sum(v for k, v in bufs.items() if "REPACK" in k.upper())
        mapped = sum(v for k, v in bufs.items() if "MAPPED" in k.upper())
        b -= min(repack, mapped)
    return b


def memory_points(df: pd.DataFrame, peak_source: str = "rss") -> pd.DataFrame:
    """One row per (quant, depth): llama.cpp's buffers (weights, KV, compute, output) and the measured peak.

    peak_source "rss": the child's resident-set high-water mark, every buffer counted. "gpu": NVML, only the
    device's buffers counted; the peak is the process's own usage where the driver reports it, else the
    device's used memory above what it was before the model loaded."""
    ok = ok_records(df)
    rows = []
    gpu = peak_source == "gpu"
    for (quant, depth), d in ok.groupby(["quant", "n_depth"], sort=False):
        def most(col: str, bcol: str, d: pd.DataFrame = d) -> float:
            vals = [device_bytes(b, t, gpu) for b, t in zip(d[bcol], d[col])]
            vals = [v for v in vals if not math.isnan(v)]
            return max(vals) if vals else math.nan

        w = most("weights_bytes", "model_buffers")
        wn = [weights_needed(b, t, gpu) for b, t in zip(d.model_buffers, d.weights_bytes)]
        wn = [v for v in wn if not math.isnan(v)]
        w_needed = max(wn) if wn else math.nan
        kv, comp, out = most("kv_bytes", "kv_buffers"), most("compute_bytes", "compute_buffers"), \
            most("output_bytes", "output_buffers")
        if gpu:
            proc = d.gpu_process_bytes.dropna()
            if len(proc):
                peak = float(proc.max())
            else:
                used, before = d.gpu_used_peak_bytes.dropna(), d.gpu_used_before_load_bytes.dropna()
                peak = float(used.max() - before.min()) if len(used) and len(before) else math.nan
        else:
            rss = d.rss_peak_bytes.dropna()
            peak = float(rss.max()) if len(rss) else math.nan
        n_ctx = d.n_ctx.dropna()
        anon = d.rss_anon_bytes.dropna() if "rss_anon_bytes" in d else pd.Series(dtype=float)
        filed = d.rss_file_bytes.dropna() if "rss_file_bytes" in d else pd.Series(dtype=float)
        # What the run needs: on the GPU the device's own peak; on the CPU llama.cpp's allocations with the
        # repacked weights counted once (the RSS peak also holds reclaimable file pages, and misses buffer pages
        # never touched: it is shown beside, split into anonymous and file-backed).
        needed = peak if gpu else w_needed + kv + comp + out
        rows.append({
            "quant": quant, "n_depth": int(depth), "n_ctx": int(n_ctx.max()) if len(n_ctx) else None,
            "weights_bytes": w, "weights_needed_bytes": w_needed, "kv_bytes": kv, "compute_bytes": comp,
            "output_bytes": out, "peak_bytes": peak, "needed_bytes": needed,
            "rss_anon_bytes": float(anon.max()) if len(anon) else math.nan,
            "rss_file_bytes": float(filed.max()) if len(filed) else math.nan,
            "family": quant_family(quant), "type": quant_type(quant),
        })
    return pd.DataFrame(rows)


CONTEXT_COLUMNS = (2048, 8192, 32768, 131072)  # the page's "+ Context" column, at these sizes


def context_points(mem: pd.DataFrame | None) -> pd.DataFrame:
    """The memory test (contexts.jsonl records, test "mem") as one row per context made: quant, n_ctx, K/V types,
    flash attention (as requested and as llama.cpp resolved it), llama.cpp's KV / compute / output buffers, and
    the memory in use (RSS, its anonymous part; NVML's device total). Error cells are left out."""
    cols = ["quant", "n_ctx", "type_k", "type_v", "flash_attn", "fa", "kv_bytes", "compute_bytes", "output_bytes",
            "device_kv_bytes", "device_compute_bytes", "rss_bytes", "rss_anon_bytes", "gpu_used_bytes",
            "gpu_used_before_load_bytes"]
    if mem is None or not len(mem):
        return pd.DataFrame(columns=cols)
    ok = mem[(mem.status == "ok") & (mem.test == "mem")]
    rows = []
    for r in ok.itertuples():
        extra = r.extra if isinstance(r.extra, dict) else {}
        rows.append({
            "quant": r.quant, "n_ctx": int(r.n_ctx), "type_k": r.cache_type_k, "type_v": r.cache_type_v,
            "flash_attn": r.flash_attn, "fa": extra.get("flash_attn_resolved"),
            "kv_bytes": device_bytes(r.kv_buffers, r.kv_bytes, False),
            "compute_bytes": device_bytes(r.compute_buffers, r.compute_bytes, False),
            "output_bytes": device_bytes(r.output_buffers, r.output_bytes, False),
            "device_kv_bytes": device_bytes(r.kv_buffers, r.kv_bytes, True),
            "device_compute_bytes": device_bytes(r.compute_buffers, r.compute_bytes, True),
            "rss_bytes": r.rss_bytes, "rss_anon_bytes": getattr(r, "rss_anon_bytes", None),
            "gpu_used_bytes": r.gpu_used_bytes, "gpu_used_before_load_bytes": r.gpu_used_before_load_bytes,
        })
    return pd.DataFrame(rows, columns=cols)


def context_buffers(ctxp: pd.DataFrame, quant: str, n_ctx: int, kv: tuple[str, str] = ("f16", "f16"),
                    device_side: bool = False) -> tuple[float, str | None]:
    """(KV + compute + output bytes of a context of `n_ctx` with K/V types `kv`, the quant it was measured on):
    the quant's own memory test where it ran, else another quant's (these buffers do not depend on the weights'
    type); flash attention as llama.cpp resolved it when asked on, else auto. NaN where nothing matches."""
    if ctxp is None or not len(ctxp):
        return math.nan, None
    d = ctxp[(ctxp.n_ctx == n_ctx) & (ctxp.type_k == kv[0]) & (ctxp.type_v == kv[1])]
    if not len(d):
        return math.nan, None
    d = d.assign(pref=[(q != quant, fa != "on") for q, fa in zip(d.quant, d.flash_attn)]).sort_values("pref")
    r = d.iloc[0]
    if device_side:
        b = r.device_kv_bytes + r.device_compute_bytes
    else:
        b = r.kv_bytes + r.compute_bytes + r.output_bytes
    return float(b), str(r.quant)


def arch_of(df: pd.DataFrame):
    """The synthetic architecture the records measured (by their weights_ref, else by Llama 3.2 1B's parameter
    count), or None for a model whose shape the records do not tell."""
    ok = ok_records(df)
    if not len(ok):
        return None
    ref = str(ok.weights_ref.dropna().iloc[0]) if ok.weights_ref.notna().any() else ""
    for name, arch in ARCHS.items():
        if ref.startswith(name + " "):
            return arch
    n = ok.model_n_params.dropna()
    return ARCH if len(n) and int(n.iloc[0]) == ARCH.n_params() else None


def is_page_model(df: pd.DataFrame) -> bool:
    """Whether the records measured Llama 3.2 1B (the page's model): llama.cpp calls it "llama 1B ..." and counts
    its parameters within 0.5% of the 1B's. Only then do the page's figures and verdicts apply."""
    ok = ok_records(df)
    if not len(ok):
        return False
    n = ok.model_n_params.dropna()
    desc = ok.model_desc.dropna().astype(str)
    return bool(len(n) and (abs(n.astype(float) / ARCH.n_params() - 1) < 0.005).all()
                and desc.str.startswith("llama 1B").all())  # (records without a description: by the count)


def shape_of(df: pd.DataFrame) -> dict | None:
    """The model's shape as the measured files' headers gave it (records' extra.shape), where all agree."""
    ok = ok_records(df)
    shapes = {json_key(x["shape"]) for x in ok.extra if isinstance(x, dict) and isinstance(x.get("shape"), dict)} \
        if len(ok) else set()
    return dict(shapes.pop()) if len(shapes) == 1 else None


def json_key(d: dict) -> tuple:
    return tuple(sorted(d.items()))

