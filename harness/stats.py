"""Statistics shared by the analysis and the report (a leaf: imports nothing of the harness)."""

from __future__ import annotations

import math

import pandas as pd


def spread(med, lo, hi) -> float:
    """Half the min-max range, relative to the median (NaN where there is no measurement)."""
    if med is None or pd.isna(med) or not med or lo is None or pd.isna(lo):
        return math.nan
    return (hi - lo) / 2 / med


def describe(values, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """What a cell's repetitions say, as the field reports it: n, mean ± sample standard deviation (llama-bench's
    "avg ± stddev"), the median, and a 95% bootstrap interval of the median (percentile method, seeded so a
    report regenerates identically); min and max as the range. NaN where there are no values (sd and the interval
    need two)."""
    import numpy as np

    v = np.asarray([x for x in values if x is not None and not pd.isna(x)], dtype=float)
    out = {"n": int(len(v)), "mean": math.nan, "sd": math.nan, "median": math.nan, "ci_lo": math.nan,
           "ci_hi": math.nan, "min": math.nan, "max": math.nan}
    if not len(v):
        return out
    out.update(mean=float(v.mean()), median=float(np.median(v)), min=float(v.min()), max=float(v.max()))
    if len(v) >= 2:
        out["sd"] = float(v.std(ddof=1))
        rng = np.random.default_rng(seed)
        meds = np.median(v[rng.integers(0, len(v), size=(n_boot, len(v)))], axis=1)
        out["ci_lo"], out["ci_hi"] = (float(x) for x in np.percentile(meds, [2.5, 97.5]))
    return out


def overlapping(intervals: dict[str, tuple[float, float]]) -> dict[str, list[str]]:
    """For each name, the others whose interval overlaps its own: pairs a table must not rank."""
    out: dict[str, list[str]] = {}
    for a, (lo_a, hi_a) in intervals.items():
        out[a] = [b for b, (lo_b, hi_b) in intervals.items()
                  if b != a and not (math.isnan(lo_a) or math.isnan(lo_b)) and lo_a <= hi_b and lo_b <= hi_a]
    return out
