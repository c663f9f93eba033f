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
from harness.catalog import devices

PAGE_EFFICIENCY = {"nvidia": 0.65, "amd": 0.55}  # the page's (harness.catalog.page)
SMALL_MAX_B = 3.0  # "1B-3B" rows: by llama.cpp's size label ("llama 3B"), which older builds pair with 3.61 B
# params (tied embeddings counted twice); by the parameter count where there is no label
MAX_GEN = 512  # longer generations read a growing KV cache: not this model's work per token


def tg_rows(df: pd.DataFrame) -> pd.DataFrame:
    """tg rows at depth 0 with a size, a device in the catalog and a rate: device, family, bytes, t_s, params.
    Left out: mixtures of experts (they read their active experts only) and rows faster than every weight read
    once at the device's spec bandwidth (no dense model can be: a misprint, or not the model named)."""
    ok = df[(df.status == "ok") & (df.test == "tg") & (df.n_depth.fillna(0) == 0) & (df.n_gen <= MAX_GEN)]
    rows = []
    lines_seen: set[tuple] = set()
    for r in ok.itertuples():
        extra = r.extra if isinstance(getattr(r, "extra", None), dict) else {}
        if extra.get("line"):  # a published line: its first t/s column only (master / before: the baseline),
            key = (r.weights_ref, extra.get("file"), extra["line"])  # not one row per column of a PR comparison
            if key in lines_seen:
                continue
            lines_seen.add(key)
        if not isinstance(r.gpu_name, str) or pd.isna(r.model_size_bytes) or pd.isna(r.tokens_per_s):
            continue
        d = devices.find(r.gpu_name)
        if d is None or not d.bandwidth_gb_s:
            continue
        if isinstance(r.model_desc, str) and "moe" in r.model_desc.lower():
            continue  # a mixture of experts reads its active experts only: bytes per token != its size
        if float(r.tokens_per_s) * float(r.model_size_bytes) > d.bandwidth_gb_s * 1e9:
            continue  # faster than every weight read once at the spec bandwidth: not this model of the work
        backend = r.device if isinstance(r.device, str) else "unknown-backend"
        rows.append({"size_b": size_label_b(r.model_desc, r.model_n_params),
                     "device": d.name, "vendor": d.vendor, "family": family_of(d.vendor, backend, d.hbm),
                     "base_family": f"{d.vendor}-{backend}", "kind": quant_kind(r.quant),
                     "bandwidth_b_s": d.bandwidth_gb_s * 1e9, "bytes": float(r.model_size_bytes),
                     "params": float(r.model_n_params) if pd.notna(r.model_n_params) else math.nan,
                     "t_s": 1.0 / float(r.tokens_per_s), "tok_s": float(r.tokens_per_s), "quant": r.quant,
                     "model": r.model_desc, "source": r.weights_ref, "weights": r.weights})
    return pd.DataFrame(rows)


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
MODELS = (PLAIN, KINDS, OVERHEAD)


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


def predict_t(pts: pd.DataFrame, params: dict[str, Any], model: str = OVERHEAD) -> np.ndarray:
    out = np.full(len(pts), np.nan)
    fams = pts.base_family if model == PLAIN else pts.family
    factors = _factors(pts, params["kinds"])
    for i, (f, r) in enumerate(zip(fams, pts.itertuples())):
        p = params["families"].get(f)
        if p and p["efficiency"] not in (0, math.inf):
            out[i] = p["overhead_s"] + r.bytes / r.bandwidth_b_s / (p["efficiency"] * factors[i])
    return out


def leave_one_device_out(pts: pd.DataFrame, model: str = OVERHEAD) -> np.ndarray:
    """Predicted time per token of each row by a fit without its device's rows (NaN where its family has no
    other device)."""
    pred = np.full(len(pts), np.nan)
    for dev in pts.device.unique():
        held = (pts.device == dev).to_numpy()
        train = pts[~held]
        if not len(train):
            continue
        pred[held] = predict_t(pts[held], fit(train, model), model)
    return pred


def page_t(pts: pd.DataFrame) -> np.ndarray:
    eff = pts.vendor.map(PAGE_EFFICIENCY).to_numpy(float)
    return pts.bytes.to_numpy() / pts.bandwidth_b_s.to_numpy() / eff


