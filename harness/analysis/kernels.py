"""Kernel costs from the kernel probes' records (:mod:`harness.sources.probes` builds the probe models): per ggml
type, the probe's tg speed and its time per token per weight, which the calibration sums over a file's tensors."""

from __future__ import annotations

import pandas as pd

from harness import stats


def shape_key(extra) -> str:
    """A probe's layer shape without its layer count ("llama 2048/32/8": architecture, n_embd / n_head /
    n_head_kv), from its record's extra.shape; "" when the record has none."""
    shape = (extra or {}).get("shape") if isinstance(extra, dict) else None
    if not shape:
        return ""
    return f"{shape.get('architecture')} {shape.get('n_embd')}/{shape.get('n_head')}/{shape.get('n_head_kv')}"


def costs(df) -> dict[str, dict[str, float]]:
    """Per ggml type, from probe records (a DataFrame of tg records; `quant` = the type, "<type>@<n>L" for a
    base probe of n layers): the main probe's median tok/s, repetitions and relative spread, and the seconds per
    token per weight (`s_per_weight`). With a base probe the cost is the difference of the two probes' median
    times per token over the difference of their weights, and the probe's own per-token overhead
    (`overhead_s`) is what remains of the base probe's time; `method` says which. A type whose difference is
    not positive (noise larger than the extra layers' cost) falls back to the main probe's time over its
    weights.

    A run of models of several layer shapes (``run --model`` with two models) has probes of each shape: their
    costs are kept apart, keyed "<type> (<shape>)" ("Q4_1 (llama 576/9/3)"), so no file's kernels are costed
    with another shape's probe (the probe models then need each file's own shape, and are left out)."""
    from harness.sources.probes import split_label

    out: dict[str, dict[str, float]] = {}
    if df is None or not len(df):
        return out
    ok = df[(df.status == "ok") & (df.test == "tg")]
    keys = [shape_key(x) for x in (ok.extra if "extra" in ok else [None] * len(ok))]
    several = len(set(keys)) > 1
    groups: dict[str, dict] = {}
    for (label, key), d in ok.groupby([ok.quant.astype(str), pd.Series(keys, index=ok.index, dtype=str)],
                                      sort=False):
        t, base = split_label(str(label))
        t = f"{t} ({key})" if several else t
        tok = d.tokens_per_s.astype(float)
        n_w = d.model_n_params.dropna()
        if not len(n_w) or not len(tok):
            continue
        med = float(tok.median())
        groups.setdefault(t, {})["base" if base else "main"] = {
            "tok_s": med, "n": int(len(tok)), "n_weights": int(n_w.iloc[0]),
            "spread": stats.spread(med, float(tok.min()), float(tok.max())), "t_s": 1.0 / med,
        }
    for t, g in groups.items():
        m = g.get("main")
        if m is None:
            continue
        row = {k: m[k] for k in ("tok_s", "n", "n_weights", "spread")}
        row["s_per_weight"] = m["t_s"] / m["n_weights"]
        row["method"] = "one probe: time per token / weights (the probe's per-token overhead included)"
        b = g.get("base")
        if b is not None and m["n_weights"] > b["n_weights"]:
            diff = (m["t_s"] - b["t_s"]) / (m["n_weights"] - b["n_weights"])
            if diff > 0:
                row["s_per_weight"] = diff
                overhead = b["t_s"] - diff * b["n_weights"]
                # the probe's own per-token time: reported only where physical (a negative one says the time is
                # not linear in the layers at these sizes, e.g. caches favouring the smaller probe)
                row["overhead_s"] = overhead if overhead >= 0 else None
                if overhead < 0:
                    row["overhead_note"] = f"{overhead * 1e3:+.3f} ms: not physical, not used"
                row["base_tok_s"] = b["tok_s"]
                row["base_n_weights"] = b["n_weights"]
                row["method"] = "two probes: difference of time per token / difference of weights"
        out[t] = row
    return out
