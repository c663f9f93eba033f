"""Calibration: fit a physical model of llama.cpp's time per generated token and of its peak memory to one
run's records, pick among candidate models by leave-one-quant-out (LOQO) error, and write calibration.json.

Time per generated token (tg)::

    t = bytes_read / (bandwidth x efficiency) + overhead + sum_f cost_f x n_weights x [quant in family f]

where bytes_read is every weight tensor (llama.cpp's model size; Llama 3.2 1B ties its embeddings, so the
output matmul reads the whole embedding matrix) plus the f16 KV cache at the test's depth. On a GPU the first
term dominates; on a small CPU the dequantize-and-dot kernels do, and their cost per weight depends on the
quant family (IQ grids, K super-blocks, legacy blocks), which no bandwidth term can express. Candidates range
from bandwidth-only to per-family and per-type compute terms; LOQO error picks the simplest that predicts
held-out quants about as well as the best.

A compute term fitted to the quants cannot know a kernel only the held-out quant uses (IQ3_M is the page's
only IQ3_S file). Kernel probes (:mod:`harness.sources.probes`) measure every tensor type's cost per weight on its own,
so the "probe" candidates use

    kernel_s = sum over the file's tensor types of weights in that type x the type's probe seconds per weight

with one fitted factor (and an overhead that may be negative: each probe cost carries a share of the probe's
own per-token overhead).

Peak memory::

    peak = weights + KV + compute + output buffers (llama.cpp's own accounting) + runtime overhead

with the overhead (and, in larger candidates, factors on the terms) fitted; the peak is the process RSS on
the CPU and NVML's reading on an NVIDIA GPU.

Everything is a pure function of the records DataFrame (:func:`harness.analysis.summary.records_frame`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.analysis.fit import (
    MEMORY_CANDIDATES,
    N_BOOTSTRAP,
    TG_CANDIDATES,
    Candidate,
    bootstrap,
    error_stats,
    feature_names,
    nested_errors,
    pick,
    predict,
    select,
    solve,
)
from harness.analysis.points import (
    ARCH,
    device_bytes,
    is_page_model,
    kv_bytes_per_token,
    kv_cells,
    memory_points,
    ok_records,
    quant_family,
    quant_type,
    tg_points,
)
from harness.catalog import devices, page
from harness.sources.probes import UNPROBED

log = logging.getLogger(__name__)

CALIBRATION_VERSION = 1


# --- device of a run ------------------------------------------------------------------------------------------

def run_device(df: pd.DataFrame, env: dict | None) -> dict[str, Any]:
    """Which device the records ran on and its bandwidth: a GPU's from the catalog (by NVML's name), a CPU's
    as measured into env.json. Keys: name, kind ("cpu"/"gpu"), vendor, bandwidth_gb_s (None if unknown),
    bandwidth_source, memory_bytes, peak_source ("rss"/"gpu")."""
    env = env or {}
    ok = ok_records(df)
    dev = None
    if len(ok) and "device" in ok and ok.device.notna().any():
        dev = str(ok.device.dropna().mode().iloc[0])
    gpu_name = None
    if len(ok) and "gpu_name" in ok and ok.gpu_name.notna().any():
        gpu_name = str(ok.gpu_name.dropna().iloc[0])
    gpu_name = gpu_name or (env.get("gpu") or {}).get("name")
    if dev == "rpc":
        # llama.cpp's RPC device: a server's device over the network (loopback in the tests: this host's CPU).
        # Offload, buffers and memory are a device's; its speed is the server's and the network's, not a GPU's, so
        # it has no bandwidth here (no verdicts against the page's GPU rule) and never enters a GPU calibration.
        eps = sorted({e for x in ok.extra if isinstance(x, dict) for e in x.get("rpc_endpoints") or ()})
        return {"name": f"llama.cpp RPC device ({', '.join(eps) or 'endpoint not recorded'})",
                "reported_name": None, "kind": "rpc", "backend": "rpc", "vendor": "rpc", "bandwidth_gb_s": None,
                "bandwidth_source": "none: an RPC device's speed is its server's and the network's, not a GPU's",
                "memory_bytes": None, "peak_source": "device"}
    if dev and dev != "cpu":
        # CUDA: NVML's name; Metal: the chip (the catalog names Apple's GPUs by it); others (ROCm, Vulkan, SYCL): the
        # description llama.cpp's device gives, recorded with the weights
        prefix = {"rocm": "ROCm", "vulkan": "Vulkan", "sycl": "SYCL"}.get(dev)
        described = next((g.get("description") for x in ok.extra if isinstance(x, dict)
                          for g in x.get("gpu_devices") or () if prefix and str(g.get("name", "")).startswith(prefix)),
                         None)
        name = (gpu_name if dev == "cuda" else described if prefix else
                (env.get("cpu") or {}).get("model")) or dev
        entry = env.get("catalog") if dev == "cuda" and env.get("catalog") else None
        d = devices.find(name)
        if entry is None and d is not None:
            entry = d.as_dict()
        return {
            "name": (entry or {}).get("name") or name or dev, "reported_name": name, "kind": "gpu", "backend": dev,
            "vendor": (entry or {}).get("vendor") or ("nvidia" if dev == "cuda" else None),
            "bandwidth_gb_s": (entry or {}).get("bandwidth_gb_s"),
            "bandwidth_source": f"catalog: {entry['source']}" if entry else "unknown (not in the device catalog)",
            "memory_bytes": (entry or {}).get("memory_bytes") or (env.get("gpu") or {}).get("memory_total_bytes"),
            "peak_source": "gpu" if dev == "cuda" else "rss",
        }
    bw = env.get("memory_bandwidth") or {}
    return {
        "name": (env.get("cpu") or {}).get("model") or "CPU", "reported_name": (env.get("cpu") or {}).get("model"),
        "kind": "cpu", "backend": "cpu", "vendor": "cpu",
        "bandwidth_gb_s": bw.get("measured_gb_s"),
        "bandwidth_source": f"measured: {bw['method']}" if bw.get("measured_gb_s") else
        "unknown (env.json has no memory_bandwidth)",
        "memory_bytes": env.get("ram_bytes"), "peak_source": "rss",
        # harness.measure.fingerprint's: the calibration is another machine's own only where this matches it
        "fingerprint": (env.get("cpu") or {}).get("fingerprint"),
    }


# --- calibration ------------------------------------------------------------------------------------------------

def _nan_to_none(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) or math.isinf(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def page_tg_tok_s(points: pd.DataFrame, device: dict, page_model: bool = True) -> np.ndarray:
    """The page's tok/s for each point (NaN where the page has no row, the bandwidth is unknown, or the model
    is not the page's Llama 3.2 1B)."""
    bw = device.get("bandwidth_gb_s")
    out = []
    for q in points.quant:
        ok = page_model and bw and q in page.BY_QUANT
        out.append(page.page_tok_s(bw, device.get("vendor"), q) if ok else math.nan)
    return np.array(out, float)


