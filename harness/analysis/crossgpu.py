"""A cross-device model of generation speed, fitted on many devices' tg rows (published llama-bench rows and
measured runs alike):

    time per generated token = overhead[family]
                               + bytes read per token / (efficiency[family] x kind[quant kind] x spec bandwidth)

with bytes read = the model's size as llama-bench prints it (every weight once per token; the KV cache at
depth 0 is negligible), the spec bandwidth from the device catalog, a family = vendor x backend with HBM parts
apart (NVIDIA CUDA, NVIDIA CUDA on HBM, AMD ROCm on HBM, Apple Metal, ...: each family its own terms, never
averaged together), and a factor per quant kind shared by all families (F16 = 1; the k-quants' dequantization
reaches a smaller share of the bandwidth than F16's plain reads). Two candidates: without overhead, fitted in
log space (each family's geometric mean), and with it (bounded least squares in relative error, overhead and
efficiency bounded at 0). Their error is leave-one-device-out: the device's rows are predicted by a fit that
never saw that device. Beside them, the page's formula (tok/s = bandwidth / size x 0.65 on NVIDIA, 0.55 on AMD)
and a plain bandwidth-only fit (one efficiency per vendor x backend, as the page has one per vendor).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.analysis.fit import error_stats, nnls, rate_ape
from harness.catalog import devices, page

SMALL_MAX_B = 3.0  # "1B-3B" rows: by llama.cpp's size label ("llama 3B"), which older builds pair with 3.61 B
# params (tied embeddings counted twice); by the parameter count where there is no label
MAX_GEN = 512  # longer generations read a growing KV cache: not this model's work per token


DEFAULT_RUNTIME = "llama.cpp"  # the fit's rows; a fork's (ik_llama.cpp: its own kernels) are shown apart


def tg_rows(df: pd.DataFrame) -> pd.DataFrame:
    """tg rows at depth 0 with a size, a device in the catalog and a rate: device, family, bytes, t_s, params,
    runtime (the published row's `extra.runtime`; "unknown" where its source does not say; a measured run's is
    llama.cpp), source (:func:`source_key`) and `over_spec` (faster than every weight read once at the device's
    spec bandwidth: no dense model can be, a misprint or not the model named; kept and flagged, never dropped on
    the outcome). Left out: mixtures of experts (they read their active experts only) and devices the catalog
    has no bandwidth for."""
    ok = df[(df.status == "ok") & (df.test == "tg") & (df.n_depth.fillna(0) == 0) & (df.n_gen <= MAX_GEN)]
    rows = []
    lines_seen: set[tuple] = set()
    for r in ok.itertuples():
        extra = r.extra if isinstance(getattr(r, "extra", None), dict) else {}
        published = r.weights == "published"
        runtime = (extra.get("runtime") or "unknown") if published else DEFAULT_RUNTIME
        if extra.get("line"):  # a published line: its first t/s column of each runtime only (master / before:
            key = (r.weights_ref, extra.get("file"), extra["line"], runtime)  # the baseline), not one row per
            if key in lines_seen:  # column of a PR comparison
                continue
            lines_seen.add(key)
        if not isinstance(r.gpu_name, str) or pd.isna(r.model_size_bytes) or pd.isna(r.tokens_per_s):
            continue
        d = devices.find(r.gpu_name)
        if d is None or not d.bandwidth_gb_s:
            continue
        if isinstance(r.model_desc, str) and "moe" in r.model_desc.lower():
            continue  # a mixture of experts reads its active experts only: bytes per token != its size
        backend = r.device if isinstance(r.device, str) else "unknown-backend"
        rows.append({"size_b": size_label_b(r.model_desc, r.model_n_params),
                     "device": d.name, "vendor": d.vendor, "family": family_of(d.vendor, backend, d.hbm),
                     "base_family": f"{d.vendor}-{backend}", "kind": quant_kind(r.quant),
                     "bandwidth_b_s": d.bandwidth_gb_s * 1e9, "bytes": float(r.model_size_bytes),
                     "params": float(r.model_n_params) if pd.notna(r.model_n_params) else math.nan,
                     "t_s": 1.0 / float(r.tokens_per_s), "tok_s": float(r.tokens_per_s), "quant": r.quant,
                     "model": r.model_desc, "source": source_key(r.weights_ref), "url": r.weights_ref,
                     "runtime": runtime, "build": extra.get("build") if published else r.llama_cpp_version,
                     "over_spec": float(r.tokens_per_s) * float(r.model_size_bytes) > d.bandwidth_gb_s * 1e9,
                     "weights": r.weights})
    return pd.DataFrame(rows)


# repositories whose issues and pull requests are each a source of their own (different people, machines and
# methods); any other repository or site is one source (one author's method, e.g. a benchmark collection)
PER_THREAD = ("ggml-org/llama.cpp", "ggerganov/llama.cpp", "ikawrakow/ik_llama.cpp")


def source_key(url: Any) -> str:
    """The source a row is held out with: "owner/repo#N" for an issue, pull request or discussion of llama.cpp or
    ik_llama.cpp, "owner/repo" for any other GitHub repository (a collection: one author, one method), else the
    web site's host; a measured run's rows (no URL) are "measured"."""
    u = str(url or "")
    m = re.match(r"^https?://github\.com/([^/]+)/([^/#?]+)(?:/(?:pull|issues|discussions)/(\d+))?", u)
    if m:
        repo = f"{m[1]}/{m[2]}"
        return f"{repo}#{m[3]}" if m[3] and repo.lower() in map(str.lower, PER_THREAD) else repo
    m = re.match(r"^https?://([^/]+)", u)
    return m[1].lower() if m else (u or "measured")


def family_of(vendor: str, backend: str, hbm: bool) -> str:
    """vendor x backend, HBM parts apart: "nvidia-cuda", "nvidia-cuda-hbm", "amd-rocm-hbm", "apple-metal"."""
    return f"{vendor}-{backend}" + ("-hbm" if hbm else "")


def size_label_b(desc: Any, n_params: Any) -> float:
    """The model's size in billions as llama.cpp labels it ("llama 3B Q4_0" -> 3.0, "llama 1.1B" -> 1.1), else
    its parameter count in billions, else NaN."""
    m = re.search(r"\s(\d+(?:\.\d+)?)B\b", str(desc or ""))
    if m:
        return float(m[1])
    return float(n_params) / 1e9 if n_params is not None and pd.notna(n_params) else math.nan


def quant_kind(quant: Any) -> str:
    """The kernel family a quant's generation runs through: "f16" (F16, BF16, F32: no dequantization),
    "q8_0", "q4_0-q5_1" (the legacy 32-weight blocks) or "k/i-quants" (256-weight super-blocks: Q2_K..Q6_K and
    their mixes, IQ*); "other" where the quant is not named. The published rows show each reaching a different
    share of the spec bandwidth on the same card (RTX 4090: F16 0.87, Q8_0 0.70, Q4_K_M 0.64)."""
    q = str(quant or "").upper()
    if q in ("F16", "BF16", "F32"):
        return "f16"
    if q == "Q8_0":
        return "q8_0"
    if q in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        return "q4_0-q5_1"
    return "k/i-quants" if re.match(r"^I?Q\d", q) else "other"


# The models compared by leave-one-device-out; the first is the plain baseline (one efficiency per vendor x
# backend, as the page has one per vendor), the other two are the candidates `chosen` picks from.
PLAIN, KINDS, OVERHEAD = "bandwidth only (plain)", "bandwidth x quant kind", "overhead + bandwidth x quant kind"
POOLED = "back end's floor + family bandwidth shrunk to its back end's x quant kind"
MODELS = (PLAIN, KINDS, POOLED, OVERHEAD)  # simplest first (POOLED: 2 terms per back end + 1 shrunk per family)
# How many rows' weight a back end's efficiency has in a family's: a family of 2 rows moves about a third of the
# way from its back end's inverse efficiency to its own, one of 40 nearly all the way.
SHRINK_ROWS = 4.0


def backend_of(family: str) -> str:
    """"nvidia-cuda-hbm" -> "cuda": the software that sets the per-token floor (launches, synchronisation)."""
    parts = family.split("-")
    return parts[1] if len(parts) > 1 else family


def _efficiency(pts: pd.DataFrame) -> np.ndarray:
    """Each row's share of its spec bandwidth: bytes / (spec bandwidth x time per token)."""
    return (pts.bytes / pts.bandwidth_b_s / pts.t_s).to_numpy()


