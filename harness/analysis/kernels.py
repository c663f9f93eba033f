"""Kernel costs from the kernel probes' records (:mod:`harness.sources.probes` builds the probe models): per ggml
type, the probe's tg speed and its time per token per weight, which the calibration sums over a file's tensors."""

from __future__ import annotations

from harness import stats


def costs(df) -> dict[str, dict[str, float]]:
    """Per ggml type, from probe records (a DataFrame of tg records, `quant` = type): the median tok/s, the
    seconds per token per weight (`s_per_weight`), the repetitions and their relative spread."""
    out: dict[str, dict[str, float]] = {}
    if df is None or not len(df):
        return out
    ok = df[(df.status == "ok") & (df.test == "tg")]
    for t, d in ok.groupby("quant", sort=False):
        tok = d.tokens_per_s.astype(float)
        n_w = d.model_n_params.dropna()
        if not len(n_w) or not len(tok):
            continue
        med = float(tok.median())
        out[str(t)] = {
            "tok_s": med, "n": int(len(tok)), "n_weights": int(n_w.iloc[0]),
            "s_per_weight": 1.0 / med / float(n_w.iloc[0]),
            "spread": stats.spread(med, float(tok.min()), float(tok.max())),
        }
    return out