def _fit_chosen(points: pd.DataFrame, candidates: tuple[Candidate, ...], target: str):
    """Pick a candidate by LOQO error, fit it on all points: (candidate, selection table, feature names,
    parameters, their bootstrap spread, fitted values)."""
    chosen, table = select(points, candidates, target)
    cand = {c.name: c for c in candidates}[chosen]
    names = feature_names(points, cand.features)
    params = solve(points, names, target)
    return cand, table, names, params, bootstrap(points, names, target), predict(points, params, target)


N_SELECTION_RESAMPLES = 30  # resamples of the repetitions for how stable the model choice is


def selection_stability(df: pd.DataFrame | None, make_points, candidates, target: str,
                        n: int = N_SELECTION_RESAMPLES, seed: int = 0) -> dict[str, float] | None:
    """How often each model is chosen when each cell's repetitions are resampled (with replacement) and the
    points, and the choice, made again: {model: fraction}. None without records to resample."""
    if df is None or not len(df):
        return None
    ok = ok_records(df)
    if not len(ok):
        return None
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    groups = [d for _, d in ok.groupby(["quant", "test", "n_depth"], sort=False)]
    for _ in range(n):
        sample = pd.concat([d.iloc[rng.integers(0, len(d), len(d))] for d in groups], ignore_index=True)
        pts = make_points(sample)
        if pts.quant.nunique() < 2:
            continue
        name, _ = select(pts, candidates, target)
        counts[name] = counts.get(name, 0) + 1
    total = sum(counts.values())
    return {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])} if total else None


