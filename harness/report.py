"""The report of one run: the page's predictions beside the measurements, per quant, with verdicts.

``python -m harness report RESULTS_DIR [--out DIR]`` reads ``records.jsonl`` and ``env.json`` and writes
``reports/<run-id>/``: ``report.md``, a self-contained ``report.html`` (figures embedded as PNG),
``summary.csv`` (the per-quant table) and ``calibration.json`` (:mod:`harness.calibrate`).

Every table and figure is a pure function of the records DataFrame, the environment dict and the
calibration dict, so the report is tested on records made in the test.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness import calibrate, page, probes, schema, summary

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REPORTS = REPO / "reports"
MIB = 1024 * 1024
GB = 1e9

WEIGHTS_MEANING = {
    "synthetic": "Llama 3.2 1B's exact architecture and tensor shapes with seeded random weights, "
                 "quantized by llama.cpp. Speed and memory stand for the real model (same shapes, same quant "
                 "types); quality does not.",
    "hub": "the real weights, downloaded from the Hugging Face Hub.",
    "local": "local GGUF files given in the config.",
}


# --- loading --------------------------------------------------------------------------------------------------

class ReportError(ValueError):
    pass


def load_run(results_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """The records (as a DataFrame) and env.json of a results folder."""
    results_dir = Path(results_dir)
    rec = results_dir / "records.jsonl"
    if not rec.is_file():
        raise ReportError(f"{results_dir}: no records.jsonl (not a results folder of this harness)")
    df = summary.records_frame(schema.read_records(rec))
    env_path = results_dir / "env.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    return df, env


def load_probes(results_dir: str | Path) -> pd.DataFrame | None:
    """The kernel-probe records of a results folder (probes.jsonl), None where the run measured none."""
    path = Path(results_dir) / "probes.jsonl"
    if not path.is_file():
        return None
    return summary.records_frame(schema.read_records(path))


# --- tables ---------------------------------------------------------------------------------------------------

def verdict(measured: float | None, predicted: float | None, band: float = page.BAND) -> str:
    """'inside (+7%)' or 'outside (-63%: 43 points beyond +-20%)' for measured against a prediction."""
    if measured is None or predicted is None or pd.isna(measured) or pd.isna(predicted) or not predicted:
        return "-"
    dev = measured / predicted - 1
    if abs(dev) <= band:
        return f"inside ({dev:+.0%})"
    return f"outside ({dev:+.0%}: {(abs(dev) - band) * 100:.0f} points beyond ±{band:.0%})"


def inside(measured: float | None, predicted: float | None, band: float = page.BAND) -> bool | None:
    if measured is None or predicted is None or pd.isna(measured) or pd.isna(predicted) or not predicted:
        return None
    return abs(measured / predicted - 1) <= band


def _nan(v) -> float:
    return math.nan if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def quant_table(df: pd.DataFrame, device: dict, cal: dict | None = None) -> pd.DataFrame:
    """One row per quant, at the shallowest depth measured: measured tok/s and memory, the page's figures for
    this device, ratios and verdicts, the calibrated (held-out) tok/s, true bits per weight and file size."""
    s = summary.per_quant(df)
    if s.empty:
        return pd.DataFrame()
    mem = calibrate.memory_points(df, device.get("peak_source", "rss"))
    tg_fit = pd.DataFrame((cal or {}).get("tg", {}).get("points", []) if cal and cal.get("tg") else [])
    bw, vendor = device.get("bandwidth_gb_s"), device.get("vendor")
    rows = []
    for quant, qs in s.groupby("quant", sort=False):
        depths = qs.n_depth.dropna()
        r = qs[qs.n_depth == depths.min()].iloc[0] if len(depths) else qs.iloc[0]
        depth = None if pd.isna(r.n_depth) else int(r.n_depth)
        on_page = quant in page.BY_QUANT
        row: dict[str, Any] = {
            "quant": quant, "n_depth": depth, "weights": r.weights,
            "tg_tok_s": _nan(r.tg_tokens_per_s), "tg_spread": summary.spread(r.tg_tokens_per_s, r.tg_min, r.tg_max),
            "pp_tok_s": _nan(r.pp_tokens_per_s), "pp_spread": summary.spread(r.pp_tokens_per_s, r.pp_min, r.pp_max),
            "page_tok_s": page.page_tok_s(bw, vendor, quant) if on_page and bw else math.nan,
        }
        row["tg_vs_page"] = row["tg_tok_s"] / row["page_tok_s"] if row["page_tok_s"] else math.nan
        row["tg_inside"] = inside(row["tg_tok_s"], row["page_tok_s"])
        row["tg_verdict"] = verdict(row["tg_tok_s"], row["page_tok_s"])
        fit = tg_fit[(tg_fit.quant == quant) & (tg_fit.n_depth == depth)] if len(tg_fit) else tg_fit
        row["calibrated_tok_s"] = _nan(fit.loqo_tok_s.iloc[0]) if len(fit) else math.nan
        row["tg_vs_calibrated"] = row["tg_tok_s"] / row["calibrated_tok_s"] if row["calibrated_tok_s"] else math.nan
        m = mem[(mem.quant == quant) & (mem.n_depth == depth)] if len(mem) and depth is not None else mem.iloc[0:0]
        if len(m):
            m = m.iloc[0]
            row.update({"weights_bytes": m.weights_bytes, "kv_bytes": m.kv_bytes, "compute_bytes": m.compute_bytes,
                        "peak_bytes": m.peak_bytes})
        else:
            row.update(dict.fromkeys(("weights_bytes", "kv_bytes", "compute_bytes", "peak_bytes"), math.nan))
        row["other_bytes"] = row["peak_bytes"] - row["weights_bytes"] - row["kv_bytes"] - row["compute_bytes"]
        row["page_vram_bytes"] = page.page_vram_bytes(quant) if on_page else math.nan
        row["mem_vs_page"] = row["peak_bytes"] / row["page_vram_bytes"] if on_page else math.nan
        row["mem_inside"] = inside(row["peak_bytes"], row["page_vram_bytes"])
        row["mem_verdict"] = verdict(row["peak_bytes"], row["page_vram_bytes"])
        row["file_bytes"] = _nan(r.file_bytes)
        row["page_file_bytes"] = page.page_file_bytes(quant) if on_page else math.nan
        row["file_vs_page"] = row["file_bytes"] / row["page_file_bytes"] if on_page else math.nan
        size, n = _nan(r.model_size_bytes), _nan(r.model_n_params)
        row["model_size_bytes"] = size
        row["true_bits"] = 8 * size / n if n else math.nan
        row["page_bits"] = page.BY_QUANT[quant].bits if on_page else math.nan
        row["error"] = r.error
        rows.append(row)
    return pd.DataFrame(rows)


def context_table(df: pd.DataFrame, device: dict) -> pd.DataFrame:
    """One row per (quant, depth): tg tok/s, context size, KV bytes and measured peak (for the context plots)."""
    tg = calibrate.tg_points(df)
    mem = calibrate.memory_points(df, device.get("peak_source", "rss"))
    if tg.empty and mem.empty:
        return pd.DataFrame()
    if tg.empty:
        return mem
    if mem.empty:
        return tg
    return tg.merge(mem[["quant", "n_depth", "n_ctx", "kv_bytes", "peak_bytes"]], on=["quant", "n_depth"],
                    how="outer")


def weights_statement(df: pd.DataFrame) -> str:
    kinds = sorted(df.weights.dropna().unique()) if len(df) and "weights" in df else []
    if not kinds:
        return "Weights: unknown (the records do not say)."
    refs = sorted(df.weights_ref.dropna().unique()) if "weights_ref" in df else []
    parts = [f"**{k}**: {WEIGHTS_MEANING.get(k, k)}" for k in kinds]
    ref = f" Reference: {'; '.join(refs[:3])}{' ...' if len(refs) > 3 else ''}." if refs else ""
    return "Weights: " + " ".join(parts) + ref


def device_statement(device: dict) -> str:
    bw = device.get("bandwidth_gb_s")
    bw_s = f"{bw:,.1f} GB/s ({device.get('bandwidth_source')})" if bw else device.get("bandwidth_source", "unknown")
    kind = "GPU" if device.get("kind") == "gpu" else "CPU"
    eff = page.efficiency(device.get("vendor"))
    eff_note = "" if (device.get("vendor") or "") in page.EFFICIENCY else \
        " (the page prints no figure for such a device: its text's 0.55 is applied)"
    return (f"Device: {kind} **{device.get('name')}**, memory bandwidth {bw_s}; "
            f"the page's efficiency for it: {eff}{eff_note}.")


# --- formatting -------------------------------------------------------------------------------------------------

def _f(v, fmt: str = "{:,.1f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v)


def _mib(v) -> str:
    return _f(None if v is None or pd.isna(v) else v / MIB, "{:,.0f}")


def _pct(v) -> str:
    return "" if v is None or pd.isna(v) else f"±{v * 100:.1f}%"


def _rate(v, spread) -> str:
    return f"{_f(v)} {_pct(spread)}".strip()


def _x(v) -> str:
    return _f(v, "{:.2f}x")


SPEED_HEAD = ["quant", "depth", "tg tok/s", "pp tok/s", "page tok/s", "tg / page", "verdict (page ±20%)",
              "calibrated tok/s (held out)", "tg / calibrated"]
MEMORY_HEAD = ["quant", "weights MiB", "KV MiB", "compute MiB", "other MiB", "peak MiB", "page VRAM MiB",
               "peak / page", "verdict (page ±20%)"]
SIZE_HEAD = ["quant", "true bits/weight", "page bits", "file MiB", "page file MiB", "file / page"]


def speed_rows(t: pd.DataFrame) -> list[list[str]]:
    return [[r.quant, "-" if r.n_depth is None or pd.isna(r.n_depth) else str(int(r.n_depth)),
             _rate(r.tg_tok_s, r.tg_spread), _rate(r.pp_tok_s, r.pp_spread), _f(r.page_tok_s),
             _x(r.tg_vs_page), r.tg_verdict, _f(r.calibrated_tok_s), _x(r.tg_vs_calibrated)]
            for r in t.itertuples()]


def memory_rows(t: pd.DataFrame) -> list[list[str]]:
    return [[r.quant, _mib(r.weights_bytes), _mib(r.kv_bytes), _mib(r.compute_bytes), _mib(r.other_bytes),
             _mib(r.peak_bytes), _mib(r.page_vram_bytes), _x(r.mem_vs_page), r.mem_verdict] for r in t.itertuples()]


def size_rows(t: pd.DataFrame) -> list[list[str]]:
    return [[r.quant, _f(r.true_bits, "{:.2f}"), _f(r.page_bits, "{:.2f}"), _mib(r.file_bytes),
             _mib(r.page_file_bytes), _x(r.file_vs_page)] for r in t.itertuples()]


def md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(out)


def html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _fmt_err(e: dict | None) -> str:
    if not e or e.get("median_ape") is None:
        return "-"
    return f"median {e['median_ape']:.1%}, worst {e['worst_ape']:.1%}"


def calibration_lines(cal: dict) -> list[str]:
    """The calibration in a few lines of prose (markdown)."""
    out = []
    tg = cal.get("tg")
    dev = cal.get("device") or {}
    if tg:
        out.append(f"- tg model chosen by leave-one-quant-out error: **{tg['chosen']}** ({tg['formula']}).")
        eff = tg.get("efficiency")
        if eff:
            std = tg.get("efficiency_std")
            out.append(f"- efficiency against {dev.get('bandwidth_gb_s'):,.1f} GB/s: {eff:.3f}"
                       + (f" ± {std:.3f}" if std else "") + " (bootstrap over quants)")
        elif tg.get("efficiency_by_family") and dev.get("bandwidth_gb_s"):
            out.append(f"- efficiency against {dev['bandwidth_gb_s']:,.1f} GB/s by quant family: "
                       + ", ".join(f"{f} {e:.3f}" for f, e in tg["efficiency_by_family"].items()))
        elif dev.get("bandwidth_gb_s"):
            out.append("- no bandwidth term survives the fit: generation here is bound by compute, not memory.")
        if cal.get("probe_models_unavailable"):
            out.append(f"- probe models not fitted: {cal['probe_models_unavailable']}")
        if tg.get("kernel_factor"):
            out.append(f"- kernel term: {tg['kernel_factor']:.3f} x the kernel probes' time per token (1 would be "
                       "the probes' cost per weight carried over unchanged; see Kernel probes)")
        out.append(f"- fixed overhead per token: {tg['overhead_s_per_token'] * 1e3:.2f} ms")
        for fam, s in (tg.get("family_s_per_token") or {}).items():
            out.append(f"- compute cost of {fam} quants beyond K-quants: {s * 1e3:+.2f} ms per token")
        mix = {k: v for k, v in (tg.get("compute_ns_per_weight") or {}).items() if k.startswith("mix")}
        if mix:
            out.append("- compute cost per weight by the tensors' own types (ns per weight, relative to K-types): "
                       + ", ".join(f"{k.split(':', 1)[1]} {v:+.3f}" for k, v in mix.items()))
        out.append(f"- the page's formula on this device: {_fmt_err(tg.get('page'))}; "
                   f"calibrated, held out (LOQO): {_fmt_err(tg.get('loqo'))}")
        cand = tg.get("candidates") or {}
        if cand:
            out.append("")
            out.append(md_table(["tg model", "parameters", "LOQO median", "LOQO worst", "LOQO RMS", "in-sample median"],
                                [[n, str(c["n_params"]), _f(c["loqo_median_ape"], "{:.1%}"),
                                  _f(c["loqo_worst_ape"], "{:.1%}"), _f(c["loqo_rms_ape"], "{:.1%}"),
                                  _f(c["fit_median_ape"], "{:.1%}")] for n, c in cand.items()]))
            out.append("")
    mem = cal.get("memory")
    if mem:
        out.append(f"- memory model: **{mem['chosen']}** ({mem['formula']}); runtime overhead "
                   f"{mem['overhead_bytes'] / MIB:,.0f} MiB; held out (LOQO): {_fmt_err(mem.get('loqo'))}; "
                   f"the page's VRAM against the measured peak: {_fmt_err(mem.get('page'))}")
    else:
        out.append("- memory model: not fitted (no peak memory or buffer sizes in the records)")
    return out


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
    """Measured tg tok/s per quant (bars, min-max whiskers) against the page's prediction with its +-20%
    band, and the calibrated held-out prediction."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = np.arange(len(t))
    tg = t.tg_tok_s.to_numpy(float)
    half = tg * t.tg_spread.fillna(0).to_numpy(float)
    ax.bar(x, tg, color="#4c72b0", label="measured tg (median, min-max)", yerr=[half, half], capsize=3)
    pg = t.page_tok_s.to_numpy(float)
    if np.isfinite(pg).any():
        ax.errorbar(x, pg, yerr=[pg * page.BAND, pg * page.BAND], fmt="D", color="#c44e52", capsize=6,
                    label="page's prediction ±20%")
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
    """Measured peak memory stacked as weights / KV / compute / other, beside the page's VRAM."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = np.arange(len(t))
    w = 0.4
    bottom = np.zeros(len(t))
    colors = {"weights_bytes": "#4c72b0", "kv_bytes": "#dd8452", "compute_bytes": "#55a868",
              "other_bytes": "#8c8c8c"}
    for col, label in (("weights_bytes", "weights"), ("kv_bytes", "KV cache"), ("compute_bytes", "compute"),
                       ("other_bytes", "other (runtime)")):
        v = np.nan_to_num(t[col].to_numpy(float) / MIB)
        v = np.maximum(v, 0)
        ax.bar(x - w / 2, v, w, bottom=bottom, color=colors[col], label=label)
        bottom += v
    ax.bar(x + w / 2, np.nan_to_num(t.page_vram_bytes.to_numpy(float) / MIB), w, color="#c44e52", alpha=0.7,
           label="page's VRAM")
    ax.set_xticks(x, t.quant, rotation=45, ha="right")
    src = "NVML (device)" if device.get("peak_source") == "gpu" else "peak RSS"
    ax.set_ylabel(f"MiB ({src})")
    ax.set_title("Memory: measured (left) vs the page's VRAM (right)")
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
    pts["family"] = [calibrate.quant_family(q) for q in pts.quant]
    pts["type"] = [calibrate.quant_type(q) for q in pts.quant]
    gb = pts.bytes_per_token.to_numpy(float) / GB
    xs = np.linspace(gb.min() * 0.8, gb.max() * 1.15, 100)
    bw = device.get("bandwidth_gb_s")
    if bw:
        ax.plot(xs, bw / xs, "k--", lw=1, label=f"roofline: {bw:,.1f} GB/s / bytes")
        ax.plot(xs, bw * page.efficiency(device.get("vendor")) / xs, ":", color="#c44e52", lw=1,
                label=f"page: x {page.efficiency(device.get('vendor'))} efficiency")
    markers = {"iq": "s", "k": "o", "legacy": "^", "float": "v", "other": "x"}
    n_params = (cal.get("model") or {}).get("n_params") or calibrate.ARCH.n_params()
    per_quant = bool((tg.get("params") or {}).get("kernel_factor"))  # a probe model: no curve in bytes alone
    for fam, d in pts.groupby("family"):
        ax.scatter(d.bytes_per_token / GB, d.measured_tok_s, marker=markers.get(fam, "x"), s=40,
                   label=f"measured, {fam} quants", zorder=3)
        if per_quant:
            continue
        curve = pd.DataFrame({"quant": "curve", "bytes_per_token": xs * GB, "n_params": n_params,
                              "family": fam, "type": "-"})
        params = {k: v for k, v in (tg.get("params") or {}).items() if not k.startswith("per_weight:type:")}
        ax.plot(xs, 1 / calibrate.predict(curve, params, "t_s"), lw=1, alpha=0.8, label=f"fit, {fam}")
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

def figures(t: pd.DataFrame, ctx: pd.DataFrame, cal: dict, device: dict) -> dict[str, bytes]:
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
    return out


CAPTIONS = {
    "speed.png": "Measured generation speed per quant against the page's prediction (±20% band) and the "
                 "calibrated model's held-out prediction.",
    "memory.png": "Measured peak memory split into llama.cpp's weights, KV and compute buffers and the rest, "
                  "beside the page's VRAM figure.",
    "roofline.png": "Speed against bytes read per token, with the bandwidth roofline and the fitted model.",
    "context.png": "Memory and speed against the context length.",
}


def probe_rows(cal: dict, probe_df: pd.DataFrame | None) -> list[list[str]]:
    """One row per probed tensor type: its probe's speed, cost per weight, and the weights of it per quant."""
    costs = cal.get("probes") or {}
    ref = (costs.get("Q4_K") or min(costs.values(), key=lambda c: c["s_per_weight"])) if costs else None
    quants = cal.get("quants") or {}
    rows = []
    for t, c in sorted(costs.items(), key=lambda kv: kv[1]["s_per_weight"]):
        used = [q for q, info in quants.items() if (info.get("tensor_types") or {}).get(t)]
        rows.append([t, _rate(c["tok_s"], c.get("spread")), str(c["n"]), f"{c['s_per_weight'] * 1e12:,.1f}",
                     f"{c['s_per_weight'] / ref['s_per_weight']:.2f}", ", ".join(used) or "-"])
    errors = probe_df[probe_df.status == "error"] if probe_df is not None and len(probe_df) else None
    if errors is not None:
        for r in errors.itertuples():
            rows.append([str(r.quant), "failed", "0", "-", "-", str(r.error)[:120]])
    return rows


