"""Statistics shared by the analysis and the report (a leaf: imports nothing of the harness)."""

from __future__ import annotations

import math

import pandas as pd


def spread(med, lo, hi) -> float:
    """Half the min-max range, relative to the median (NaN where there is no measurement)."""
    if med is None or pd.isna(med) or not med or lo is None or pd.isna(lo):
        return math.nan
    return (hi - lo) / 2 / med
