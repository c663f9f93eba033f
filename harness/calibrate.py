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
only IQ3_S file). Kernel probes (:mod:`harness.probes`) measure every tensor type's cost per weight on its own,
so the "probe" candidates use

    kernel_s = sum over the file's tensor types of weights in that type x the type's probe seconds per weight

with one fitted factor (and an overhead that may be negative: each probe cost carries a share of the probe's
own per-token overhead).

Peak memory::

    peak = weights + KV + compute + output buffers (llama.cpp's own accounting) + runtime overhead

with the overhead (and, in larger candidates, factors on the terms) fitted; the peak is the process RSS on
the CPU and NVML's reading on an NVIDIA GPU.

Everything is a pure function of the records DataFrame (:func:`harness.summary.records_frame`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness import devices, page
from harness.probes import UNPROBED
from harness.synthetic import ARCHS

log = logging.getLogger(__name__)

CALIBRATION_VERSION = 1
ARCH = ARCHS["llama-3.2-1b"]
KV_TYPE_BYTES = 2  # llama.cpp's default KV cache type is f16
KV_PAD_CELLS = 256  # llama.cpp 0.3.36 rounds a KV cache up to a multiple of 256 cells
REF_FAMILY = "k"  # the family without a compute column of its own (the overhead carries its cost)
TYPE_RIDGE = 1.0  # penalty on per-type deviations, in units of (deviation / median time)^2
SELECT_TOLERANCE = 1.10  # a simpler model wins unless the better one's LOQO RMS error is 10% lower
SELECT_SLACK = 0.002  # ... and at least 0.2 points lower
N_BOOTSTRAP = 200


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

def _ok(df: pd.DataFrame) -> pd.DataFrame:
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
    `probe_costs` ({ggml type: {"s_per_weight": ...}}, :func:`harness.probes.costs`) also the probes' kernel
    time per token (column "kernel_s") for the probe models."""
    ok = _ok(df)
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


def _device_bytes(bufs: Any, total: Any, device_side: bool) -> float:
    """Bytes in llama.cpp's buffers; on a GPU only the device's own (not CPU_Mapped or pinned host memory)."""
    if isinstance(bufs, dict) and bufs:
        if device_side:
            return float(sum(v for k, v in bufs.items() if not k.upper().startswith("CPU") and "HOST" not in k.upper()))
        return float(sum(bufs.values()))
    return float(total) if total is not None and not pd.isna(total) else math.nan


def memory_points(df: pd.DataFrame, peak_source: str = "rss") -> pd.DataFrame:
    """One row per (quant, depth): llama.cpp's buffers (weights, KV, compute, output) and the measured peak.

    peak_source "rss": the child's resident-set high-water mark, every buffer counted. "gpu": NVML, only the
    device's buffers counted; the peak is the process's own usage where the driver reports it, else the
    device's used memory above what it was before the model loaded."""
    ok = _ok(df)
    rows = []
    gpu = peak_source == "gpu"
    for (quant, depth), d in ok.groupby(["quant", "n_depth"], sort=False):
        def most(col: str, bcol: str, d: pd.DataFrame = d) -> float:
            vals = [_device_bytes(b, t, gpu) for b, t in zip(d[bcol], d[col])]
            vals = [v for v in vals if not math.isnan(v)]
            return max(vals) if vals else math.nan

        w = most("weights_bytes", "model_buffers")
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
        rows.append({
            "quant": quant, "n_depth": int(depth), "n_ctx": int(n_ctx.max()) if len(n_ctx) else None,
            "weights_bytes": w, "kv_bytes": kv, "compute_bytes": comp, "output_bytes": out, "peak_bytes": peak,
            "family": quant_family(quant), "type": quant_type(quant),
        })
    return pd.DataFrame(rows)


# --- the solver -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    name: str  # how reports and calibration.json call it
    features: tuple[str, ...]  # feature kinds, see _features()
    description: str  # one line


TG_CANDIDATES: tuple[Candidate, ...] = (
    Candidate("bandwidth", ("bytes",), "t = bytes / (bandwidth x efficiency)"),
    Candidate("bandwidth+overhead", ("bytes", "const"), "t = bytes / (bandwidth x efficiency) + overhead"),
    Candidate("bandwidth+overhead+family", ("bytes", "const", "family"),
              "t = bytes / (bandwidth x efficiency) + overhead + compute cost per weight of the quant family"),
    Candidate("family-bandwidth+overhead", ("family_bytes", "const"),
              "t = bytes / (bandwidth x efficiency of the quant family) + overhead"),
    Candidate("bandwidth+overhead+family+type", ("bytes", "const", "family", "type"),
              "... + a (shrunken) compute cost per weight of the quant's main ggml type"),
    # With the files' tensor types: the compute term counts each tensor's weights at its own type's cost.
    Candidate("bandwidth+overhead+mix-family", ("bytes", "const", "mix_family"),
              "t = bytes / (bandwidth x efficiency) + overhead + sum over families of weights in that family's "
              "types x its cost per weight"),
    Candidate("bandwidth+overhead+mix-family+mix-type", ("bytes", "const", "mix_family", "mix_type"),
              "... + a (shrunken) cost per weight of each ggml type, times the weights stored in it"),
    # With kernel probes: each tensor's weights at its type's cost per weight, measured apart from the quants.
    Candidate("probe-kernels", ("kernel",),
              "t = f x sum over tensor types of weights x the type's probe time per weight"),
    Candidate("probe-kernels+overhead", ("kernel", "const"),
              "t = f x (probe kernel time) + overhead"),
    Candidate("probe-kernels+bandwidth+overhead", ("kernel", "bytes", "const"),
              "t = f x (probe kernel time) + bytes / (bandwidth x efficiency) + overhead"),
)
_MIX_KINDS = {"mix_family", "mix_type"}


def available(c: Candidate, points: pd.DataFrame) -> bool:
    """Mix models need the tensor types of every quant's file; probe models also every type's probe."""
    if "kernel" in c.features and "kernel_s" not in points.columns:
        return False
    return not (_MIX_KINDS & set(c.features)) or any(col.startswith("mix") for col in points.columns)

MEMORY_CANDIDATES: tuple[Candidate, ...] = (
    Candidate("buffers+overhead", ("const",), "peak = weights + KV + compute + output + overhead"),
    Candidate("weights-factor+overhead", ("weights", "const"),
              "peak = f x weights + KV + compute + output + overhead"),
    Candidate("factors+overhead", ("weights", "buffers", "const"),
              "peak = f x weights + g x (KV + compute + output) + overhead"),
)


def _feature_names(points: pd.DataFrame, kinds: Iterable[str]) -> list[str]:
    names = []
    for kind in kinds:
        if kind == "bytes":
            names.append("s_per_byte")
        elif kind == "const":
            names.append("overhead")
        elif kind == "family_bytes":
            names += [f"s_per_byte:family:{f}" for f in sorted(points.family.unique())]
        elif kind == "family":
            names += [f"per_weight:family:{f}" for f in sorted(points.family.unique()) if f != REF_FAMILY]
        elif kind == "type":
            names += [f"per_weight:type:{t}" for t in sorted(points.type.unique())]
        elif kind == "mix_family":
            names += [f"per_weight:mix_family:{c.split(':', 1)[1]}" for c in sorted(points.columns)
                      if c.startswith("mix_family:") and c.split(":", 1)[1] != REF_FAMILY]
        elif kind == "mix_type":
            names += [f"per_weight:mix_type:{c.split(':', 1)[1]}" for c in sorted(points.columns)
                      if c.startswith("mix:")]
        elif kind == "kernel":
            names.append("kernel_factor")
        elif kind == "weights":
            names.append("weights_factor")
        elif kind == "buffers":
            names.append("buffers_factor")
        else:
            raise ValueError(kind)
    return names


def _column(points: pd.DataFrame, name: str) -> np.ndarray:
    """The feature a parameter multiplies (the model is linear in its parameters)."""
    n = len(points)
    if name == "s_per_byte":
        return points.bytes_per_token.to_numpy(float)
    if name == "overhead":
        return np.ones(n)
    if name.startswith("s_per_byte:family:"):
        return points.bytes_per_token.to_numpy(float) * (points.family == name.rsplit(":", 1)[1]).to_numpy(float)
    if name.startswith("per_weight:family:"):
        return points.n_params.to_numpy(float) * (points.family == name.rsplit(":", 1)[1]).to_numpy(float)
    if name.startswith("per_weight:mix_family:") or name.startswith("per_weight:mix_type:"):
        col = ("mix_family:" if ":mix_family:" in name else "mix:") + name.rsplit(":", 1)[1]
        return points[col].to_numpy(float) if col in points else np.zeros(n)
    if name.startswith("per_weight:type:"):
        return points.n_params.to_numpy(float) * (points.type == name.rsplit(":", 1)[1]).to_numpy(float)
    if name == "kernel_factor":
        return points.kernel_s.to_numpy(float) if "kernel_s" in points else np.zeros(n)
    if name == "weights_factor":
        return points.weights_bytes.to_numpy(float)
    if name == "buffers_factor":
        return (points.kv_bytes + points.compute_bytes + points.output_bytes).to_numpy(float)
    raise ValueError(name)


_NONNEG = {"s_per_byte", "overhead", "weights_factor", "buffers_factor", "kernel_factor"}  # and s_per_byte:family:*


def _nonneg(name: str, target: str, names: Iterable[str] = ()) -> bool:
    if target == "peak_bytes" and name == "overhead":
        return False  # net of buffer pages never touched (RSS counts touched pages only): may be negative
    if name == "overhead" and "kernel_factor" in names:
        return False  # net of the probes' own per-token overhead, which the kernel term counts per weight
    return name in _NONNEG or name.startswith("s_per_byte:")


def _fixed(points: pd.DataFrame, target: str, names: list[str]) -> np.ndarray:
    """The part of the target no parameter scales (memory: the buffers a candidate takes at face value)."""
    if target != "peak_bytes":
        return np.zeros(len(points))
    out = np.zeros(len(points))
    if "weights_factor" not in names:
        out += points.weights_bytes.to_numpy(float)
    if "buffers_factor" not in names:
        out += (points.kv_bytes + points.compute_bytes + points.output_bytes).to_numpy(float)
    return out


def solve(points: pd.DataFrame, names: list[str], target: str = "t_s", ridge: float = TYPE_RIDGE) -> dict[str, float]:
    """Least squares in relative error (each point weighted by 1/target), non-negative physical terms,
    per-type terms shrunk towards 0 (their family's cost). A feature absent from `points` gets 0."""
    y = points[target].to_numpy(float)
    fixed = _fixed(points, target, names)
    cols = {n: _column(points, n) for n in names}
    free = [n for n in names if np.any(cols[n] != 0)]
    params = dict.fromkeys(names, 0.0)
    y_scale = float(np.median(y))
    while free:
        a = np.column_stack([cols[n] / y for n in free])
        scale = np.abs(a).max(axis=0)
        scale[scale == 0] = 1.0
        a = a / scale
        b = 1.0 - fixed / y
        pen = [i for i, n in enumerate(free) if n.startswith(("per_weight:type:", "per_weight:mix_type:"))]
        if pen:
            rows = np.zeros((len(pen), len(free)))
            for r, i in enumerate(pen):
                # penalty ridge x (coef x n_params / median time)^2, written on the scaled coefficient
                n_params = float(np.max(cols[free[i]]))
                rows[r, i] = math.sqrt(ridge) * n_params / y_scale / scale[i]
            a = np.vstack([a, rows])
            b = np.concatenate([b, np.zeros(len(pen))])
        coef = np.linalg.lstsq(a, b, rcond=None)[0] / scale
        negative = [(coef[i], n) for i, n in enumerate(free) if _nonneg(n, target, names) and coef[i] < 0]
        if not negative:
            params.update({n: float(c) for n, c in zip(free, coef)})
            break
        free.remove(min(negative)[1])  # pin the most negative physical term at 0 and refit
    return params


def predict(points: pd.DataFrame, params: dict[str, float], target: str = "t_s") -> np.ndarray:
    """The model's value of `target` at each point, from a parameter dict (fitted or read from JSON)."""
    out = _fixed(points, target, list(params))
    for name, value in params.items():
        if value:
            out = out + value * _column(points, name)
    return out


def _errors(ape: np.ndarray) -> dict[str, float]:
    ape = np.asarray(ape, float)
    ape = ape[~np.isnan(ape)]
    if not len(ape):
        return {"median_ape": math.nan, "worst_ape": math.nan, "rms_ape": math.nan}
    return {"median_ape": float(np.median(ape)), "worst_ape": float(np.max(ape)),
            "rms_ape": float(np.sqrt(np.mean(ape**2)))}


def loqo(points: pd.DataFrame, names: list[str], target: str = "t_s") -> np.ndarray:
    """Leave-one-quant-out predictions: each quant (all its depths) predicted by a fit to the others."""
    pred = np.full(len(points), np.nan)
    for q in points.quant.unique():
        held = (points.quant == q).to_numpy()
        train = points[~held]
        if train.empty:
            continue
        params = solve(train, names, target)
        pred[held] = predict(points[held], params, target)
    return pred


def _rate_ape(points: pd.DataFrame, pred_t: np.ndarray) -> np.ndarray:
    """|predicted tok/s / measured tok/s - 1| from times."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(points.t_s.to_numpy(float) / pred_t - 1)


def _value_ape(points: pd.DataFrame, pred: np.ndarray, target: str) -> np.ndarray:
    return np.abs(pred / points[target].to_numpy(float) - 1)


def select(points: pd.DataFrame, candidates: tuple[Candidate, ...], target: str = "t_s") -> tuple[str, dict]:
    """Score every candidate by LOQO RMS error and pick the simplest one within SELECT_TOLERANCE of the best.
    Returns (chosen name, {name: {errors..., "n_params", "loqo_pred"}})."""
    candidates = tuple(c for c in candidates if available(c, points))
    table: dict[str, dict] = {}
    for c in candidates:
        names = _feature_names(points, c.features)
        pred = loqo(points, names, target)
        fitted = predict(points, solve(points, names, target), target)
        if target == "t_s":
            ape, fit_ape = _rate_ape(points, pred), _rate_ape(points, fitted)
        else:
            ape, fit_ape = _value_ape(points, pred, target), _value_ape(points, fitted, target)
        # one error per quant (its depths averaged), so a quant measured at many depths does not weigh more
        per_quant = pd.Series(ape).groupby(points.quant.to_numpy()).mean().to_numpy()
        table[c.name] = {**{f"loqo_{k}": v for k, v in _errors(per_quant).items()},
                         **{f"fit_{k}": v for k, v in _errors(fit_ape).items()},
                         "n_params": len(names), "description": c.description, "loqo_pred": pred}
    return _pick(candidates, table), table


def _pick(candidates: tuple[Candidate, ...], table: dict[str, dict]) -> str:
    """The simplest of `candidates` (all scored in `table`) whose LOQO RMS error is within SELECT_TOLERANCE
    of the best one's."""
    scores = {c.name: table[c.name]["loqo_rms_ape"] for c in candidates
              if not math.isnan(table[c.name]["loqo_rms_ape"])}
    if not scores:  # a single quant: no held-out error; take the simplest candidate
        return candidates[0].name
    best = min(scores.values())
    for c in sorted(candidates, key=lambda c: table[c.name]["n_params"]):  # simplest first (stable)
        s = scores.get(c.name)
        if s is not None and s <= best * SELECT_TOLERANCE + SELECT_SLACK:
            return c.name
    return min(scores, key=scores.get)


def bootstrap(points: pd.DataFrame, names: list[str], target: str = "t_s", n: int = N_BOOTSTRAP,
              seed: int = 0) -> dict[str, float]:
    """Standard deviation of each parameter over fits to quants resampled with replacement (a feature absent
    from a resample does not count towards its parameter's spread)."""
    rng = np.random.default_rng(seed)
    quant_list = list(points.quant.unique())
    if len(quant_list) < 3:
        return dict.fromkeys(names, math.nan)
    draws = {k: [] for k in names}
    groups = {q: points[points.quant == q] for q in quant_list}
    for _ in range(n):
        pick = rng.choice(len(quant_list), size=len(quant_list), replace=True)
        sample = pd.concat([groups[quant_list[i]] for i in pick], ignore_index=True)
        p = solve(sample, names, target)
        for k in names:
            if np.any(_column(sample, k) != 0):
                draws[k].append(p[k])
    return {k: float(np.std(v, ddof=1)) if len(v) > 2 else math.nan for k, v in draws.items()}


# --- device of a run ------------------------------------------------------------------------------------------

def run_device(df: pd.DataFrame, env: dict | None) -> dict[str, Any]:
    """Which device the records ran on and its bandwidth: a GPU's from the catalog (by NVML's name), a CPU's
    as measured into env.json. Keys: name, kind ("cpu"/"gpu"), vendor, bandwidth_gb_s (None if unknown),
    bandwidth_source, memory_bytes, peak_source ("rss"/"gpu")."""
    env = env or {}
    ok = _ok(df)
    dev = None
    if len(ok) and "device" in ok and ok.device.notna().any():
        dev = str(ok.device.dropna().mode().iloc[0])
    gpu_name = None
    if len(ok) and "gpu_name" in ok and ok.gpu_name.notna().any():
        gpu_name = str(ok.gpu_name.dropna().iloc[0])
    gpu_name = gpu_name or (env.get("gpu") or {}).get("name")
    if dev and dev != "cpu":
        name = gpu_name if dev == "cuda" else (env.get("cpu") or {}).get("model") or dev
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


def page_tg_tok_s(points: pd.DataFrame, device: dict) -> np.ndarray:
    """The page's tok/s for each point (NaN where the page has no row or the bandwidth is unknown)."""
    bw = device.get("bandwidth_gb_s")
    out = []
    for q in points.quant:
        out.append(page.page_tok_s(bw, device.get("vendor"), q) if bw and q in page.BY_QUANT else math.nan)
    return np.array(out, float)


def _fit_chosen(points: pd.DataFrame, candidates: tuple[Candidate, ...], target: str):
    """Pick a candidate by LOQO error, fit it on all points: (candidate, selection table, feature names,
    parameters, their bootstrap spread, fitted values)."""
    chosen, table = select(points, candidates, target)
    cand = {c.name: c for c in candidates}[chosen]
    names = _feature_names(points, cand.features)
    params = solve(points, names, target)
    return cand, table, names, params, bootstrap(points, names, target), predict(points, params, target)


def fit_tg(points: pd.DataFrame, device: dict) -> dict[str, Any]:
    """Choose and fit the tg model; its parameters, their bootstrap spread, errors, and per-point values."""
    cand, table, names, params, std, fitted_t = _fit_chosen(points, TG_CANDIDATES, "t_s")
    chosen = cand.name
    page_rate = page_tg_tok_s(points, device)
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
        "fit": {k.removeprefix("fit_"): v for k, v in table[chosen].items() if k.startswith("fit_")},
        "page": _errors(page_ape),
        "points": per_point.to_dict(orient="records"),
        "fallback": _fallback(points, table) if "kernel" in cand.features else None,
    }


def _fallback(points: pd.DataFrame, table: dict[str, dict]) -> dict[str, Any]:
    """The best model without the probes, for estimates of a quant whose tensor types have no probe."""
    rest = tuple(c for c in TG_CANDIDATES if "kernel" not in c.features and c.name in table)
    chosen = _pick(rest, table)  # scored already, with the probe candidates
    cand = {c.name: c for c in rest}[chosen]
    return {"chosen": chosen, "formula": cand.description,
            "params": solve(points, _feature_names(points, cand.features), "t_s"),
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
    page_vram = np.array([page.page_vram_bytes(q) if q in page.BY_QUANT else math.nan for q in pts.quant])
    return {
        "chosen": chosen, "formula": cand.description, "params": params, "param_std": std,
        "overhead_bytes": params.get("overhead", 0.0),
        "candidates": {n: {k: v for k, v in t.items() if k != "loqo_pred"} for n, t in table.items()},
        "loqo": {k.removeprefix("loqo_"): v for k, v in table[chosen].items() if k.startswith("loqo_")
                 and k != "loqo_pred"},
        "fit": {k.removeprefix("fit_"): v for k, v in table[chosen].items() if k.startswith("fit_")},
        "page": _errors(np.abs(page_vram / pts.peak_bytes.to_numpy(float) - 1)),
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
    ok = _ok(df)
    gpu = peak_source == "gpu"
    rows = []
    for _, r in ok.iterrows():
        if r.n_ctx is None or pd.isna(r.n_ctx) or not r.n_ctx:
            continue
        ub = r.get("n_ubatch")
        ub = float(ub) if ub is not None and not pd.isna(ub) else 0.0
        rows.append((float(r.n_ctx), _device_bytes(r.kv_buffers, r.kv_bytes, gpu),
                     _device_bytes(r.compute_buffers, r.compute_bytes, gpu),
                     _device_bytes(r.output_buffers, r.output_bytes, gpu), ub))
    a = np.array(rows, float) if rows else np.zeros((0, 5))
    kv = a[~np.isnan(a[:, 1])] if len(a) else a
    if len(kv):
        top = kv[kv[:, 0] == kv[:, 0].max()]
        cells = np.ceil(top[:, 0] / KV_PAD_CELLS) * KV_PAD_CELLS  # what llama.cpp allocates for that context
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


def calibrate(df: pd.DataFrame, env: dict | None = None, run_id: str | None = None,
              results_dir: str | None = None, tensor_types: dict[str, dict] | None = None,
              probe_costs: dict[str, dict] | None = None) -> dict[str, Any]:
    """The calibration of one run: device, fitted tg and memory models with their errors, buffer growth,
    and per-quant sizes (so an estimate can be made for any of the measured quants at any context).
    `tensor_types` ({quant: {ggml type: n_elements}}, read from the GGUF files) enables the mix models, and
    with `probe_costs` (:func:`harness.probes.costs` of the run's kernel probes) the probe models."""
    env = env or {}
    device = run_device(df, env)
    tg = tg_points(df, tensor_types=tensor_types, probe_costs=probe_costs)
    unavailable = None
    if probe_costs and "kernel_s" not in tg.columns:
        if not tensor_types:
            unavailable = "the quants' tensor types are unknown (their files are not on disk)"
        else:
            missing = sorted({t for types in tensor_types.values() for t in (types or {})
                              if t.upper() not in UNPROBED and t.upper() not in probe_costs})
            unavailable = f"no probe measured for {', '.join(missing) or 'some tensor type'}"
    mem = memory_points(df, device["peak_source"])
    ok = _ok(df)
    first = ok.iloc[0] if len(ok) else None
    quants_info: dict[str, dict] = {}
    for q, d in ok.groupby("quant", sort=False):
        m = mem[mem.quant == q]
        r = d.iloc[0]
        quants_info[q] = {
            "family": quant_family(q), "type": quant_type(q),
            "model_size_bytes": r.model_size_bytes, "model_n_params": r.model_n_params, "file_bytes": r.file_bytes,
            "weights_bytes": float(m.weights_bytes.iloc[0]) if len(m) else None,
            "tensor_types": {k: int(v["n_elements"] if isinstance(v, dict) else v)
                             for k, v in ((tensor_types or {}).get(q) or {}).items()} or None,
        }
    versions = ok.llama_cpp_version.dropna().unique() if len(ok) else []
    cal = {
        "calibration_version": CALIBRATION_VERSION,
        "what": "llama.cpp on this device, fitted to measured tg tok/s and peak memory (harness.calibrate)",
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
        "tg": fit_tg(tg, device) if len(tg) else None,
        "probes": probe_costs or {},
        "probe_models_unavailable": unavailable,
        "memory": fit_memory(mem),
        "buffers": buffer_model(df, device["peak_source"]),
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
    With a `bandwidth_gb_s` other than the calibration's, the rate is scaled by the bandwidth ratio."""
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
        tg = {**tg, **fb}
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
    rate = 1 / t
    if bandwidth_gb_s and cal_bw and abs(bandwidth_gb_s / cal_bw - 1) > 1e-9:
        ratio = bandwidth_gb_s / cal_bw
        rate *= ratio
        notes.append(f"scaled from {cal['device']['name']} ({cal_bw:,.1f} GB/s) by the bandwidth ratio "
                     f"{ratio:.3g}: an extrapolation across devices, beyond the stated uncertainty")
    elif bandwidth_gb_s and not cal_bw:
        notes.append("the calibration's device has no known bandwidth: not scaled")
    rel = (tg.get("loqo") or {}).get("rms_ape")
    return rate, rel if rel is not None else math.nan, notes


def predict_memory_bytes(cal: dict, quant: str, n_ctx: int) -> tuple[float, float, list[str]]:
    """Calibrated peak memory for a quant at a context size: (bytes, relative uncertainty, notes)."""
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
    pts = pd.DataFrame([{"quant": quant, "weights_bytes": weights, "kv_bytes": kv, "compute_bytes": comp,
                         "output_bytes": buf.get("output_bytes") or 0.0, "peak_bytes": 1.0}])
    value = float(predict(pts, mem["params"], "peak_bytes")[0])
    rel = (mem.get("loqo") or {}).get("rms_ape")
    return value, rel if rel is not None else math.nan, notes