def fit_tg(points: pd.DataFrame, device: dict, df: pd.DataFrame | None = None, make_points=None) -> dict[str, Any]:
    """Choose and fit the tg model; its parameters, their bootstrap spread, errors (the nested held-out error
    of choice and fit together, and the chosen model's own LOQO error), how stable the choice is under
    resampling of the repetitions (with `df` and `make_points`), and per-point values."""
    cand, table, names, params, std, fitted_t = _fit_chosen(points, TG_CANDIDATES, "t_s")
    nested = nested_errors(points, TG_CANDIDATES, "t_s")
    chosen = cand.name
    page_rate = page_tg_tok_s(points, device, device.get("page_model", True))
    bw = device.get("bandwidth_gb_s")
    a = params.get("s_per_byte", 0.0)
    eff = 1 / (a * bw * 1e9) if a > 0 and bw else None
    eff_std = eff * std["s_per_byte"] / a if eff and not math.isnan(std.get("s_per_byte", math.nan)) else None
    n_params = int(points.n_params.iloc[0])
    loqo_t = table[chosen]["loqo_pred"]
    per_point = pd.DataFrame({
        "quant": points.quant, "n_depth": points.n_depth, "bytes_per_token": points.bytes_per_token,
        "measured_tok_s": points.tok_s, "fitted_tok_s": 1 / fitted_t, "loqo_tok_s": 1 / loqo_t,
        "page_tok_s": page_rate,
    })
    page_ape = np.abs(page_rate / points.tok_s.to_numpy(float) - 1)
    return {
        "chosen": chosen, "formula": cand.description,
        "params": params, "param_std": std, "n_bootstrap": N_BOOTSTRAP,
        "efficiency": eff, "efficiency_std": eff_std,
        "efficiency_by_family": {k.rsplit(":", 1)[1]: 1 / (v * bw * 1e9) for k, v in params.items()
                                 if k.startswith("s_per_byte:family:") and v > 0 and bw},
        "overhead_s_per_token": params.get("overhead", 0.0),
        "kernel_factor": params.get("kernel_factor"),
        "family_s_per_token": {k.rsplit(":", 1)[1]: v * n_params for k, v in params.items()
                               if k.startswith("per_weight:family:")},
        "compute_ns_per_weight": {k.removeprefix("per_weight:"): v * 1e9 for k, v in params.items()
                                  if k.startswith("per_weight:")},
        "candidates": {n: {k: v for k, v in t.items() if k != "loqo_pred"} for n, t in table.items()},
        "loqo": {k.removeprefix("loqo_"): v for k, v in table[chosen].items() if k.startswith("loqo_")
                 and k != "loqo_pred"},
        "nested": nested,
        "selection_stability": selection_stability(df, make_points, TG_CANDIDATES, "t_s")
        if make_points is not None else None,
        "fit": {k.removeprefix("fit_"): v for k, v in table[chosen].items() if k.startswith("fit_")},
        "page": error_stats(page_ape),
        "points": per_point.to_dict(orient="records"),
        "fallback": _fallback(points, table) if "kernel" in cand.features else None,
    }