def calibrate(df: pd.DataFrame) -> dict[str, Any]:
    """The cross-device calibration document: the chosen model's fit on every row, and the leave-one-device-out
    error of each model and of the page's formula, on all rows and on 1B-3B models."""
    pts = tg_rows(df)
    if pts.empty:
        return {"n_rows": 0}
    out: dict[str, Any] = {"n_rows": int(len(pts)), "n_devices": int(pts.device.nunique()),
                           "devices": sorted(pts.device.unique()), "families": {}}
    small = (pts.size_b <= SMALL_MAX_B).to_numpy()
    errs, preds = {}, {}
    for name, pred in [*((m, leave_one_device_out(pts, m)) for m in MODELS), ("page formula", page_t(pts))]:
        ape = rate_ape(pts, pred)
        preds[name] = ape
        ok = ~np.isnan(ape)
        errs[name] = {"all": error_stats(ape[ok]) if ok.any() else None, "n_all": int(ok.sum()),
                      "small": error_stats(ape[ok & small]) if (ok & small).any() else None,
                      "n_small": int((ok & small).sum())}
    # each model's error on the rows every fitted model predicts: a family with one device predicts none of
    # its rows, so the models' own n differ (the HBM split leaves the MI300X alone in its family)
    common = np.all([~np.isnan(preds[m]) for m in MODELS], axis=0)
    for m in MODELS:
        errs[m]["common"] = error_stats(preds[m][common]) if common.any() else None
        errs[m]["common_small"] = error_stats(preds[m][common & small]) if (common & small).any() else None
    out["held_out"] = {"method": "leave one device out", **errs, "n_common": int(common.sum()),
                       "n_common_small": int((common & small).sum())}

    def score(name: str) -> float:  # the page is about a 1B model: its rows decide, all rows where it has none
        e = errs[name]["small"] or errs[name]["all"]
        return e["median_ape"] if e else math.inf
    chosen = OVERHEAD if score(OVERHEAD) < score(KINDS) - 1e-9 else KINDS  # the simpler one on a tie
    out["chosen"] = chosen
    out["chosen_by"] = ("the lower leave-one-device-out median error on 1B-3B rows (all rows where none), of "
                        f"'{KINDS}' and '{OVERHEAD}'")
    out["other"] = other = OVERHEAD if chosen == KINDS else KINDS
    full = fit(pts, chosen)
    out["kinds"] = {k: {"factor": v, "n_rows": int((pts.kind == k).sum())} for k, v in full["kinds"].items()}
    out["other_fit"] = fit(pts, other)  # the candidate not chosen: shown beside, where the two disagree
    ape = preds[chosen]
    for f, p in full["families"].items():
        in_f = (pts.family == f).to_numpy()
        m = in_f & ~np.isnan(ape)
        d = pts[in_f]
        out["families"][f] = {**p, "n_rows": int(len(d)), "devices": sorted(d.device.unique()), "held_out": {
            "all": error_stats(ape[m]) if m.any() else None, "n_all": int(m.sum()),
            "small": error_stats(ape[m & small]) if (m & small).any() else None, "n_small": int((m & small).sum())}}
    out["per_device"] = per_device(pts, full["kinds"])
    # where a device has rows of its own, which predicts them better: its other rows or its family without it?
    loro = leave_one_row_out(pts, full["kinds"])
    both = ~np.isnan(loro) & ~np.isnan(ape)
    out["per_device_check"] = {
        "n": int(both.sum()), "own rows (leave one row out)": error_stats(loro[both]) if both.any() else None,
        f"family, {chosen} (leave one device out)": error_stats(ape[both]) if both.any() else None}
    return out


def _own_efficiency(pts: pd.DataFrame, kinds: dict[str, float]) -> np.ndarray:
    """Each row's efficiency brought to its family's F16 terms (divided by its quant kind's factor)."""
    return _efficiency(pts) / _factors(pts, kinds)


