"""Predictions from a calibration document (calibration.json): tg speed of a quant at a depth, on the
calibrated device or another of known bandwidth, and peak memory at a context size."""

from __future__ import annotations

import logging
import math

import pandas as pd

from harness.analysis.calibration import CalibrationError
from harness.analysis.fit import _column, predict
from harness.analysis.points import (
    ARCH,
    kernel_seconds,
    kv_bytes_per_token,
    kv_cells,
    mix_columns,
    quant_family,
    quant_type,
)
from harness.catalog import page

log = logging.getLogger(__name__)


# --- predictions from a calibration ------------------------------------------------------------------------------

def _one_point(cal: dict, quant: str, n_depth: int, n_gen: int = 1) -> pd.DataFrame:
    info = (cal.get("quants") or {}).get(quant) or {}
    size = info.get("model_size_bytes")
    n_params = info.get("model_n_params") or (cal.get("model") or {}).get("n_params") or ARCH.n_params()
    size_note = None
    if size is None:
        if quant not in page.BY_QUANT:
            raise CalibrationError(f"{quant} was not measured in this calibration and the page gives no size for it")
        size = page.page_file_bytes(quant, printed=False)
        size_note = f"{quant} was not measured in this calibration: its size is the page's ({size / 1e9:.2f} GB)"
    kvt = (cal.get("buffers") or {}).get("kv_bytes_per_token") or kv_bytes_per_token()
    kv_read = kvt * (n_depth + (n_gen - 1) / 2)
    pts = pd.DataFrame([{"quant": quant, "n_depth": n_depth, "bytes_per_token": size + kv_read,
                         "kv_read_bytes": kv_read, "n_params": n_params, "family": quant_family(quant),
                         "type": quant_type(quant),
                         "model_size_bytes": size, **mix_columns(info.get("tensor_types")),
                         "kernel_s": kernel_seconds(info.get("tensor_types"), cal.get("probes"))}])
    pts.attrs["size_note"] = size_note
    return pts


def predict_tg_tok_s(cal: dict, quant: str, n_depth: int = 0, bandwidth_gb_s: float | None = None
                     ) -> tuple[float, float, list[str]]:
    """Calibrated tg tok/s for a quant at a depth: (tok/s, relative uncertainty (LOQO RMS), notes).
    With a `bandwidth_gb_s` other than the calibration's, the time the model spends reading bytes is scaled by
    the bandwidth ratio; its overhead and compute terms are not (they are the calibrated device's)."""
    tg = cal.get("tg")
    if not tg:
        raise CalibrationError("this calibration has no tg fit")
    pts = _one_point(cal, quant, n_depth)
    notes = [pts.attrs["size_note"]] if pts.attrs.get("size_note") else []
    if tg["params"].get("kernel_factor") and math.isnan(float(pts.kernel_s.iloc[0])):
        fb = tg.get("fallback")
        if not fb:
            raise CalibrationError(f"{quant}: this calibration's tg model needs kernel probes of its tensor types, "
                                   "and it has none for them")
        notes.append(f"no kernel probes for {quant}'s tensor types in this calibration: estimated with the best "
                     f"model without probes ({fb['chosen']})")
        tg = {**tg, **fb, "nested": None}  # the fallback has its own (LOQO) error
    if any(k.startswith("per_weight:mix") and v for k, v in tg["params"].items()) and \
            not any(c.startswith("mix") for c in pts.columns):
        notes.append(f"the tensor types of {quant} are unknown to this calibration: its compute term is left out "
                     "(an overestimate of its speed)")
    t = float(predict(pts, tg["params"], "t_s")[0])
    cal_bw = (cal.get("device") or {}).get("bandwidth_gb_s")
    if n_depth and not any(k.startswith("s_per_byte") and v for k, v in tg["params"].items()):
        # The chosen model has no bytes term, so nothing in it grows with the context: add the KV cache's read
        # at the device's bandwidth (a lower bound on its cost, attention's compute left out).
        kv_read = float(pts.kv_read_bytes.iloc[0])
        if cal_bw:
            t += kv_read / (cal_bw * 1e9)
            notes.append(f"the model chosen ({tg['chosen']}) has no bytes term: the KV cache read at depth "
                         f"{n_depth:,} ({kv_read / 1e9:.2f} GB per token) is added at {cal_bw:,.1f} GB/s, not "
                         "calibrated (a lower bound on its cost)")
        else:
            notes.append(f"the model chosen ({tg['chosen']}) has no term for the context: depth {n_depth:,} is "
                         "not accounted for")
    depths = [p.get("n_depth") or 0 for p in tg.get("points") or []]
    if depths and n_depth > max(depths):
        notes.append(f"depth {n_depth:,} lies beyond the measured ones (up to {max(depths):,}): extrapolated, not "
                     "calibrated. Attention's own cost, which grows with the context and can dominate on a CPU, "
                     "is in no term; measure that depth (bench.depths) to calibrate it")
    if bandwidth_gb_s and cal_bw and abs(bandwidth_gb_s / cal_bw - 1) > 1e-9:
        # only the time spent reading bytes scales with the bandwidth; the overhead and the kernels' compute
        # terms are the calibrated device's and stay as they are
        ratio = bandwidth_gb_s / cal_bw
        t_bytes = sum(v * float(_column(pts, k)[0]) for k, v in tg["params"].items()
                      if v and k.startswith("s_per_byte"))
        if n_depth and not any(k.startswith("s_per_byte") and v for k, v in tg["params"].items()):
            t_bytes += float(pts.kv_read_bytes.iloc[0]) / (cal_bw * 1e9)  # the KV read added above
        notes.append(f"carried from {cal['device']['name']} ({cal_bw:,.1f} GB/s): its bytes term "
                     f"({t_bytes * 1e3:,.2f} ms of {t * 1e3:,.2f} ms per token) scaled "
                     f"by the bandwidth ratio {ratio:.3g}, the rest ({tg['chosen']}'s overhead and compute) kept: an "
                     "extrapolation across devices, beyond the stated uncertainty"
                     + ("; nothing in this model reads bytes, so nothing scales" if not t_bytes else ""))
        t = t - t_bytes + t_bytes / ratio
    elif bandwidth_gb_s and not cal_bw:
        notes.append("the calibration's device has no known bandwidth: not scaled")
    rate = 1 / t
    rel = (tg.get("nested") or {}).get("rms_ape") or (tg.get("loqo") or {}).get("rms_ape")
    return rate, rel if rel is not None else math.nan, notes