def _fallback(points: pd.DataFrame, table: dict[str, dict]) -> dict[str, Any]:
    """The best model without the probes, for estimates of a quant whose tensor types have no probe."""
    rest = tuple(c for c in TG_CANDIDATES if "kernel" not in c.features and c.name in table)
    chosen = pick(rest, table)  # scored already, with the probe candidates
    cand = {c.name: c for c in rest}[chosen]
    return {"chosen": chosen, "formula": cand.description,
            "params": solve(points, feature_names(points, cand.features), "t_s"),
            "loqo": {k.removeprefix("loqo_"): v for k, v in table[chosen].items() if k.startswith("loqo_")
                     and k != "loqo_pred"}}


def fit_memory(points: pd.DataFrame) -> dict[str, Any] | None:
    """Choose and fit the memory model, or None where the peak or the buffers were not measured."""
    cols = ["weights_bytes", "kv_bytes", "compute_bytes", "output_bytes", "peak_bytes"]
    pts = points.dropna(subset=cols) if len(points) else points
    if pts.empty:
        return None
    pts = pts.reset_index(drop=True)
    cand, table, names, params, std, fitted = _fit_chosen(pts, MEMORY_CANDIDATES, "peak_bytes")
    chosen = cand.name
    nested = nested_errors(pts, MEMORY_CANDIDATES, "peak_bytes")
    page_vram = np.array([page.page_vram_bytes(q) if q in page.BY_QUANT else math.nan for q in pts.quant])
    return {
        "chosen": chosen, "formula": cand.description, "params": params, "param_std": std,
        "overhead_bytes": params.get("overhead", 0.0),
        "nested": nested,
        "candidates": {n: {k: v for k, v in t.items() if k != "loqo_pred"} for n, t in table.items()},
        "loqo": {k.removeprefix("loqo_"): v for k, v in table[chosen].items() if k.startswith("loqo_")
                 and k != "loqo_pred"},
        "fit": {k.removeprefix("fit_"): v for k, v in table[chosen].items() if k.startswith("fit_")},
        "page": error_stats(np.abs(page_vram / pts.peak_bytes.to_numpy(float) - 1)),
        "points": pd.DataFrame({
            "quant": pts.quant, "n_depth": pts.n_depth, "measured_bytes": pts.peak_bytes,
            "fitted_bytes": fitted, "loqo_bytes": table[chosen]["loqo_pred"], "page_vram_bytes": page_vram,
        }).to_dict(orient="records"),
    }


def buffer_model(df: pd.DataFrame, peak_source: str = "rss") -> dict[str, Any]:
    """How llama.cpp's buffers grow with the context, for estimates at other context sizes.

    KV bytes per token: at the largest measured context, over the cells llama.cpp allocates for it (a multiple
    of 256: a tg64 test's cache holds 4x its tokens), else the f16 formula.

    Compute bytes = intercept + slope x n_ctx, the slope fitted only over contexts where the physical batch
    is the same (n_ctx >= n_ubatch): below that the buffer follows the batch, not the context, and a line
    through a pp256 and a tg64 test would put gigabytes of compute buffer at 8K. Without such contexts the
    slope is 0 from the largest context, and `max_measured_ctx` tells an estimate how far it extrapolates.
    Output bytes: the median."""
    ok = ok_records(df)
    gpu = peak_source == "gpu"
    rows = []
    for _, r in ok.iterrows():
        if r.n_ctx is None or pd.isna(r.n_ctx) or not r.n_ctx:
            continue
        ub = r.get("n_ubatch")
        ub = float(ub) if ub is not None and not pd.isna(ub) else 0.0
        rows.append((float(r.n_ctx), device_bytes(r.kv_buffers, r.kv_bytes, gpu),
                     device_bytes(r.compute_buffers, r.compute_bytes, gpu),
                     device_bytes(r.output_buffers, r.output_bytes, gpu), ub))
    a = np.array(rows, float) if rows else np.zeros((0, 5))
    kv = a[~np.isnan(a[:, 1])] if len(a) else a
    if len(kv):
        top = kv[kv[:, 0] == kv[:, 0].max()]
        cells = kv_cells(top[:, 0])  # what llama.cpp allocates for that context
        kv_per_tok = float(np.median(top[:, 1] / cells))
    else:
        kv_per_tok = float(kv_bytes_per_token())
    comp = a[~np.isnan(a[:, 2])] if len(a) else a
    full = comp[comp[:, 0] >= comp[:, 4]] if len(comp) else comp  # the physical batch no longer grows
    if len(full) and len(np.unique(full[:, 0])) > 1:
        slope, intercept = np.polyfit(full[:, 0], full[:, 2], 1)
    elif len(comp):
        top = comp[comp[:, 0] == comp[:, 0].max()]
        slope, intercept = 0.0, float(np.median(top[:, 2]))
    else:
        slope, intercept = 0.0, math.nan
    out = a[~np.isnan(a[:, 3])] if len(a) else a
    return {"kv_bytes_per_token": kv_per_tok, "kv_bytes_per_token_f16_formula": kv_bytes_per_token(),
            "compute_bytes_intercept": float(intercept), "compute_bytes_per_ctx_token": float(max(slope, 0.0)),
            "output_bytes": float(np.median(out[:, 3])) if len(out) else math.nan,
            "max_measured_ctx": int(a[:, 0].max()) if len(a) else None}