def _factors(pts: pd.DataFrame, kinds: dict[str, float]) -> np.ndarray:
    """Each row's quant kind factor; 1 for a kind no training row has (its family's F16 efficiency)."""
    return pts.kind.map(lambda k: kinds.get(k, 1.0)).to_numpy(float)


def fit_kinds(pts: pd.DataFrame) -> tuple[dict[str, float], dict[str, float]]:
    """Geometric least squares: log(row efficiency) = log e[family] + log k[quant kind], k["f16"] = 1 (or the
    first kind present where no row is F16). A geometric mean: one slow host's row moves its family's figure
    by a factor, not by its absolute error."""
    families = sorted(pts.family.unique())
    kinds = sorted(pts.kind.unique())
    ref = "f16" if "f16" in kinds else kinds[0]
    free = [k for k in kinds if k != ref]
    a = np.column_stack([(pts.family == f).to_numpy(float) for f in families]
                        + [(pts.kind == k).to_numpy(float) for k in free])
    x = np.linalg.lstsq(a, np.log(_efficiency(pts)), rcond=None)[0]
    return ({f: float(math.exp(v)) for f, v in zip(families, x)},
            {ref: 1.0, **{k: float(math.exp(v)) for k, v in zip(free, x[len(families):])}})


def fit(pts: pd.DataFrame, model: str = OVERHEAD) -> dict[str, Any]:
    """{"families": {family: {"efficiency": e, "overhead_s": o}}, "kinds": {quant kind: factor}} of `model`:

    - PLAIN: one efficiency per vendor x backend (`base_family`), no kinds, bounded least squares in relative
      error;
    - KINDS: fit_kinds (per family, HBM parts apart, times a factor per quant kind);
    - OVERHEAD: fit_kinds' quant-kind factors, then per family an overhead and an efficiency by bounded least
      squares in relative error, with 0 < e <= 1 (no device reads faster than its spec bandwidth) and o >= 0:
      written as 1/e = 1 + u, u >= 0."""
    if model == KINDS:
        eff, kinds = fit_kinds(pts)
        return {"families": {f: {"efficiency": e, "overhead_s": 0.0} for f, e in eff.items()}, "kinds": kinds}
    if model == POOLED:
        return fit_pooled(pts)
    if model == PLAIN:
        pts = pts.assign(family=pts.base_family)
        kinds: dict[str, float] = {}
    else:
        kinds = fit_kinds(pts)[1]
    overhead = model == OVERHEAD
    families = sorted(pts.family.unique())
    t = pts.t_s.to_numpy()
    read = (pts.bytes / pts.bandwidth_b_s).to_numpy() / _factors(pts, kinds)
    cols = []
    for f in families:
        m = (pts.family == f).to_numpy(float)
        cols += [m * read, m] if overhead else [m * read]  # coefficients: 1 / efficiency, overhead seconds
    a = np.column_stack(cols) / t[:, None]
    x = nnls(a, np.ones(len(pts)) - read / t, np.ones(a.shape[1], dtype=bool))
    out, k = {}, 0
    for f in families:
        inv_e = 1.0 + x[k]
        o = float(x[k + 1]) if overhead else 0.0
        k += 2 if overhead else 1
        out[f] = {"efficiency": 1.0 / inv_e if inv_e > 0 else math.inf, "overhead_s": o}
    return {"families": out, "kinds": kinds}


