"""The report's figures (matplotlib, rendered to PNG bytes): speed and memory against the page, the roofline
of the calibration, memory against context."""

from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd

from harness.analysis import fit, points
from harness.catalog import page
from harness.report.tables import GB, MIB

log = logging.getLogger(__name__)

# --- figures ----------------------------------------------------------------------------------------------------

def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_speed(t: pd.DataFrame, device: dict) -> bytes:
    """Measured tg tok/s per quant (bars, min-max whiskers) against the page's printed figure with its +-20%
    band where it prints one, its rule extrapolated (hollow, no band) elsewhere, and the calibrated held-out
    prediction."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = np.arange(len(t))
    tg = t.tg_tok_s.to_numpy(float)
    half = tg * t.tg_spread.fillna(0).to_numpy(float)
    ax.bar(x, tg, color="#4c72b0", label="measured tg (median, min-max)", yerr=[half, half], capsize=3)
    pg = t.page_tok_s.to_numpy(float)
    if np.isfinite(pg).any():
        ax.errorbar(x, pg, yerr=[pg * page.BAND, pg * page.BAND], fmt="D", color="#c44e52", capsize=6,
                    label="page's printed figure ±20%")
    rule = t.page_rule_tok_s.to_numpy(float) if "page_rule_tok_s" in t else np.full(len(t), np.nan)
    rule = np.where(np.isfinite(pg), np.nan, rule)  # where it prints a figure, that figure is shown
    if np.isfinite(rule).any():
        ax.plot(x, rule, "D", mfc="none", color="#c44e52", label="page's rule, extrapolated (no figure printed)")
    pg = np.concatenate([pg, rule])
    cal = t.calibrated_tok_s.to_numpy(float)
    if np.isfinite(cal).any():
        ax.plot(x, cal, "o", color="#55a868", label="calibrated (held out)")
    vals = np.concatenate([tg[np.isfinite(tg)], pg[np.isfinite(pg)], cal[np.isfinite(cal)]])
    if len(vals) and vals.min() > 0 and vals.max() / vals.min() > 8:
        ax.set_yscale("log")
    ax.set_xticks(x, t.quant, rotation=45, ha="right")
    ax.set_ylabel("tokens/s (generation)")
    ax.set_title(f"Generation speed on {device.get('name')}: measured vs the page")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def fig_memory(t: pd.DataFrame, device: dict) -> bytes:
    """What each quant needs, stacked as weights (repacked weights counted once) / KV / compute, with the
    measured peak marked, beside the page's VRAM."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = np.arange(len(t))
    w = 0.4
    bottom = np.zeros(len(t))
    colors = {"weights_needed_bytes": "#4c72b0", "kv_bytes": "#dd8452", "compute_bytes": "#55a868"}
    for col, label in (("weights_needed_bytes", "weights"), ("kv_bytes", "KV cache"), ("compute_bytes", "compute")):
        v = np.maximum(np.nan_to_num(t[col].to_numpy(float) / MIB), 0)
        ax.bar(x - w / 2, v, w, bottom=bottom, color=colors[col], label=label)
        bottom += v
    gpu = device.get("peak_source") == "gpu"
    peak_label = "NVML peak (device)" if gpu else "peak RSS (incl. reclaimable file pages)"
    ax.plot(x - w / 2, np.nan_to_num(t.peak_bytes.to_numpy(float) / MIB), "k_", markersize=14, label=peak_label)
    ax.bar(x + w / 2, np.nan_to_num(t.page_vram_bytes.to_numpy(float) / MIB), w, color="#c44e52", alpha=0.7,
           label="page's VRAM")
    ax.set_xticks(x, t.quant, rotation=45, ha="right")
    ax.set_ylabel("MiB")
    ax.set_title("Memory: needed (left) vs the page's VRAM (right)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def fig_roofline(cal: dict, device: dict) -> bytes:
    """tg tok/s against bytes read per token: measured points by quant family, the bandwidth roofline
    (every byte read once at the device's bandwidth), the page's line, and the fitted model per family (a
    probe model depends on each file's tensor types, not on bytes alone: its fitted and held-out values are
    drawn per quant instead of a curve)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    tg = cal.get("tg") or {}
    pts = pd.DataFrame(tg.get("points", []))
    if pts.empty:
        ax.text(0.5, 0.5, "no tg measurements", ha="center", transform=ax.transAxes)
        return _png(fig)
    pts["family"] = [points.quant_family(q) for q in pts.quant]
    pts["type"] = [points.quant_type(q) for q in pts.quant]
    gb = pts.bytes_per_token.to_numpy(float) / GB
    xs = np.linspace(gb.min() * 0.8, gb.max() * 1.15, 100)
    bw = device.get("bandwidth_gb_s")
    if bw:
        ax.plot(xs, bw / xs, "k--", lw=1, label=f"roofline: {bw:,.1f} GB/s / bytes")
        ax.plot(xs, bw * page.efficiency(device.get("vendor")) / xs, ":", color="#c44e52", lw=1,
                label=f"page: x {page.efficiency(device.get('vendor'))} efficiency")
    markers = {"iq": "s", "k": "o", "legacy": "^", "float": "v", "other": "x"}
    n_params = (cal.get("model") or {}).get("n_params") or points.ARCH.n_params()
    per_quant = bool((tg.get("params") or {}).get("kernel_factor"))  # a probe model: no curve in bytes alone
    for fam, d in pts.groupby("family"):
        ax.scatter(d.bytes_per_token / GB, d.measured_tok_s, marker=markers.get(fam, "x"), s=40,
                   label=f"measured, {fam} quants", zorder=3)
        if per_quant:
            continue
        curve = pd.DataFrame({"quant": "curve", "bytes_per_token": xs * GB, "n_params": n_params,
                              "family": fam, "type": "-"})
        params = {k: v for k, v in (tg.get("params") or {}).items() if not k.startswith("per_weight:type:")}
        ax.plot(xs, 1 / fit.predict(curve, params, "t_s"), lw=1, alpha=0.8, label=f"fit, {fam}")
    if per_quant:
        ax.scatter(gb, pts.fitted_tok_s, marker="_", s=200, color="k", lw=1.5, zorder=4,
                   label="fit (probe kernels, each quant's own tensor types)")
        ax.scatter(gb, pts.loqo_tok_s, marker="o", s=60, facecolors="none", edgecolors="#555", zorder=4,
                   label="held out (LOQO)")
    for r in pts[pts.n_depth == pts.n_depth.min()].itertuples():
        ax.annotate(r.quant, (r.bytes_per_token / GB, r.measured_tok_s), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    top = pts.measured_tok_s.max()
    ax.set_ylim(0, top * 2 if not bw else min(top * 2.5, max(bw / xs.min(), top) * 1.05))
    ax.set_xlabel("GB read per generated token (weights + KV cache)")
    ax.set_ylabel("tokens/s (generation)")
    ax.set_title(f"tok/s vs bytes per token on {device.get('name')} (fit: {tg.get('chosen')})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def fig_context(ctx: pd.DataFrame) -> bytes:
    """Peak memory and tg tok/s against the context length, one line per quant."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    order = {q: i for i, q in enumerate(page.BY_QUANT)}
    names = sorted(ctx.quant.unique(), key=lambda q: (order.get(q, len(order)), q))
    colors = plt.get_cmap("tab20")
    for i, q in enumerate(names):
        d = ctx[ctx.quant == q].sort_values("n_depth")
        style = {"marker": "o", "ms": 3, "label": q, "color": colors(i % 20)}
        if "peak_bytes" in d and d.peak_bytes.notna().any():
            a1.plot(d.n_depth, d.peak_bytes / MIB, **style)
        if "tok_s" in d and d.tok_s.notna().any():
            a2.plot(d.n_depth, d.tok_s, **style)
    a1.set_xlabel("tokens in the KV cache (depth)")
    a1.set_ylabel("peak memory, MiB")
    a1.set_title("Memory vs context")
    a2.set_xlabel("tokens in the KV cache (depth)")
    a2.set_ylabel("tg tokens/s")
    a2.set_title("Generation speed vs context")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a2.legend(fontsize=7, ncol=2)
    return _png(fig)


# --- the report -------------------------------------------------------------------------------------------------

def fig_context_memory(t: pd.DataFrame, ctxp: pd.DataFrame, device: dict) -> bytes:
    """Memory needed against the context size, one line per KV type for the smallest and largest quant
    measured, and the page's VRAM (no context term) as flat lines."""
    from harness.report.tables import KV_PAIRS, context_memory

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    sizes = sorted(ctxp.n_ctx.unique())
    tt = t[t.weights_needed_bytes.notna()].sort_values("weights_needed_bytes")
    picks = [tt.iloc[0], tt.iloc[-1]] if len(tt) > 1 else [tt.iloc[0]] if len(tt) else []
    styles = {("f16", "f16"): "-", ("q8_0", "q8_0"): "--", ("q4_0", "q4_0"): ":"}
    colors = ["#4c72b0", "#dd8452"]
    for i, r in enumerate(picks):
        for kv in KV_PAIRS:
            ys = [context_memory(r.to_dict(), ctxp, device, int(n), kv) / MIB for n in sizes]
            if np.isfinite(ys).any():
                ax.plot(sizes, ys, styles[kv], marker="o", ms=3, color=colors[i], label=f"{r.quant}, KV {kv[0]}")
        if np.isfinite(r.page_vram_bytes):
            ax.axhline(r.page_vram_bytes / MIB, color=colors[i], alpha=0.4, lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("memory needed, MiB")
    ax.set_title("Memory vs context (flat lines: the page's VRAM, which has no context term)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def fig_quality(qp: pd.DataFrame) -> bytes:
    """Each quant as a point of the memory it needs (x) against its KL divergence from the reference (y, log),
    coloured by its tg speed; the quants no other beats on both axes joined and ringed (the ones worth choosing),
    the page's quality claim written beside the quants it gives one for."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    x = qp.needed_bytes.astype(float).to_numpy() / MIB
    y = qp.kld_mean.astype(float).to_numpy()
    c = qp.tg_tokens_per_s.astype(float).to_numpy()
    sc = ax.scatter(x, y, c=c, cmap="viridis", s=60, zorder=3)
    if np.isfinite(c).any():
        fig.colorbar(sc, ax=ax, label="tg tok/s (this machine)")
    front = qp[~qp.dominated].sort_values("needed_bytes")
    ax.plot(front.needed_bytes.astype(float) / MIB, front.kld_mean, "-", color="#c44e52", lw=1, zorder=2,
            label="worth choosing: no other quant needs less and loses less")
    ax.scatter(front.needed_bytes.astype(float) / MIB, front.kld_mean, s=160, facecolors="none",
               edgecolors="#c44e52", zorder=4)
    for xi, yi, q in zip(x, y, qp.quant):
        claim = page.QUALITY_CLAIMS.get(q)
        ax.annotate(q + (f"  (page: {claim})" if claim else ""), (xi, yi), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("memory needed, MiB")
    ax.set_ylabel(f"mean KL divergence from {qp.reference.iloc[0]} (log)")
    ax.set_title("Quality against memory: lower left is better")
    ax.margins(x=0.25, y=0.2)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    return _png(fig)


def fig_page_gpus(gpus: list[dict]) -> bytes:
    """Per page GPU: tok/s against the model's bytes: the page's printed figure with its ±20% band, its rule
    extrapolated to other sizes (dashed), the cross-device
    estimate for the 12 quants of Llama 3.2 1B (at their sizes), and every published measurement on that GPU
    (any model: the page's rule is for any size)."""
    from harness.analysis import crossgpu

    plt = _plt()
    fig, axes = plt.subplots(1, len(gpus), figsize=(4.2 * len(gpus), 4.2), squeeze=False)
    for ax, g in zip(axes[0], gpus):
        xs = np.geomspace(0.3e9, 20e9, 60)
        rule = np.array([crossgpu.page_rule_tok_s(g["bandwidth_gb_s"], g["vendor"], x) for x in xs])
        ax.plot(xs / GB, rule, color="#c44e52", ls="--", label="page's rule, extrapolated to other sizes")
        printed, at = g["page_printed_tok_s"], page.speed_model_gb(page.SPEED_QUANT) - page.SPEED_OVERHEAD_GB
        ax.errorbar([at], [printed], yerr=[[printed * page.BAND], [printed * page.BAND]], fmt="D", color="#c44e52",
                    capsize=5, label=f"page's printed {page.SPEED_QUANT} figure ±20%")
        est = [q for q in g["quants"] if q["estimate_tok_s"] and q.get("model_size_bytes")]
        if est:
            err = [q["estimate_tok_s"] * (q["held_out_median"] or 0) for q in est]
            ax.errorbar([q["model_size_bytes"] / GB for q in est], [q["estimate_tok_s"] for q in est],
                        yerr=[err, err], fmt="o", color="#55a868", ms=3, capsize=2,
                        label=f"estimate, 12 quants ({est[0]['family']})")
        other = [q for q in est if q.get("other_model_tok_s")]
        if other:
            ax.plot([q["model_size_bytes"] / GB for q in other], [q["other_model_tok_s"] for q in other], "x",
                    color="#8c8c8c", ms=4, label="the other candidate model")
        if g["published"]:
            ax.plot([r["bytes"] / GB for r in g["published"]], [r["tok_s"] for r in g["published"]], "*",
                    color="#4c72b0", ms=9, label="published measurement")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model size, GB")
        ax.set_title(g["device"].replace("NVIDIA GeForce ", "").replace("AMD Instinct ", ""), fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, loc="upper right")  # the rule falls to the right: the measurements sit below it
    axes[0][0].set_ylabel("tokens/s (generation)")
    return _png(fig)


def fig_serving(c: pd.DataFrame, floor: float = 0.0) -> bytes:
    """The batched test (harness.report.serving.cells): aggregate S_TG (left) and each user's tg (right) against
    the number of users pl (log scale), one line per quant (a line style per cell where the run has several), min-max
    whiskers over the repetitions, the per-user floor where the config names one."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab10")
    c = c[c.s_tg.notna()]
    qs = list(dict.fromkeys(c.quant))
    cellkeys = list(dict.fromkeys(zip(c.pp, c.tg, c.pps)))
    styles = ["-", "--", ":", "-."]
    for (quant, pp, tg, pps), d in c.groupby(["quant", "pp", "tg", "pps"], sort=False):
        d = d.sort_values("pl")
        k = cellkeys.index((pp, tg, pps))
        label = quant + (f", pp {pp} tg {tg}" + (" shared" if pps else "") if len(cellkeys) > 1 else "")
        style = {"marker": "o", "ms": 4, "capsize": 3, "color": colors(qs.index(quant) % 10),
                 "ls": styles[k % len(styles)], "label": label}
        for ax, col in ((a1, "s_tg"), (a2, "per_user")):
            y = d[col].to_numpy(float)
            lo, hi = d[f"{col}_min"].to_numpy(float), d[f"{col}_max"].to_numpy(float)
            err = [np.nan_to_num(y - lo), np.nan_to_num(hi - y)]
            ax.errorbar(d.pl, y, yerr=err, **style)
    if floor:
        a2.axhline(floor, color="#c44e52", lw=1, ls="--", label=f"floor {floor:g} tok/s per user")
    pls = sorted(c.pl.unique())
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(pls, [str(p) for p in pls])
        ax.set_xlabel("users decoding at once (pl)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    a1.set_ylabel("S_TG, tokens/s (all users)")
    a1.set_title("Aggregate generation speed")
    a2.set_ylabel("tokens/s per user (S_TG / pl)")
    a2.set_title("Each user's generation speed")
    a2.legend(fontsize=7)
    return _png(fig)


def figures(t: pd.DataFrame, ctx: pd.DataFrame, cal: dict, device: dict,
            ctxp: pd.DataFrame | None = None) -> dict[str, bytes]:
    """{file name: PNG bytes}; the context plots only where more than one depth was measured."""
    out: dict[str, bytes] = {}
    if t.empty:
        return out
    out["speed.png"] = fig_speed(t, device)
    out["memory.png"] = fig_memory(t, device)
    if cal.get("tg"):
        out["roofline.png"] = fig_roofline(cal, device)
    if len(ctx) and "n_depth" in ctx and ctx.n_depth.nunique() > 1:
        out["context.png"] = fig_context(ctx)
    if ctxp is not None and len(ctxp):
        out["context_memory.png"] = fig_context_memory(t, ctxp, device)
    return out


CAPTIONS = {
    "speed.png": "Measured generation speed per quant against the page's printed figure (±20% band) where it "
                 "prints one, its rule extrapolated (hollow) where it does not, and the calibrated model's held-out "
                 "prediction.",
    "memory.png": "Memory needed per quant (weights with repacked weights counted once, KV, compute), the "
                  "measured peak marked, beside the page's VRAM figure.",
    "context_memory.png": "Memory needed against the context size per KV cache type (the memory test), beside "
                          "the page's VRAM, which has no context term.",
    "quality.png": "Each quant's mean KL divergence from the reference against the memory it needs, coloured by its "
                   "generation speed; ringed and joined: the quants no other beats on both (worth choosing); the "
                   "page's quality claim beside the quants it gives one for.",
    "serving.png": "The batched test: aggregate generation speed (S_TG, left) and each user's (S_TG / pl, right) "
                   "against the number of users decoding at once (log scale), medians with min-max whiskers over the "
                   "repetitions.",
    "roofline.png": "Speed against bytes read per token, with the bandwidth roofline and the fitted model.",
    "context.png": "Memory and speed against the context length.",
    "page_gpus.png": "The page's GPUs: its speed rule with its ±20% band against the model's size, the "
                     "cross-device estimate for Llama 3.2 1B's 12 quants (± the held-out median error), the other "
                     "candidate model's (grey crosses: where they part, the published rows do not decide between "
                     "them on that GPU), and every published llama.cpp measurement on that GPU (blue "
                     "stars).",
}