def context_model(ctxp: pd.DataFrame | None, device_side: bool = False) -> dict[str, Any]:
    """How llama.cpp's KV and compute buffers grow with the context, fitted on the memory test
    (:func:`harness.analysis.points.context_points`), per K/V type pair and resolved flash-attention setting:

        KV = bytes per cell x cells (the context rounded up to 256 cells)
        compute = intercept + slope x n_ctx

    each term with its leave-one-context-out error (fit on the other contexts, predict the one left out):
    median and worst absolute percentage error. Keys "f16/f16 fa=enabled"; {} without a memory test."""
    out: dict[str, Any] = {}
    if ctxp is None or not len(ctxp):
        return out
    kv_col, comp_col = ("device_kv_bytes", "device_compute_bytes") if device_side else ("kv_bytes", "compute_bytes")
    for (tk, tv, fa), d in ctxp.groupby(["type_k", "type_v", ctxp.fa.fillna("unknown")], sort=True):
        d = d.groupby("n_ctx", as_index=False)[[kv_col, comp_col]].median().sort_values("n_ctx")
        n = d.n_ctx.to_numpy(float)
        cells = kv_cells(n)
        kv, comp = d[kv_col].to_numpy(float), d[comp_col].to_numpy(float)
        if len(n) < 2 or np.isnan(kv).any() or np.isnan(comp).any():
            continue
        per_cell = float(np.median(kv / cells))
        slope, intercept = np.polyfit(n, comp, 1)
        kv_ape, comp_ape = [], []
        if len(n) >= 3:
            for i in range(len(n)):
                rest = np.arange(len(n)) != i
                kv_ape.append(abs(np.median(kv[rest] / cells[rest]) * cells[i] / kv[i] - 1))
                s_i, c_i = np.polyfit(n[rest], comp[rest], 1)
                comp_ape.append(abs((c_i + s_i * n[i]) / comp[i] - 1) if comp[i] else math.nan)
        out[f"{tk}/{tv} fa={fa}"] = {
            "type_k": tk, "type_v": tv, "flash_attn": fa, "contexts": [int(x) for x in n],
            "kv_bytes_per_cell": per_cell, "compute_bytes_intercept": float(intercept),
            "compute_bytes_per_ctx_token": float(slope),
            "held_out": {"kv": error_stats(np.array(kv_ape)) if kv_ape else None,
                         "compute": error_stats(np.array(comp_ape)) if comp_ape else None,
                         "method": "leave one context out"},
        }
    return out