def fit_pooled(pts: pd.DataFrame) -> dict[str, Any]:
    """POOLED: time per token = floor[back end] + bytes / (efficiency[family] x kind x spec bandwidth), with
    1 / efficiency[family] = 1 / efficiency[back end] + a family's deviation that SHRINK_ROWS pseudo-rows pull
    to 0, the floor and the back end's inverse efficiency bounded (>= 0, >= 1), by least squares in relative
    error; quant-kind factors from fit_kinds. The floor is one per back end (CUDA, ROCm, Vulkan, Metal), fitted
    on every family's rows of it: an HBM family with no 1B-3B row of its own gets the floor its back end's
    small-model rows show. Returns fit()'s shape plus "backends": {back end: {"efficiency", "overhead_s"}}, each
    family's terms carrying its back end and "own_weight" (its rows / (its rows + SHRINK_ROWS))."""
    kinds = fit_kinds(pts)[1]
    be = pts.family.map(backend_of)
    small = pts.size_b <= SMALL_MAX_B
    backends = sorted(be.unique())
    n_small = {b: int((small & (be == b)).sum()) for b in backends}
    x, floors = _solve_pooled(pts, kinds, {b: None for b in backends if n_small[b]})
    # a back end with no 1B-3B row cannot show its floor (its large-model rows trade a floor for efficiency
    # freely): it takes the median of the floors the other back ends' small rows show, and says so
    borrowed = float(np.median(list(floors.values()))) if floors else 0.0
    fixed = {b: (None if n_small[b] else borrowed) for b in backends}
    x, floors = _solve_pooled(pts, kinds, fixed)
    families = sorted(pts.family.unique())
    nb = 2 * len(backends)
    out_b = {b: {"efficiency": 1.0 / (1.0 + x[2 * i]), "overhead_s": floors[b], "n_rows": int((be == b).sum()),
                 "n_small": n_small[b], "floor": "its own 1B-3B rows" if n_small[b] else
                 "borrowed: the median of the other back ends' floors (no 1B-3B row of its own)"}
             for i, b in enumerate(backends)}
    out = {}
    for i, f in enumerate(families):
        b = backend_of(f)
        inv_e = max(1.0, 1.0 + x[2 * backends.index(b)] + x[nb + i])  # no device reads faster than its spec
        n = int((pts.family == f).sum())
        out[f] = {"efficiency": 1.0 / inv_e, "overhead_s": out_b[b]["overhead_s"], "backend": b,
                  "own_weight": n / (n + SHRINK_ROWS)}
    return {"families": out, "kinds": kinds, "backends": out_b}


def _solve_pooled(pts: pd.DataFrame, kinds: dict[str, float], fixed: dict[str, float | None]
                  ) -> tuple[np.ndarray, dict[str, float]]:
    """fit_pooled's least squares: per back end of `fixed` (None: its floor fitted; a number: that floor, held;
    absent: no floor), then per family its shrunk deviation. Returns (x, {back end: floor seconds})."""
    families = sorted(pts.family.unique())
    be = pts.family.map(backend_of)
    backends = sorted(be.unique())
    t = pts.t_s.to_numpy()
    read = (pts.bytes / pts.bandwidth_b_s).to_numpy() / _factors(pts, kinds)
    held = np.array([fixed.get(b) or 0.0 for b in be])
    cols = []
    for b in backends:
        m = (be == b).to_numpy(float)
        # 1 / efficiency - 1 of the back end (>= 0), its floor in seconds (>= 0; 0 where held or absent)
        cols += [m * read, m if (b in fixed and fixed[b] is None) else np.zeros(len(pts))]
    for f in families:
        cols.append((pts.family == f).to_numpy(float) * read)  # the family's deviation (free, shrunk)
    a = np.column_stack(cols) / t[:, None]
    y = np.ones(len(pts)) - (read + held) / t
    nb = 2 * len(backends)
    bounded = np.array([True] * nb + [False] * len(families))
    # SHRINK_ROWS pseudo-rows per family, each as sensitive to its deviation as its own rows are on average (the
    # RMS of read / time over them): n rows against SHRINK_ROWS, whatever the family's share of its bandwidth
    prior = np.zeros((len(families), a.shape[1]))
    for i, f in enumerate(families):
        m = (pts.family == f).to_numpy()
        prior[i, nb + i] = math.sqrt(SHRINK_ROWS * np.mean((read[m] / t[m]) ** 2))
    x = nnls(np.vstack([a, prior]), np.concatenate([y, np.zeros(len(families))]), bounded)
    floors = {b: (float(x[2 * i + 1]) if fixed.get(b, 0.0) is None else float(fixed.get(b) or 0.0))
              for i, b in enumerate(backends) if b in fixed}
    return x, floors


def _pooled_terms(params: dict[str, Any], family: str) -> dict[str, Any] | None:
    """A family's POOLED terms, or its back end's where the fit has no row of the family."""
    return params["families"].get(family) or (params.get("backends") or {}).get(backend_of(family))


def predict_t(pts: pd.DataFrame, params: dict[str, Any], model: str = OVERHEAD) -> np.ndarray:
    out = np.full(len(pts), np.nan)
    fams = pts.base_family if model == PLAIN else pts.family
    factors = _factors(pts, params["kinds"])
    for i, (f, r) in enumerate(zip(fams, pts.itertuples())):
        p = _pooled_terms(params, f) if model == POOLED else params["families"].get(f)
        if p and p["efficiency"] not in (0, math.inf):
            out[i] = p["overhead_s"] + r.bytes / r.bandwidth_b_s / (p["efficiency"] * factors[i])
    return out


def leave_one_device_out(pts: pd.DataFrame, model: str = OVERHEAD) -> np.ndarray:
    """Predicted time per token of each row by a fit without its device's rows (NaN where its family has no
    other device). Kept for comparison: rows of one source on other devices stay in the fit."""
    pred = np.full(len(pts), np.nan)
    for dev in pts.device.unique():
        held = (pts.device == dev).to_numpy()
        train = pts[~held]
        if not len(train):
            continue
        pred[held] = predict_t(pts[held], fit(train, model), model)
    return pred