PROBE_HEAD = ["tensor type", "probe tg tok/s", "reps", "ps per weight", "vs Q4_K", "in quants"]


def _sections(df: pd.DataFrame, env: dict, t: pd.DataFrame, cal: dict, device: dict, run_id: str,
              probe_df: pd.DataFrame | None = None) -> list[tuple]:
    """The report as (kind, payload) blocks, rendered to markdown or HTML: ("h", text), ("p", markdown-ish
    text), ("list", [lines]), ("table", head, rows), ("fig", name), ("raw-md", text)."""
    ok = df[df.status == "ok"] if len(df) else df
    versions = ", ".join(sorted(ok.llama_cpp_version.dropna().unique())) if len(ok) else ""
    harness = env.get("harness") or {}
    s: list[tuple] = [("h1", f"Llama 3.2 1B quants: the page's claims vs measurements - run {run_id}")]
    s.append(("p", weights_statement(df)))
    s.append(("p", device_statement(device)))
    s.append(("p", f"llama-cpp-python {versions or '-'}; harness commit {harness.get('commit') or '-'}"
                   f"{' (dirty)' if harness.get('dirty') else ''}; environment recorded {env.get('utc') or '-'}."))
    for w in env.get("warnings") or []:
        s.append(("p", f"WARNING: {w}"))
    if not t.empty:
        n_in = int(t.tg_inside.fillna(False).astype(bool).sum())
        n_tg = int(t.tg_inside.notna().sum())
        m_in = int(t.mem_inside.fillna(False).astype(bool).sum())
        m_n = int(t.mem_inside.notna().sum())
        s.append(("p", f"The page claims its speeds are 'typically within ±20%'. Here {n_in} of {n_tg} quants' "
                       f"measured generation speed is inside that band of the page's figure for this device, and "
                       f"{m_in} of {m_n} quants' measured peak memory is inside ±20% of the page's VRAM."))
        s.append(("h2", "Speed"))
        s.append(("p", "tg: generation, tok/s median ± half the min-max range over repetitions; pp: prompt "
                       "processing. 'calibrated (held out)': the fitted model's prediction for a quant when that "
                       "quant is left out of the fit."))
        s.append(("table", SPEED_HEAD, speed_rows(t)))
        s.append(("fig", "speed.png"))
        s.append(("h2", "Memory"))
        src = ("NVML (the process's usage, else the device's growth since load)" if device.get("peak_source") ==
               "gpu" else "the process's peak resident set (VmHWM), which includes the Python runtime")
        s.append(("p", f"Peak measured from {src}. Weights, KV and compute are llama.cpp's own buffer sizes; "
                       "'other' is the peak minus those three."))
        s.append(("table", MEMORY_HEAD, memory_rows(t)))
        s.append(("fig", "memory.png"))
        s.append(("h2", "Sizes"))
        s.append(("p", "True bits per weight = 8 x llama.cpp's model size / its parameter count; file size from "
                       "disk (1 MiB = 1,048,576 bytes; the page's GB are 1e9 bytes)."))
        s.append(("table", SIZE_HEAD, size_rows(t)))
        errors = t[t.error.notna()] if "error" in t else t.iloc[0:0]
        if len(errors):
            s.append(("h2", "Failures"))
            s.append(("list", [f"{r.quant}: {r.error}" for r in errors.itertuples()]))
    prows = probe_rows(cal, probe_df)
    if prows:
        s.append(("h2", "Kernel probes"))
        first = (probe_df.weights_ref.dropna().iloc[0] if probe_df is not None and len(probe_df) else "")
        s.append(("p", "Each tensor type's own cost, measured apart from the quants: a model with this model's "
                       f"layer shapes but few layers, every matrix in that one type ({first}), run with the "
                       "same generation test between the quants. Cost per weight = time per token / the probe's "
                       "weights (the probe's per-token overhead included). The calibration's probe models sum "
                       "it over each file's tensors, so a held-out quant's kernels are known without its own "
                       "measurement."))
        s.append(("table", PROBE_HEAD, prows))
    s.append(("h2", "Calibration"))
    s.append(("raw-md", "\n".join(calibration_lines(cal))))
    if cal.get("tg"):
        s.append(("fig", "roofline.png"))
    s.append(("fig", "context.png"))
    s.append(("h2", "The page's arithmetic"))
    s.append(("p", "Every number the page prints is reproduced by: file size = 1,235,814,400 params x bits / 8 "
                   "(GB, 2 decimals); VRAM = file size x 1.10 (1 decimal); tok/s = bandwidth / (1.2B x bits / 8 "
                   "+ 0.1 GB) x efficiency (0.65 NVIDIA, 0.55 AMD), with MI300X 5300, RTX 4090 1008, H100 SXM "
                   "3352 and MI250X 3277 GB/s. Where its text and its numbers part ways:"))
    s.append(("list", list(page.DISCREPANCIES)))
    return s