def calibrate(df: pd.DataFrame, env: dict | None = None, run_id: str | None = None,
              results_dir: str | None = None, tensor_types: dict[str, dict] | None = None,
              probe_costs: dict[str, dict] | None = None, ctxp: pd.DataFrame | None = None) -> dict[str, Any]:
    """The calibration of one run: device, fitted tg and memory models with their errors, buffer growth,
    and per-quant sizes (so an estimate can be made for any of the measured quants at any context).
    `tensor_types` ({quant: {ggml type: n_elements}}, read from the GGUF files) enables the mix models, and
    with `probe_costs` (:func:`harness.analysis.kernels.costs` of the run's kernel probes) the probe models."""
    env = env or {}
    device = {**run_device(df, env), "page_model": is_page_model(df)}
    tg = tg_points(df, tensor_types=tensor_types, probe_costs=probe_costs)
    unavailable = None
    if probe_costs and "kernel_s" not in tg.columns:
        if not tensor_types:
            unavailable = "the quants' tensor types are unknown (their files are not on disk)"
        elif any(" (" in t for t in probe_costs):
            unavailable = ("the run's files have several layer shapes, each probed apart; the probe models need "
                           "one shape")
        else:
            missing = sorted({t for types in tensor_types.values() for t in (types or {})
                              if t.upper() not in UNPROBED and t.upper() not in probe_costs})
            unavailable = f"no probe measured for {', '.join(missing) or 'some tensor type'}"
    mem = memory_points(df, device["peak_source"])
    ok = ok_records(df)
    first = ok.iloc[0] if len(ok) else None
    quants_info: dict[str, dict] = {}
    for q, d in ok.groupby("quant", sort=False):
        m = mem[mem.quant == q]
        r = d.iloc[0]
        quants_info[q] = {
            "family": quant_family(q), "type": quant_type(q),
            "model_size_bytes": r.model_size_bytes, "model_n_params": r.model_n_params, "file_bytes": r.file_bytes,
            "weights_bytes": float(m.weights_bytes.iloc[0]) if len(m) else None,
            "weights_needed_bytes": float(m.weights_needed_bytes.iloc[0]) if len(m) else None,
            "tensor_types": {k: int(v["n_elements"] if isinstance(v, dict) else v)
                             for k, v in ((tensor_types or {}).get(q) or {}).items()} or None,
        }
    versions = ok.llama_cpp_version.dropna().unique() if len(ok) else []
    cal = {
        "calibration_version": CALIBRATION_VERSION,
        "what": "llama.cpp on this device, fitted to measured tg tok/s and peak memory (harness.analysis.calibration)",
        "run": {
            "run_id": run_id or (str(first.run_id) if first is not None else None),
            "results_dir": results_dir, "utc": env.get("utc"),
            "harness_commit": (env.get("harness") or {}).get("commit"),
            "weights": sorted(ok.weights.dropna().unique()) if len(ok) else [],
            "weights_ref": sorted(ok.weights_ref.dropna().unique()) if len(ok) else [],
        },
        "llama_cpp_version": ", ".join(versions) or None,
        "llama_system_info": (env.get("llama") or {}).get("system_info"),
        "device": device,
        "model": {"arch": ARCH.name, "n_params": int(tg.n_params.iloc[0]) if len(tg) else ARCH.n_params(),
                  "kv_bytes_per_token": kv_bytes_per_token()},
        "tg": fit_tg(tg, device, df, lambda d: tg_points(d, tensor_types=tensor_types, probe_costs=probe_costs))
        if len(tg) else None,
        "probes": probe_costs or {},
        "probe_models_unavailable": unavailable,
        "memory": fit_memory(mem),
        "buffers": buffer_model(df, device["peak_source"]),
        "contexts": context_model(ctxp, device["peak_source"] == "gpu"),
        "quants": quants_info,
    }
    return _nan_to_none(cal)


def write(cal: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(_nan_to_none(cal), indent=2) + "\n")
    return path


class CalibrationError(ValueError):
    pass


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        cal = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{path}: not a calibration file ({e})") from None
    if not isinstance(cal, dict) or "calibration_version" not in cal or "device" not in cal:
        raise CalibrationError(f"{path}: not a calibration file (no calibration_version/device)")
    cal.setdefault("source_path", str(path))
    return cal