def predict_memory_bytes(cal: dict, quant: str, n_ctx: int, kv_types: tuple[str, str] = ("f16", "f16"),
                         what: str = "peak") -> tuple[float, float, list[str]]:
    """Calibrated peak memory for a quant at a context size: (bytes, relative uncertainty, notes); with `what`
    "needed", what the quant needs instead (the report's 'memory needed': llama.cpp's buffers with the repacked
    weights counted once; no fitted term, so no uncertainty of its own). With the
    calibration's memory test (its "contexts" model: KV per cell and the compute buffer's measured growth), the
    KV and compute terms come from it; otherwise from the pp/tg tests' buffers."""
    mem = cal.get("memory")
    if not mem:
        raise CalibrationError("this calibration has no memory fit")
    info = (cal.get("quants") or {}).get(quant) or {}
    notes = []
    weights = info.get("weights_bytes") or info.get("model_size_bytes")
    if weights is None:
        if quant not in page.BY_QUANT:
            raise CalibrationError(f"{quant} was not measured in this calibration and the page gives no size for it")
        weights = page.page_file_bytes(quant, printed=False)
        notes.append(f"{quant} was not measured in this calibration: its weights are the page's file size")
    buf = cal.get("buffers") or {}
    top = buf.get("max_measured_ctx")
    if top and n_ctx > top and not buf.get("compute_bytes_per_ctx_token"):
        notes.append(f"the compute buffer was measured up to a context of {top:,} tokens only and is held at that "
                     f"size: at {n_ctx:,} it can be larger (attention scratch grows with the context); measure "
                     "that depth (bench.depths) to calibrate it")
    kv = (buf.get("kv_bytes_per_token") or kv_bytes_per_token()) * n_ctx
    comp = (buf.get("compute_bytes_intercept") or 0.0) + (buf.get("compute_bytes_per_ctx_token") or 0.0) * n_ctx
    ctx_models = [m for m in (cal.get("contexts") or {}).values()
                  if (m["type_k"], m["type_v"]) == tuple(kv_types)]
    if ctx_models:
        m = sorted(ctx_models, key=lambda m: m["flash_attn"] != "enabled")[0]
        cells = kv_cells(n_ctx)
        kv = m["kv_bytes_per_cell"] * cells
        comp = m["compute_bytes_intercept"] + m["compute_bytes_per_ctx_token"] * n_ctx
        notes = [x for x in notes if "compute buffer was measured" not in x]
        top = max(m["contexts"])
        notes.append(f"KV and compute buffers from the memory test ({kv_types[0]}/{kv_types[1]} KV, flash attention "
                     f"{m['flash_attn']}, contexts {min(m['contexts']):,}-{top:,}"
                     + (f"; {n_ctx:,} is beyond them: extrapolated" if n_ctx > top else "") + ")")
    elif tuple(kv_types) != ("f16", "f16"):
        raise CalibrationError(f"this calibration has no memory test of {kv_types[0]}/{kv_types[1]} KV "
                               "(bench.contexts with cache_type_k / cache_type_v)")
    output = buf.get("output_bytes") or 0.0
    if what == "needed":  # what the quant needs: llama.cpp's allocations, repacked weights counted once
        w_needed = info.get("weights_needed_bytes") or info.get("model_size_bytes") or weights
        notes.append("memory needed = weights once (llama.cpp's tensors; CPU repacking replaces their file pages, "
                     "which stay only as reclaimable page cache) + KV + compute + output buffers: not the RSS peak")
        return float(w_needed + kv + comp + output), math.nan, notes
    pts = pd.DataFrame([{"quant": quant, "weights_bytes": weights, "kv_bytes": kv, "compute_bytes": comp,
                         "output_bytes": output, "peak_bytes": 1.0}])
    value = float(predict(pts, mem["params"], "peak_bytes")[0])
    rel = (mem.get("nested") or {}).get("rms_ape") or (mem.get("loqo") or {}).get("rms_ape")
    return value, rel if rel is not None else math.nan, notes