def render_markdown(sections: list[tuple], figs: dict[str, bytes]) -> str:
    out = []
    for sec in sections:
        kind = sec[0]
        if kind == "h1":
            out.append(f"# {sec[1]}\n")
        elif kind == "h2":
            out.append(f"## {sec[1]}\n")
        elif kind in ("p", "raw-md"):
            out.append(sec[1] + "\n")
        elif kind == "list":
            out.append("\n".join(f"- {x}" for x in sec[1]) + "\n")
        elif kind == "table":
            out.append(md_table(sec[1], sec[2]) + "\n")
        elif kind == "fig" and sec[1] in figs:
            out.append(f"![{CAPTIONS[sec[1]]}]({sec[1]})\n\n*{CAPTIONS[sec[1]]}*\n")
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;"
        "text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}figcaption{font-size:13px;color:#555}")


def _inline_md(text: str) -> str:
    """**bold** and the escaped rest, enough for the report's own prose."""
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _md_block_to_html(text: str) -> str:
    """The calibration block: '- ' lines become a list, '|' lines a table."""
    out, items, table = [], [], []

    def flush():
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline_md(i)}</li>" for i in items) + "</ul>")
            items.clear()
        if table:
            head = [c.strip() for c in table[0].strip("|").split("|")]
            rows = [[c.strip() for c in r.strip("|").split("|")] for r in table[2:]]
            out.append(html_table(head, rows))
            table.clear()

    for line in text.splitlines():
        if line.startswith("- "):
            if table:
                flush()
            items.append(line[2:])
        elif line.startswith("|"):
            if items:
                flush()
            table.append(line)
        else:
            flush()
            if line.strip():
                out.append(f"<p>{_inline_md(line)}</p>")
    flush()
    return "\n".join(out)


