"""The solver: linear models of time per token (or memory) over named features, fitted with non-negativity
where physics asks for it, leave-one-quant-out (LOQO) error, model choice among candidates, and a bootstrap of
the chosen model's factors."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

REF_FAMILY = "k"  # the family without a compute column of its own (the overhead carries its cost)
TYPE_RIDGE = 1.0  # penalty on per-type deviations, in units of (deviation / median time)^2
SELECT_TOLERANCE = 1.10  # a simpler model wins unless the better one's LOQO RMS error is 10% lower
SELECT_SLACK = 0.002  # ... and at least 0.2 points lower
N_BOOTSTRAP = 200


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


def feature_names(points: pd.DataFrame, kinds: Iterable[str]) -> list[str]:
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
    return name in _NONNEG or name.startswith("s_per_byte:")


def nnls(a: np.ndarray, b: np.ndarray, bounded: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """min ||a x - b|| with x[j] >= 0 where `bounded[j]`, the others free: Lawson and Hanson's active-set
    algorithm (Solving Least Squares Problems, 1974, ch. 23), a free variable written as the difference of two
    bounded ones. Exact at the optimum (the KKT conditions hold), unlike pinning negative terms one by one."""
    free_cols = np.flatnonzero(~bounded)
    # The unconstrained optimum, where it is unique and already inside the bounds, is the answer (the KKT
    # conditions hold with every variable passive): one solve instead of one per variable the loop adds.
    x0, _, rank, _ = np.linalg.lstsq(a, b, rcond=None)
    if rank == a.shape[1] and (x0[bounded] > 0).all():
        return x0
    aa = np.column_stack([a, -a[:, free_cols]]) if len(free_cols) else a
    m, n = aa.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = aa.T @ (b - aa @ x)
    tol = 10 * np.finfo(float).eps * max(1.0, np.abs(aa).max()) * max(m, n)
    for _ in range(max_iter or 3 * n):
        if passive.all() or w[~passive].max(initial=-np.inf) <= tol:
            break
        j = np.flatnonzero(~passive)[np.argmax(w[~passive])]
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(aa[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            with np.errstate(divide="ignore", invalid="ignore"):  # x = z = 0 (a column just added back): 0/0
                ratios = x[neg] / (x[neg] - z[neg])
            ratios = ratios[np.isfinite(ratios)]
            alpha = float(np.min(ratios)) if len(ratios) else 0.0
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        w = aa.T @ (b - aa @ x)
    out = x[:a.shape[1]].copy()
    if len(free_cols):
        out[free_cols] -= x[a.shape[1]:]
    return out


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


@dataclass(frozen=True)
class Design:
    """A point set as arrays, built once: the target, the part no parameter scales, and each parameter's
    feature column. Leave-one-out fits slice it by row masks instead of re-slicing the DataFrame."""
    y: np.ndarray
    fixed: np.ndarray
    cols: dict[str, np.ndarray]
    target: str

    def rows(self, mask: np.ndarray) -> Design:
        return Design(self.y[mask], self.fixed[mask], {n: c[mask] for n, c in self.cols.items()}, self.target)

    def predict(self, params: dict[str, float]) -> np.ndarray:
        out = self.fixed.copy()
        for name, value in params.items():
            if value:
                out = out + value * self.cols[name]
        return out


def design(points: pd.DataFrame, names: list[str], target: str = "t_s") -> Design:
    return Design(points[target].to_numpy(float) if target in points else np.full(len(points), np.nan),
                  _fixed(points, target, names), {n: _column(points, n) for n in names}, target)


def solve(points: pd.DataFrame | Design, names: list[str], target: str = "t_s",
          ridge: float = TYPE_RIDGE) -> dict[str, float]:
    """Least squares in relative error (each point weighted by 1/target), physical terms bounded at 0
    (bounded least squares, :func:`nnls`), per-type terms shrunk towards 0 (their family's cost). A feature
    absent from `points` gets 0."""
    d = points if isinstance(points, Design) else design(points, names, target)
    y, fixed, cols = d.y, d.fixed, d.cols
    free = [n for n in names if np.any(cols[n] != 0)]
    params = dict.fromkeys(names, 0.0)
    y_scale = float(np.median(y))
    if free:
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
        bounded = np.array([_nonneg(n, d.target, names) for n in free])
        coef = nnls(a, b, bounded) / scale
        params.update({n: float(c) for n, c in zip(free, coef)})
    return params


def predict(points: pd.DataFrame, params: dict[str, float], target: str = "t_s") -> np.ndarray:
    """The model's value of `target` at each point, from a parameter dict (fitted or read from JSON)."""
    cols = {n: _column(points, n) for n, v in params.items() if v}  # a zero term's feature may be absent here
    return Design(np.full(len(points), np.nan), _fixed(points, target, list(params)), cols, target).predict(params)


def error_stats(ape: np.ndarray) -> dict[str, float]:
    ape = np.asarray(ape, float)
    ape = ape[~np.isnan(ape)]
    if not len(ape):
        return {"median_ape": math.nan, "worst_ape": math.nan, "rms_ape": math.nan}
    return {"median_ape": float(np.median(ape)), "worst_ape": float(np.max(ape)),
            "rms_ape": float(np.sqrt(np.mean(ape**2)))}


def loqo(points: pd.DataFrame, names: list[str], target: str = "t_s", d: Design | None = None) -> np.ndarray:
    """Leave-one-quant-out predictions: each quant (all its depths) predicted by a fit to the others."""
    d = d or design(points, names, target)
    pred = np.full(len(points), np.nan)
    quants = points.quant.to_numpy()
    for q in dict.fromkeys(quants):
        held = quants == q
        if held.all():
            continue
        pred[held] = d.rows(held).predict(solve(d.rows(~held), names, target))
    return pred


def rate_ape(points: pd.DataFrame, pred_t: np.ndarray) -> np.ndarray:
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
        names = feature_names(points, c.features)
        d = design(points, names, target)
        pred = loqo(points, names, target, d)
        fitted = d.predict(solve(d, names, target))
        if target == "t_s":
            ape, fit_ape = rate_ape(points, pred), rate_ape(points, fitted)
        else:
            ape, fit_ape = _value_ape(points, pred, target), _value_ape(points, fitted, target)
        # one error per quant (its depths averaged), so a quant measured at many depths does not weigh more
        per_quant = pd.Series(ape).groupby(points.quant.to_numpy()).mean().to_numpy()
        table[c.name] = {**{f"loqo_{k}": v for k, v in error_stats(per_quant).items()},
                         **{f"fit_{k}": v for k, v in error_stats(fit_ape).items()},
                         "n_params": len(names), "description": c.description, "loqo_pred": pred}
    return pick(candidates, table), table


def nested_loqo(points: pd.DataFrame, candidates: tuple[Candidate, ...], target: str = "t_s"
                ) -> tuple[np.ndarray, dict[str, str]]:
    """The honest held-out error of the whole procedure, model choice included: for each quant, choose a model
    by LOQO on the other quants only, fit it on them, predict the quant. (predictions per point, {quant: the
    model chosen without it})."""
    pred = np.full(len(points), np.nan)
    chosen: dict[str, str] = {}
    quants = points.quant.to_numpy()
    for q in dict.fromkeys(quants):
        held = quants == q
        train = points[~held].reset_index(drop=True)
        if train.quant.nunique() < 2:
            continue
        name, _ = select(train, candidates, target)
        cand = {c.name: c for c in candidates}[name]
        names = feature_names(train, cand.features)
        pred[held] = predict(points[held], solve(train, names, target), target)
        chosen[str(q)] = name
    return pred, chosen


def nested_errors(points: pd.DataFrame, candidates: tuple[Candidate, ...], target: str = "t_s",
                  n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The nested held-out error (:func:`nested_loqo`) as median / worst / RMS over the quants, the RMS with a
    95% bootstrap interval over the quants, and the model each fold chose."""
    pred, chosen = nested_loqo(points, candidates, target)
    ape = per_quant_ape(points, pred, target)
    ape = ape[~np.isnan(ape)]
    if not len(ape):
        return {"chosen_without": chosen}
    rng = np.random.default_rng(seed)
    boots = np.sqrt(np.mean(ape[rng.integers(0, len(ape), size=(n_boot, len(ape)))] ** 2, axis=1))
    lo, hi = (float(x) for x in np.percentile(boots, [2.5, 97.5]))
    return {**error_stats(ape), "rms_ci95": [lo, hi], "chosen_without": chosen,
            "method": "for each quant, the model chosen by LOQO on the others, fitted on them"}


def per_quant_ape(points: pd.DataFrame, pred: np.ndarray, target: str = "t_s") -> np.ndarray:
    """One absolute percentage error per quant (its depths averaged), on the rate for a time target."""
    ape = rate_ape(points, pred) if target == "t_s" else _value_ape(points, pred, target)
    return pd.Series(ape).groupby(points.quant.to_numpy()).mean().to_numpy()


def pick(candidates: tuple[Candidate, ...], table: dict[str, dict]) -> str:
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
    d = design(points, names, target)
    quants = points.quant.to_numpy()
    groups = [np.flatnonzero(quants == q) for q in quant_list]
    for _ in range(n):
        pick = rng.choice(len(quant_list), size=len(quant_list), replace=True)
        sample = d.rows(np.concatenate([groups[i] for i in pick]))
        p = solve(sample, names, target)
        for k in names:
            if np.any(sample.cols[k] != 0):
                draws[k].append(p[k])
    return {k: float(np.std(v, ddof=1)) if len(v) > 2 else math.nan for k, v in draws.items()}