def per_device(pts: pd.DataFrame, kinds: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """{device: {family: terms}}: a device's own efficiency from its own published rows of a family (the median
    of bytes / (spec bandwidth x time), each row divided by its quant kind's factor), and its leave-one-row-out
    error where it has two rows or more. A device that llama.cpp drives far from its spec bandwidth (the
    MI300X's ROCm rows) keeps its own figure instead of its family's."""
    kinds = kinds or {}
    out: dict[str, dict[str, Any]] = {}
    loro = leave_one_row_out(pts, kinds)
    for (dev, fam), d in pts.groupby(["device", "family"]):
        apes = loro[pts.index.get_indexer(d.index)]
        apes = apes[~np.isnan(apes)]
        out.setdefault(dev, {})[fam] = {
            "efficiency": float(np.median(_own_efficiency(d, kinds))), "n_rows": int(len(d)), "overhead_s": 0.0,
            "models": sorted(set(map(str, d.model))),
            "held_out": {"method": "leave one row out", "n_all": len(apes),
                         "all": error_stats(apes) if len(apes) else None}}
    return out


def leave_one_row_out(pts: pd.DataFrame, kinds: dict[str, float] | None = None) -> np.ndarray:
    """Per row, |its rate / the rate its device's other rows of its family predict - 1| (the others' median
    efficiency, in F16 terms, times the row's quant kind factor); NaN where the device has no other row of
    that family."""
    kinds = kinds or {}
    out = np.full(len(pts), np.nan)
    for _, d in pts.groupby(["device", "family"]):
        eff = _own_efficiency(d, kinds)
        pos = pts.index.get_indexer(d.index)
        for k in range(len(eff)) if len(eff) > 1 else []:
            out[pos[k]] = abs(eff[k] / float(np.median(np.delete(eff, k))) - 1)
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
    if own and own["n_rows"] >= 2 and own["efficiency"] > 0:
        return _rate(own, factor, bandwidth_gb_s, bytes_per_token), \
            {**own, "devices": [device], "basis": "device", "kind": kind, "kind_factor": factor}, \
            f"{family} on {device}"
    fam = (cal.get("families") or {}).get(family)
    rate = _rate(fam, factor, bandwidth_gb_s, bytes_per_token)
    if rate is None:
        have = ", ".join(sorted(cal.get("families") or {})) or "none"
        return None, None, f"no published rows of {family} (families with rows: {have})"
    return rate, {**fam, "kind": kind, "kind_factor": factor}, family


def _rate(terms: dict[str, Any] | None, factor: float, bandwidth_gb_s: float, bytes_per_token: float
          ) -> float | None:
    """tok/s = 1 / (overhead + bytes / (efficiency x kind factor x bandwidth)); None without usable terms."""
    if not terms or not terms.get("efficiency") or math.isinf(terms["efficiency"]):
        return None
    return 1.0 / (terms["overhead_s"] + bytes_per_token / (terms["efficiency"] * factor * bandwidth_gb_s * 1e9))


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
    fam = (o.get("families") or {}).get(family_of(vendor, backend or DEFAULT_BACKEND.get(vendor, "cpu"), hbm))
    return _rate(fam, (o.get("kinds") or {}).get(quant_kind(quant), 1.0), bandwidth_gb_s, bytes_per_token)


def lines(cal: dict[str, Any]) -> list[str]:
    """The cross-device calibration as text: families and the held-out errors beside the page's formula."""
    if not cal.get("n_rows"):
        return ["cross-device calibration: no tg rows with a size and a catalogued device"]
    out = [f"cross-device calibration: {cal['n_rows']} tg rows on {cal['n_devices']} devices; "
           "time per token = overhead + size / (efficiency x quant kind's factor x spec bandwidth), per vendor x "
           f"backend, HBM parts apart; chosen: {cal.get('chosen')} ({cal.get('chosen_by')})"]
    for f, p in cal["families"].items():
        ndev = len(p["devices"])
        out.append(f"  {f}: efficiency {p['efficiency']:.2f}"
                   + (f", overhead {p['overhead_s'] * 1e3:.2f} ms/token" if cal.get("chosen") == OVERHEAD else "")
                   + f" ({p['n_rows']} rows, {ndev} device{'s' if ndev != 1 else ''})")
    out.append("  quant kinds (share of the family's F16 efficiency): "
               + ", ".join(f"{k} {v['factor']:.2f} ({v['n_rows']} rows)" for k, v in (cal.get("kinds") or {}).items()))

    def fmt(x, n):
        return f"median {x['median_ape']:.1%}, worst {x['worst_ape']:.1%} (n={n})" if x else f"- (n={n})"
    h = cal["held_out"]
    for name in (*MODELS, "page formula"):
        e = h.get(name)
        if e is None:
            continue
        how = "its own 0.65 / 0.55, nothing fitted" if name == "page formula" else h["method"]
        out.append(f"  {name}, {how}: all rows {fmt(e['all'], e['n_all'])}; 1B-3B rows "
                   f"{fmt(e['small'], e['n_small'])}")
    if h.get("n_common"):
        n, ns = h["n_common"], h["n_common_small"]
        out.append(f"  on the {n} rows every fitted model predicts ({ns} of them 1B-3B): " + "; ".join(
            f"{m} {fmt(h[m]['common'], n)}, 1B-3B {fmt(h[m]['common_small'], ns)}" for m in MODELS))
    chk = cal.get("per_device_check") or {}
    if chk.get("n"):
        parts = [f"{k} {fmt(v, chk['n'])}" for k, v in chk.items() if k != "n"]
        out.append("  a device with two rows or more is estimated from its own rows: on those rows, "
                   + "; ".join(parts))
    return out


# --- the page on its own GPUs --------------------------------------------------------------------------------

def page_rule_tok_s(bandwidth_gb_s: float, vendor: str, model_bytes: float) -> float:
    """The page's speed rule applied to a file of `model_bytes`: bandwidth / (model GB + its 0.1 GB of KV and
    overhead) x its efficiency (0.65 NVIDIA, 0.55 AMD; harness.catalog.page)."""
    from harness.catalog import page

    return bandwidth_gb_s / (model_bytes / 1e9 + page.SPEED_OVERHEAD_GB) * page.efficiency(vendor)


def page_gpus(xcal: dict[str, Any]) -> list[dict[str, Any]]:
    """For each GPU the page prints a speed for and each of its 12 quants: the page's tok/s (its rule), the
    cross-device estimate (None where no published row is of the GPU's family) with the family's held-out
    error, the other candidate model's estimate, and the published rows measured on that GPU, each with the
    page's rule at that row's size and whether the measurement is inside the page's ±20%."""
    from harness.catalog import page

    sizes = (xcal.get("llama_3_2_1b") or {}).get("model_size_bytes") or {}
    out = []
    for sp in page.SPEEDS:
        d = devices.lookup(sp.device)
        published = []
        for r in xcal.get("page_gpu_rows") or []:
            if r["device"] != d.name:
                continue
            rule = page_rule_tok_s(d.bandwidth_gb_s, d.vendor, r["bytes"])
            published.append({**r, "page_rule_tok_s": rule, "ratio": r["tok_s"] / rule,
                              "inside": abs(r["tok_s"] / rule - 1) <= page.BAND})
        quants = []
        for q in page.BY_QUANT:
            size = sizes.get(q)
            est, fam, family = (predict_tok_s(xcal, d.vendor, d.bandwidth_gb_s, size, q, device=d.name,
                                              hbm=d.hbm) if size else (None, None, "no measured size"))
            other = other_tok_s(xcal, d.vendor, d.bandwidth_gb_s, size, q, hbm=d.hbm) if size else None
            held = ((fam or {}).get("held_out") or {})
            err = held.get("small") or held.get("all")
            quants.append({"quant": q, "model_size_bytes": size,
                           "page_tok_s": page.page_tok_s(d.bandwidth_gb_s, d.vendor, q),
                           "estimate_tok_s": est, "family": family, "other_model_tok_s": other,
                           "rests_on_small_rows": rests_on_small_rows(fam) if fam else None,
                           "held_out_median": err["median_ape"] if err else None,
                           "held_out_worst": err["worst_ape"] if err else None})
        out.append({"device": d.name, "vendor": d.vendor, "bandwidth_gb_s": d.bandwidth_gb_s,
                    "page_printed_tok_s": sp.tok_s, "quants": quants, "published": published})
    return out