def render_html(sections: list[tuple], figs: dict[str, bytes], title: str) -> str:
    body = []
    for sec in sections:
        kind = sec[0]
        if kind == "h1":
            body.append(f"<h1>{html.escape(sec[1])}</h1>")
        elif kind == "h2":
            body.append(f"<h2>{html.escape(sec[1])}</h2>")
        elif kind == "p":
            body.append(f"<p>{_inline_md(sec[1])}</p>")
        elif kind == "raw-md":
            body.append(_md_block_to_html(sec[1]))
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_md(x)}</li>" for x in sec[1]) + "</ul>")
        elif kind == "table":
            body.append(html_table(sec[1], sec[2]))
        elif kind == "fig" and sec[1] in figs:
            b64 = base64.b64encode(figs[sec[1]]).decode()
            cap = html.escape(CAPTIONS[sec[1]])
            body.append(f'<figure><img alt="{cap}" src="data:image/png;base64,{b64}">'
                        f"<figcaption>{cap}</figcaption></figure>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def gguf_tensor_types(path: str | Path) -> dict[str, int]:
    """Weights per ggml type in a GGUF file, from its header (milliseconds, where gguf.GGUFReader spends
    seconds on a 128K-token vocabulary). Raises ValueError for a file that is not a valid GGUF."""
    from harness import validate

    return validate.check(path, expect_arch=None).type_weights


def tensor_types_from_files(df: pd.DataFrame) -> dict[str, dict[str, int]] | None:
    """{quant: {ggml type: weights}} read from the GGUF files the records name, where every one of them is still
    on disk with the size it had when measured (None otherwise: the mix models then sit out)."""
    ok = df[df.status == "ok"] if len(df) else df
    out: dict[str, dict[str, int]] = {}
    for quant, d in ok.groupby("quant", sort=False):
        for path, size in zip(d.file_path, d.file_bytes):
            if not path or not Path(path).is_file() or (size and Path(path).stat().st_size != size):
                continue
            try:
                out[quant] = gguf_tensor_types(path)
            except Exception as e:  # noqa: BLE001 - the report does without the tensor types
                log.warning("cannot read the tensor types of %s: %s", path, e)
            break
        if quant not in out:
            return None
    return out or None


def build(df: pd.DataFrame, env: dict, run_id: str, results_dir: str | None = None,
          tensor_types: dict[str, dict] | None = None, probe_df: pd.DataFrame | None = None
          ) -> tuple[pd.DataFrame, dict, dict[str, bytes], str, str]:
    """Everything the report holds, computed from the records: (per-quant table, calibration, figures,
    markdown, html). `tensor_types` ({quant: {ggml type: weights}}) lets the calibration cost each tensor's
    kernel; `probe_df` (kernel-probe records) measures those costs."""
    cal = calibrate.calibrate(df, env, run_id=run_id, results_dir=results_dir, tensor_types=tensor_types,
                              probe_costs=probes.costs(probe_df))
    device = cal["device"]
    t = quant_table(df, device, cal)
    ctx = context_table(df, device)
    figs = figures(t, ctx, cal, device)
    sections = _sections(df, env, t, cal, device, run_id, probe_df)
    title = f"Llama 3.2 1B quants - run {run_id}"
    return t, cal, figs, render_markdown(sections, figs), render_html(sections, figs, title)


def write_report(results_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write report.md, report.html, summary.csv, calibration.json (and the figures as PNG files) for a
    results folder, into `out` (default: <repo>/reports/<results folder name>). Returns the folder."""
    results_dir = Path(results_dir)
    df, env = load_run(results_dir)
    run_id = results_dir.name
    out = Path(out) if out is not None else DEFAULT_REPORTS / run_id
    out.mkdir(parents=True, exist_ok=True)
    t, cal, figs, md, page_html = build(df, env, run_id, str(results_dir), tensor_types_from_files(df),
                                        load_probes(results_dir))
    for name, png in figs.items():
        (out / name).write_bytes(png)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(page_html)
    t.to_csv(out / "summary.csv", index=False)
    calibrate.write(cal, out / "calibration.json")
    log.info("report written to %s", out)
    return out


# --- command line -------------------------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="write the report of a results folder", description=(
        "Compare a run's measurements with the page's predictions and write reports/<run-id>/ (report.md, "
        "report.html, summary.csv, calibration.json)."))
    p.add_argument("results_dir", type=Path, metavar="RESULTS_DIR", help="a folder written by `harness run`")
    p.add_argument("--out", type=Path, help="report folder (default: reports/<results folder name>)")


def main(args) -> int:
    if not args.results_dir.is_dir():
        print(f"error: {args.results_dir}: no such results folder", file=sys.stderr)
        return 2
    try:
        out = write_report(args.results_dir, args.out)
    except (ReportError, schema.SchemaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0