def folds(pts: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    """(held out, train) masks, one per source: a source's rows are held out together (one author's method on
    ~20 devices, a fork's and mainline's rows of one machine), and the fit never sees a row on any of their
    devices either, from any source: what `estimate` meets on a GPU it has no row of."""
    out = []
    for src in pts.source.unique():
        held = (pts.source == src).to_numpy()
        train = ~held & ~pts.device.isin(pts.device[held].unique()).to_numpy()
        out.append((held, train))
    return out


def held_out(pts: pd.DataFrame, model: str) -> np.ndarray:
    """Predicted time per token of each row by a fit that saw neither its source nor its devices (NaN where
    nothing of its family is left to fit on)."""
    pred = np.full(len(pts), np.nan)
    for held, train in folds(pts):
        if train.any():
            pred[held] = predict_t(pts[held], fit(pts[train], model), model)
    return pred


CANDIDATES = MODELS  # simplest first: a more complex one is chosen only where it is clearly better


def choose(pts: pd.DataFrame) -> tuple[str, dict[str, float], int]:
    """The model with the lowest held-out RMS relative error (a criterion that counts the worst rows) over the
    rows every candidate predicts; a simpler one wins unless the other's RMS is lower by a tenth and by 0.2
    points (harness.analysis.fit's tolerance). Returns (chosen, {candidate: RMS}, rows compared)."""
    from harness.analysis.fit import SELECT_SLACK, SELECT_TOLERANCE

    apes = {m: rate_ape(pts, held_out(pts, m)) for m in CANDIDATES}
    common = np.all([~np.isnan(a) for a in apes.values()], axis=0)
    if not common.any():
        return CANDIDATES[0], {}, 0
    rms = {m: float(np.sqrt(np.mean(a[common] ** 2))) for m, a in apes.items()}
    chosen = CANDIDATES[0]
    for m in CANDIDATES[1:]:
        if rms[m] * SELECT_TOLERANCE < rms[chosen] and rms[chosen] - rms[m] > SELECT_SLACK:
            chosen = m
    return chosen, rms, int(common.sum())


def nested(pts: pd.DataFrame) -> tuple[np.ndarray, dict[str, int]]:
    """The error of the whole procedure, the model choice included: per source fold, the choice is made by
    :func:`choose` on the fold's training rows alone (their own folds), the chosen model is fitted on them and
    predicts the held-out rows. Returns (predicted time per token, {model: folds that chose it})."""
    pred = np.full(len(pts), np.nan)
    chosen_in: dict[str, int] = {}
    for held, train in folds(pts):
        if not train.any():
            continue
        tr = pts[train]
        m, _, _ = choose(tr)
        chosen_in[m] = chosen_in.get(m, 0) + 1
        pred[held] = predict_t(pts[held], fit(tr, m), m)
    return pred, chosen_in


def family_small_in_training(pts: pd.DataFrame) -> np.ndarray:
    """Per row, whether its source fold's training rows hold a 1B-3B row of its family (the case of a card
    whose family has small-model rows of its own, from other sources and devices)."""
    small = (pts.size_b <= SMALL_MAX_B).to_numpy()
    out = np.zeros(len(pts), dtype=bool)
    for held, train in folds(pts):
        fams = set(pts.family[train & small])
        out[held] = pts.family[held].isin(fams).to_numpy()
    return out


def small_withheld(pts: pd.DataFrame) -> np.ndarray:
    """The case of a card whose family has no 1B-3B row (H100 SXM, H200, MI300X, MI250X): per source fold, its
    1B-3B rows predicted by the model chosen (nested) on the fold's training rows less every 1B-3B row of those
    rows' families, so the floor is its back end's (other families') and the efficiency its family's larger
    rows'. NaN for rows not of 1B-3B models."""
    small = (pts.size_b <= SMALL_MAX_B).to_numpy()
    pred = np.full(len(pts), np.nan)
    for held, train in folds(pts):
        held = held & small
        if not held.any():
            continue
        train = train & ~(small & pts.family.isin(pts.family[held].unique()).to_numpy())
        if not train.any():
            continue
        tr = pts[train]
        m, _, _ = choose(tr)
        pred[held] = predict_t(pts[held], fit(tr, m), m)
    return pred


def leave_one_family_out(pts: pd.DataFrame, model: str | None = None) -> np.ndarray:
    """Each family's rows predicted by a fit without any of them (`model`, or the one chosen on the other
    families' rows when None): what a card of a family with no published row at all gets. Only a model with
    terms beyond the family (PLAIN's vendor x backend, POOLED's back end) can predict; NaN elsewhere."""
    pred = np.full(len(pts), np.nan)
    for f in pts.family.unique():
        held = (pts.family == f).to_numpy()
        tr = pts[~held]
        if tr.empty:
            continue
        m = model or choose(tr)[0]
        pred[held] = predict_t(pts[held], fit(tr, m), m)
    return pred


def page_t(pts: pd.DataFrame) -> np.ndarray:
    """Time per token by the page's own rule (harness.catalog.page.rule_tok_s) at each row's own size."""
    return np.array([1.0 / page.rule_tok_s(r.bandwidth_b_s / 1e9, r.vendor, r.bytes / 1e9)
                     for r in pts.itertuples()], dtype=float)


def _errors(ape: np.ndarray, small: np.ndarray) -> dict[str, Any]:
    ok = ~np.isnan(ape)
    return {"all": error_stats(ape[ok]) if ok.any() else None, "n_all": int(ok.sum()),
            "small": error_stats(ape[ok & small]) if (ok & small).any() else None,
            "n_small": int((ok & small).sum())}


CASE_OWN = "a family with 1B-3B rows of its own"
CASE_BORROWED = "a family without 1B-3B rows (its 1B-3B rows withheld: the floor is its back end's)"
CLOSE = 1.25  # the runner-up is shown beside the chosen model where its selection RMS is within 25% of it


def close(rms: dict[str, float], chosen: str, other: str) -> bool:
    """Whether the selection between `chosen` and `other` was close: their held-out RMS within CLOSE of each
    other, either way (a simpler model kept within the tolerance counts as close too)."""
    from harness.analysis.fit import SELECT_SLACK

    a, b = rms.get(chosen), rms.get(other)
    return a is not None and b is not None and max(a, b) <= CLOSE * min(a, b) + SELECT_SLACK


HELD_OUT_METHOD = "leave one source out, with every row on its devices (nested: the model choice inside the folds)"


def calibrate(df: pd.DataFrame, runtime: str = DEFAULT_RUNTIME) -> dict[str, Any]:
    """The cross-device calibration document, fitted on `runtime`'s rows (llama.cpp's; a fork's rows are shown
    apart, against that fit): the chosen model's fit on every row; each candidate's error held out by source
    and device, the page's rule's error, and the nested error of choosing and fitting (what is reported as the
    error); the rows faster than their spec bandwidth, flagged."""
    every = tg_rows(df)
    if every.empty:
        return {"n_rows": 0}
    pts = every[every.runtime == runtime].reset_index(drop=True)
    apart = every[every.runtime != runtime]
    if pts.empty:
        return {"n_rows": 0, "runtime": runtime, "other_runtimes": _other_runtimes(apart, None)}
    out: dict[str, Any] = {"runtime": runtime, "n_rows": int(len(pts)), "n_devices": int(pts.device.nunique()),
                           "n_sources": int(pts.source.nunique()), "devices": sorted(pts.device.unique()),
                           "families": {}}
    small = (pts.size_b <= SMALL_MAX_B).to_numpy()
    chosen, rms, n_cmp = choose(pts)
    errs, preds = {}, {}
    for name in CANDIDATES:
        preds[name] = rate_ape(pts, held_out(pts, name))
        errs[name] = _errors(preds[name], small)
    preds["page formula"] = rate_ape(pts, page_t(pts))
    errs["page formula"] = _errors(preds["page formula"], small)
    common = np.all([~np.isnan(preds[m]) for m in CANDIDATES], axis=0)
    for m in CANDIDATES:
        errs[m]["common"] = error_stats(preds[m][common]) if common.any() else None
        errs[m]["common_small"] = error_stats(preds[m][common & small]) if (common & small).any() else None
    nested_t, chosen_in = nested(pts)
    nested_ape = rate_ape(pts, nested_t)
    errs["nested"] = {**_errors(nested_ape, small), "chosen_in_folds": chosen_in}
    lodo = rate_ape(pts, leave_one_device_out(pts, chosen))
    own_small = family_small_in_training(pts)
    cases = {CASE_OWN: _errors(np.where(own_small, nested_ape, np.nan), small),
             CASE_BORROWED: _errors(rate_ape(pts, small_withheld(pts)), small)}
    lofo = {"nested choice": _errors(rate_ape(pts, leave_one_family_out(pts)), small)}
    for m in CANDIDATES:
        lofo[m] = _errors(rate_ape(pts, leave_one_family_out(pts, m)), small)
    lofo_chosen = rate_ape(pts, leave_one_family_out(pts))
    lofo["by_family"] = {f: {"n_rows": int((pts.family == f).sum()),
                             **_errors(np.where((pts.family == f).to_numpy(), lofo_chosen, np.nan), small)}
                         for f in sorted(pts.family.unique())}
    out["held_out"] = {"method": HELD_OUT_METHOD, **errs, "n_common": int(common.sum()),
                       "n_common_small": int((common & small).sum()), "n_folds": len(folds(pts)),
                       "leave one device out (not held out by source)": _errors(lodo, small),
                       "cases": cases, "leave one family out": lofo}
    out["chosen"] = chosen
    out["chosen_by"] = (f"the lowest held-out RMS error (by source and device) over the {n_cmp} rows every "
                        f"candidate predicts, a simpler one kept unless clearly worse: "
                        + ", ".join(f"{m} {v:.1%}" for m, v in rms.items()))
    others = sorted((m for m in CANDIDATES if m != chosen), key=lambda m: rms.get(m, math.inf))
    out["other"] = other = others[0]
    out["selection_rms"] = rms
    out["selection_close"] = close(rms, chosen, other)
    full = fit(pts, chosen)
    if full.get("backends"):
        be = pts.family.map(backend_of)
        out["backends"] = {b: {**t, "devices": sorted(pts.device[be == b].unique()),
                               "families": sorted(pts.family[be == b].unique())}
                           for b, t in full["backends"].items()}
    out["kinds"] = {k: {"factor": v, "n_rows": int((pts.kind == k).sum())} for k, v in full["kinds"].items()}
    out["other_fit"] = fit(pts, other)  # the next candidate: shown beside, where the two disagree
    fam_col = pts.base_family if chosen == PLAIN else pts.family  # PLAIN: per vendor x backend, HBM or not
    for f, p in full["families"].items():
        in_f = (fam_col == f).to_numpy()
        d = pts[in_f]
        out["families"][f] = {**p, "n_rows": int(len(d)), "devices": sorted(d.device.unique()),
                              "n_small_rows": int((d.size_b <= SMALL_MAX_B).sum()),
                              "held_out": {"method": HELD_OUT_METHOD,
                                           **_errors(np.where(in_f, nested_ape, np.nan), small)}}
    floors = {f: p["overhead_s"] for f, p in full["families"].items()} if chosen == POOLED else None
    out["per_device"] = per_device(pts, full["kinds"], floors)
    # where a device has rows of its own, which predicts them better: its rows from other sources, or the
    # nested cross-device fit that never saw the device?
    loso = leave_one_source_out_on_device(pts, floors)
    both = ~np.isnan(loso) & ~np.isnan(nested_ape)
    own, cross = (error_stats(loso[both]), error_stats(nested_ape[both])) if both.any() else (None, None)
    out["per_device_check"] = {"n": int(both.sum()), "own rows (its rows from other sources)": own,
                               "cross-device (nested)": cross}
    # the same criterion decides whether a device's own rows or its family's fit estimate it
    out["own_rows_first"] = bool(own and cross and own["rms_ape"] < cross["rms_ape"])
    over = pts[pts.over_spec]
    out["over_spec"] = [{k: r[k] for k in ("device", "model", "quant", "tok_s", "url", "runtime")}
                        | {"spec_limit_tok_s": r["bandwidth_b_s"] / r["bytes"]} for _, r in over.iterrows()]
    out["other_runtimes"] = _other_runtimes(apart, full, chosen)
    return out
def _floor(pts: pd.DataFrame, floors: dict[str, float] | None) -> np.ndarray:
    """Each row's per-token floor in seconds: its back end's from POOLED (`floors` by family), else 0."""
    return pts.family.map(lambda f: (floors or {}).get(f, 0.0)).to_numpy(float)


def _own_efficiency(pts: pd.DataFrame, kinds: dict[str, float], floors: dict[str, float] | None = None
                    ) -> np.ndarray:
    """Each row's efficiency brought to its family's F16 terms (divided by its quant kind's factor), the time
    its back end's floor takes (`floors`, by family) set apart first; at most 1."""
    read_t = np.maximum(pts.t_s.to_numpy() - _floor(pts, floors), 1e-12)
    return np.minimum((pts.bytes / pts.bandwidth_b_s).to_numpy() / read_t, 1.0) / _factors(pts, kinds)


def per_device(pts: pd.DataFrame, kinds: dict[str, float] | None = None, floors: dict[str, float] | None = None
               ) -> dict[str, dict[str, Any]]:
    """{device: {family: terms}}: a device's own efficiency from its own published rows of a family (the median
    of bytes / (spec bandwidth x time), each row divided by its quant kind's factor), and its error where its
    rows come from two sources or more (each source's rows predicted by the others'). A device that llama.cpp
    drives far from its spec bandwidth (the MI300X's ROCm rows) keeps its own figure instead of its family's."""
    kinds = kinds or {}
    out: dict[str, dict[str, Any]] = {}
    loso = leave_one_source_out_on_device(pts, floors)
    for (dev, fam), d in pts.groupby(["device", "family"]):
        apes = loso[pts.index.get_indexer(d.index)]
        apes = apes[~np.isnan(apes)]
        out.setdefault(dev, {})[fam] = {
            "efficiency": float(np.median(_own_efficiency(d, kinds, floors))), "n_rows": int(len(d)),
            "overhead_s": float((floors or {}).get(fam, 0.0)),
            "models": sorted(set(map(str, d.model))), "sources": sorted(set(d.source)),
            "held_out": {"method": "each source's rows on this device predicted by its other sources' rows",
                         "n_all": len(apes), "all": error_stats(apes) if len(apes) else None}}
    return out


def leave_one_source_out_on_device(pts: pd.DataFrame, floors: dict[str, float] | None = None) -> np.ndarray:
    """Per row, |its rate / the rate its device's rows of its family from other sources predict - 1| (their
    median efficiency in F16 terms, times the row's quant kind factor, the factors fitted without the row's
    source, after the back end's floor where `floors` gives one); NaN where no other source has a row on that
    device and family."""
    out = np.full(len(pts), np.nan)
    kinds_without: dict[str, dict[str, float]] = {}
    for _, d in pts.groupby(["device", "family"]):
        if d.source.nunique() < 2:
            continue
        pos = pts.index.get_indexer(d.index)
        for src in d.source.unique():
            if src not in kinds_without:
                kinds_without[src] = fit_kinds(pts[pts.source != src])[1]
            k = kinds_without[src]
            mine, rest = (d.source == src).to_numpy(), (d.source != src).to_numpy()
            ref = float(np.median(_own_efficiency(d[rest], k, floors)))
            dm = d[mine]
            pred_t = _floor(dm, floors) + (dm.bytes / dm.bandwidth_b_s).to_numpy() / (ref * _factors(dm, k))
            out[pos[mine]] = np.abs(pred_t / dm.t_s.to_numpy() - 1)
    return out


def _other_runtimes(rows: pd.DataFrame, params: dict[str, Any] | None, model: str = OVERHEAD
                    ) -> dict[str, dict[str, Any]]:
    """Rows of runtimes other than the fit's (a fork's, or a source that names none), apart: per runtime, its
    rows and devices and, against the llama.cpp fit (that never saw them), measured / predicted tok/s."""
    out: dict[str, dict[str, Any]] = {}
    for rt, d in rows.groupby("runtime"):
        pred = predict_t(d, params, model) if params else np.full(len(d), np.nan)
        ratio = pred / d.t_s.to_numpy()  # measured tok/s / predicted tok/s
        ok = ~np.isnan(ratio)
        out[str(rt)] = {"n_rows": int(len(d)), "devices": sorted(d.device.unique()),
                        "sources": sorted(d.source.unique()),
                        "measured_over_fit_median": float(np.median(ratio[ok])) if ok.any() else None,
                        "n_predicted": int(ok.sum())}
    return out


SHIPPED = Path(__file__).resolve().parent.parent / "data" / "crossgpu.json"


def load_shipped() -> dict[str, Any]:
    """The cross-device calibration shipped with the package (harness/data/crossgpu.json, built from
    data/published/ by scripts/ship-crossgpu.py): what `estimate` uses on a GPU and the report's page-on-GPUs
    section shows."""
    return json.loads(SHIPPED.read_text())


DEFAULT_BACKEND = {"nvidia": "cuda", "amd": "rocm", "apple": "metal"}


def predict_tok_s(cal: dict[str, Any], vendor: str, bandwidth_gb_s: float, bytes_per_token: float,
                  quant: str | None = None, backend: str | None = None, device: str | None = None,
                  hbm: bool = False) -> tuple[float | None, dict[str, Any] | None, str]:
    """tg tok/s of a `quant` file of `bytes_per_token` on a device of `vendor`, spec bandwidth and memory from
    the cross-device calibration: (tok/s, the terms used with their held-out error and the quant kind's
    factor, what they are or why none). A `device` with two or more published rows of the family has its own
    terms ("<family> on <device>", basis "device"); else the family's; None where no published row is of that
    family."""
    family = family_of(vendor, backend or DEFAULT_BACKEND.get(vendor, "cpu"), hbm)
    kind = quant_kind(quant)
    factor = (cal.get("kinds") or {}).get(kind, {}).get("factor", 1.0)
    own = ((cal.get("per_device") or {}).get(device or "") or {}).get(family)
    if own and own["n_rows"] >= 2 and own["efficiency"] > 0 and cal.get("own_rows_first", True):
        return _rate(own, factor, bandwidth_gb_s, bytes_per_token), \
            {**own, "devices": [device], "basis": "device", "kind": kind, "kind_factor": factor}, \
            f"{family} on {device}"
    fam = _terms(cal.get("families") or {}, family)
    if fam is None and cal.get("chosen") == POOLED:  # no row of the family: its back end's terms
        b = (cal.get("backends") or {}).get(backend_of(family))
        fam = {**b, "basis": "backend", "n_small_rows": 0, "held_out": {}} if b else None
    rate = _rate(fam, factor, bandwidth_gb_s, bytes_per_token)
    if rate is None:
        have = ", ".join(sorted(cal.get("families") or {})) or "none"
        return None, None, f"no published rows of {family} (families with rows: {have})"
    return rate, {**fam, "kind": kind, "kind_factor": factor}, family


def _terms(families: dict[str, Any], family: str) -> dict[str, Any] | None:
    """A family's terms; the plain model's are per vendor x backend, so an HBM family takes its base's."""
    return families.get(family) or families.get(family.removesuffix("-hbm"))


def _rate(terms: dict[str, Any] | None, factor: float, bandwidth_gb_s: float, bytes_per_token: float
          ) -> float | None:
    """tok/s = 1 / (overhead + bytes / (efficiency x kind factor x bandwidth)); None without usable terms."""
    if not terms or not terms.get("efficiency") or math.isinf(terms["efficiency"]):
        return None
    return 1.0 / (terms["overhead_s"] + bytes_per_token / (terms["efficiency"] * factor * bandwidth_gb_s * 1e9))


def basis(cal: dict[str, Any], terms: dict[str, Any], family: str) -> dict[str, Any]:
    """What an estimate from predict_tok_s's `terms` rests on, and the held-out error of that case:
    {"case", "error" (error_stats or None), "n", "floor" (a sentence), "upper_bound" (no per-token floor
    behind it)}. A family (or a device) with 1B-3B rows of its own: the nested error on 1B-3B rows whose
    family kept such rows in training; one without, under POOLED: the error of predicting a family's 1B-3B rows
    with all of them withheld (its back end's floor); otherwise no floor stands behind it: an upper bound."""
    fam_name = family.split(" on ")[0]
    b = (cal.get("backends") or {}).get(backend_of(fam_name)) if cal.get("chosen") == POOLED else None
    cases = (cal.get("held_out") or {}).get("cases") or {}
    if terms.get("basis") == "device":  # its own rows' efficiency; the floor its family's or back end's
        own = (any(size_label_b(m, None) <= SMALL_MAX_B for m in terms.get("models") or [])
               or bool(((cal.get("families") or {}).get(fam_name) or {}).get("n_small_rows")))
    else:
        own = bool(terms.get("n_small_rows")) or bool((terms.get("held_out") or {}).get("n_small"))
    floor = (f"the {b and backend_of(fam_name)} back end's per-token floor, {b['overhead_s'] * 1e3:.2f} ms, "
             + (f"from {b['n_small']} 1B-3B rows of its devices" if b["n_small"] else
                "borrowed from the other back ends (no 1B-3B row of it is published)")) if b else None
    if own:
        c = cases.get(CASE_OWN) or {}
        return {"case": CASE_OWN, "error": c.get("small"), "n": c.get("n_small", 0), "floor": floor,
                "upper_bound": False}
    if b is not None:
        c = cases.get(CASE_BORROWED) or {}
        return {"case": CASE_BORROWED, "error": c.get("small"), "n": c.get("n_small", 0), "floor": floor,
                "upper_bound": False}
    return {"case": "no 1B-3B row behind it", "error": None, "n": 0, "floor": None, "upper_bound": True}


def tok_s_range(tok_s: float, err: dict[str, float] | None) -> tuple[float, float] | None:
    """The measured rate an estimate's held-out RMS error allows: the error is |predicted / measured - 1|,
    so measured in [estimate / (1 + RMS), estimate / (1 - RMS)] (no upper end at RMS >= 1)."""
    if not err or err.get("rms_ape") is None or math.isnan(err["rms_ape"]):
        return None
    r = err["rms_ape"]
    return float(tok_s / (1 + r)), float(tok_s / (1 - r) if r < 1 else math.inf)


def rests_on_small_rows(terms: dict[str, Any]) -> bool:
    """Whether terms from predict_tok_s rest on any row of a 1B-3B model (by llama.cpp's size label): where
    none does, the per-token floor a 1B model meets on a fast device is not in them (an upper bound)."""
    if terms.get("basis") == "device":
        return any(size_label_b(m, None) <= SMALL_MAX_B for m in terms.get("models") or [])
    return bool((terms.get("held_out") or {}).get("n_small"))


def other_tok_s(cal: dict[str, Any], vendor: str, bandwidth_gb_s: float, bytes_per_token: float,
                quant: str | None = None, backend: str | None = None, hbm: bool = False) -> float | None:
    """The same from the candidate model not chosen (its family terms): where the two disagree, the published
    rows could not tell them apart there."""
    o = cal.get("other_fit") or {}
    family = family_of(vendor, backend or DEFAULT_BACKEND.get(vendor, "cpu"), hbm)
    fam = (_pooled_terms(o, family) if cal.get("other") == POOLED else _terms(o.get("families") or {}, family))
    return _rate(fam, (o.get("kinds") or {}).get(quant_kind(quant), 1.0), bandwidth_gb_s, bytes_per_token)


def lines(cal: dict[str, Any]) -> list[str]:
    """The cross-device calibration as text: families, the nested held-out error (the one reported), each
    candidate's and the page's rule's, the rows flagged, and the other runtimes' rows apart."""
    if not cal.get("n_rows"):
        return ["cross-device calibration: no tg rows with a size and a catalogued device"]
    rt = cal.get("runtime") or DEFAULT_RUNTIME
    out = [f"cross-device calibration: {cal['n_rows']} tg rows of {rt} on {cal['n_devices']} devices from "
           f"{cal.get('n_sources', '?')} sources; time per token = overhead + size / (efficiency x quant kind's "
           "factor x spec bandwidth), per vendor x backend, HBM parts apart; chosen: "
           f"{cal.get('chosen')} ({cal.get('chosen_by')})"]
    for f, p in cal["families"].items():
        ndev = len(p["devices"])
        out.append(f"  {f}: efficiency {p['efficiency']:.2f}"
                   + (f", overhead {p['overhead_s'] * 1e3:.2f} ms/token" if cal.get("chosen") in (OVERHEAD, POOLED)
                      else "")
                   + f" ({p['n_rows']} rows, {ndev} device{'s' if ndev != 1 else ''})")
    out.append("  quant kinds (share of the family's F16 efficiency): "
               + ", ".join(f"{k} {v['factor']:.2f} ({v['n_rows']} rows)" for k, v in (cal.get("kinds") or {}).items()))

    def fmt(x, n):
        return (f"median {x['median_ape']:.1%}, RMS {x['rms_ape']:.1%}, worst {x['worst_ape']:.1%} (n={n})"
                if x else f"- (n={n})")
    h = cal["held_out"]
    nest = h.get("nested")
    if nest:
        picks = ", ".join(f"{m} in {k}" for m, k in (nest.get("chosen_in_folds") or {}).items())
        out.append(f"  held out ({h['method']}; {h.get('n_folds')} folds, chosen {picks}): all rows "
                   f"{fmt(nest['all'], nest['n_all'])}; 1B-3B rows {fmt(nest['small'], nest['n_small'])}")
    for name in (*MODELS, "page formula"):
        e = h.get(name)
        if e is None:
            continue
        how = ("the page's own rule, its 0.65 / 0.55 and 0.1 GB, nothing fitted" if name == "page formula" else
               "each fitted, held out by source and device, no choice")
        out.append(f"  {name} ({how}): all rows {fmt(e['all'], e['n_all'])}; 1B-3B rows "
                   f"{fmt(e['small'], e['n_small'])}")
    for b, t in (cal.get("backends") or {}).items():
        out.append(f"  back end {b}: per-token floor {t['overhead_s'] * 1e3:.2f} ms ({t['floor']}; "
                   f"{t['n_small']} of its {t['n_rows']} rows 1B-3B), efficiency {t['efficiency']:.2f}")
    for case, e in (h.get("cases") or {}).items():
        out.append(f"  held out, {case}: 1B-3B rows {fmt(e['small'], e['n_small'])}")
    lofo = h.get("leave one family out") or {}
    if lofo.get("nested choice"):
        e = lofo["nested choice"]
        out.append(f"  leave one family out (a family with no published row at all; the choice nested): all rows "
                   f"{fmt(e['all'], e['n_all'])}; 1B-3B rows {fmt(e['small'], e['n_small'])}")
    lodo = h.get("leave one device out (not held out by source)")
    if lodo:
        out.append(f"  for comparison, {cal.get('chosen')} left one device out only (a source's other devices "
                   f"in the fit): all rows {fmt(lodo['all'], lodo['n_all'])}")
    chk = cal.get("per_device_check") or {}
    if chk.get("n"):
        parts = [f"{k} {fmt(v, chk['n'])}" for k, v in chk.items() if k != "n"]
        out.append("  a device with rows of its own is estimated from them: on the rows another source has on the "
                   "same device, " + "; ".join(parts))
    over = cal.get("over_spec") or []
    if over:
        out.append(f"  flagged, kept: {len(over)} rows faster than every weight read once at the spec bandwidth ("
                   + "; ".join(f"{r['device']} {r['model']} {r['tok_s']:,.0f} tok/s > {r['spec_limit_tok_s']:,.0f}"
                               for r in over[:4]) + ")")
    for name, o in (cal.get("other_runtimes") or {}).items():
        vs = (f"; measured / the {rt} fit's prediction: median {o['measured_over_fit_median']:.2f}x over "
              f"{o['n_predicted']} rows" if o.get("measured_over_fit_median") else "")
        out.append(f"  apart, not in the fit: {o['n_rows']} rows of {name} on {', '.join(o['devices'])} "
                   f"({', '.join(o['sources'])}){vs}")
    return out


# --- the page on its own GPUs --------------------------------------------------------------------------------

def page_rule_tok_s(bandwidth_gb_s: float, vendor: str, model_bytes: float) -> float:
    """The page's speed rule applied to a file of `model_bytes` (harness.catalog.page.rule_tok_s)."""
    return page.rule_tok_s(bandwidth_gb_s, vendor, model_bytes / 1e9)


def is_page_model_row(r: dict[str, Any]) -> bool:
    """Whether a published row is of what the page prints a speed for: Llama 3.2 1B (1.24 B params as llama-bench
    prints them; tied embeddings) at Q4_K_M, on llama.cpp."""
    params = r.get("params")
    return (r.get("quant") == page.SPEED_QUANT and params is not None and not pd.isna(params)
            and abs(float(params) / page.N_PARAMS - 1) < 0.02 and r.get("runtime") == "llama.cpp")


def page_gpus(xcal: dict[str, Any]) -> list[dict[str, Any]]:
    """For each GPU the page prints a speed for and each of its 12 quants: the page's tok/s (its rule), the
    cross-device estimate (None where no published row is of the GPU's family) with the family's held-out
    error, the other candidate model's estimate, and the published rows measured on that GPU, each with the
    page's rule at that row's size (extrapolated: a ratio) and, where the row is the page's own model and quant,
    whether it is inside ±20% of the printed figure."""
    sizes = (xcal.get("llama_3_2_1b") or {}).get("model_size_bytes") or {}
    out = []
    for sp in page.SPEEDS:
        d = devices.lookup(sp.device)
        published = []
        for r in xcal.get("page_gpu_rows") or []:
            if r["device"] != d.name:
                continue
            rule = page_rule_tok_s(d.bandwidth_gb_s, d.vendor, r["bytes"])
            # a verdict only against a figure the page prints: Llama 3.2 1B (1.24 B params) at Q4_K_M on this GPU
            printed = sp.tok_s if is_page_model_row(r) else None
            published.append({**r, "page_rule_tok_s": rule, "ratio": r["tok_s"] / rule, "printed_tok_s": printed,
                              "inside": abs(r["tok_s"] / printed - 1) <= page.BAND if printed else None})
        quants = []
        for q in page.BY_QUANT:
            size = sizes.get(q)
            est, fam, family = (predict_tok_s(xcal, d.vendor, d.bandwidth_gb_s, size, q, device=d.name,
                                              hbm=d.hbm) if size else (None, None, "no measured size"))
            # the other candidate only where the selection between them was close
            other = (other_tok_s(xcal, d.vendor, d.bandwidth_gb_s, size, q, hbm=d.hbm)
                     if size and xcal.get("selection_close", True) else None)
            on = basis(xcal, fam, family) if fam else None
            if on and on["error"]:
                err = on["error"]
            else:
                held = ((fam or {}).get("held_out") or {})
                err = held.get("small") or held.get("all")
            rng = tok_s_range(est, err) if est else None
            quants.append({"quant": q, "model_size_bytes": size,
                           "page_tok_s": page.page_tok_s(d.bandwidth_gb_s, d.vendor, q),
                           "estimate_tok_s": est, "family": family, "other_model_tok_s": other,
                           "case": on["case"] if on else None, "range_tok_s": list(rng) if rng else None,
                           "rests_on_small_rows": (not on["upper_bound"]) if on else None,
                           "held_out_median": err["median_ape"] if err else None,
                           "held_out_worst": err["worst_ape"] if err else None})
        out.append({"device": d.name, "vendor": d.vendor, "bandwidth_gb_s": d.bandwidth_gb_s,
                    "page_printed_tok_s": sp.tok_s, "quants": quants, "published": published})
    return out
