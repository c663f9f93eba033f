"""The report's tables and verdicts: the page's predictions beside the measurements, per quant, and the
calibration's lines. Pure functions of the records DataFrame, the device and the calibration dict."""

from __future__ import annotations

import html
import logging
import math
from typing import Any

import numpy as np
import pandas as pd

from harness import llamalog, stats
from harness.analysis import points, summary
from harness.catalog import page
from harness.sources.tiled import WEIGHTS_REF as TILED

log = logging.getLogger(__name__)

MIB = 1024 * 1024
GB = 1e9

TILED_MEANING = ("each tensor's type is the one llama.cpp's quantizer chooses (its dry run), its first rows "
                 "llama.cpp's quantization of the seeded values and the rest made of their blocks; the file's "
                 "size is the quantizer's to the byte.")
WEIGHTS_MEANING = {
    "synthetic": "Llama 3.2 1B's exact architecture and tensor shapes with seeded random weights, "
                 "quantized by llama.cpp. Speed and memory stand for the real model (same shapes, same quant "
                 "types); quality does not.",
    "hub": "the real weights, downloaded from the Hugging Face Hub.",
    "local": "local GGUF files given in the config.",
}


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


def context_memory(row: dict, ctxp: pd.DataFrame, device: dict, n_ctx: int, kv: tuple[str, str]) -> float:
    """What a quant needs with a context of `n_ctx` tokens of K/V types `kv` (the page's "+ Context"): on a GPU
    the device memory NVML saw with that context made (this quant's memory test), else the weights (repacked
    ones once) plus llama.cpp's KV, compute and output buffers for that context."""
    quant = row["quant"]
    gpu = device.get("peak_source") == "gpu"
    if gpu and len(ctxp):
        d = ctxp[(ctxp.quant == quant) & (ctxp.n_ctx == n_ctx) & (ctxp.type_k == kv[0]) & (ctxp.type_v == kv[1])
                 & ctxp.gpu_used_bytes.notna() & ctxp.gpu_used_before_load_bytes.notna()]
        if len(d):
            d = d.assign(pref=[fa != "on" for fa in d.flash_attn]).sort_values("pref")
            return float(d.gpu_used_bytes.iloc[0] - d.gpu_used_before_load_bytes.iloc[0])
    b, _ = points.context_buffers(ctxp, quant, n_ctx, kv, device_side=gpu)
    return row.get("weights_needed_bytes", math.nan) + b


def quant_table(df: pd.DataFrame, device: dict, cal: dict | None = None,
                ctxp: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per quant, at the shallowest depth measured: measured tok/s and memory, the page's figures for
    this device, ratios and verdicts, the calibrated (held-out) tok/s, true bits per weight and file size."""
    s = summary.per_quant(df)
    if s.empty:
        return pd.DataFrame()
    mem = points.memory_points(df, device.get("peak_source", "rss"))
    tg_fit = pd.DataFrame((cal or {}).get("tg", {}).get("points", []) if cal and cal.get("tg") else [])
    bw, vendor = device.get("bandwidth_gb_s"), device.get("vendor")
    page_model = points.is_page_model(df)
    rows = []
    for quant, qs in s.groupby("quant", sort=False):
        depths = qs.n_depth.dropna()
        r = qs[qs.n_depth == depths.min()].iloc[0] if len(depths) else qs.iloc[0]
        depth = None if pd.isna(r.n_depth) else int(r.n_depth)
        on_page = page_model and quant in page.BY_QUANT
        row: dict[str, Any] = {
            "quant": quant, "n_depth": depth, "weights": r.weights,
            "tg_tok_s": _nan(r.tg_tokens_per_s), "tg_spread": stats.spread(r.tg_tokens_per_s, r.tg_min, r.tg_max),
            "pp_tok_s": _nan(r.pp_tokens_per_s), "pp_spread": stats.spread(r.pp_tokens_per_s, r.pp_min, r.pp_max),
            # the page prints a speed for Q4_K_M on four GPUs only: a verdict there, its rule extrapolated elsewhere
            "page_tok_s": float(printed.tok_s) if on_page and (printed := page.printed_speed(device.get("name"),
                                                                                               quant)) else math.nan,
            "page_rule_tok_s": page.page_tok_s(bw, vendor, quant) if on_page and bw else math.nan,
        }
        for test in ("tg", "pp"):
            for k in ("n", "mean", "sd", "ci_lo", "ci_hi"):
                v = getattr(r, f"{test}_{k}", None)
                row[f"{test}_{k}"] = _nan(v) if k != "n" else (int(v) if v is not None and not pd.isna(v) else 0)
        row["tg_vs_page"] = row["tg_tok_s"] / row["page_tok_s"] if row["page_tok_s"] else math.nan
        row["tg_vs_rule"] = row["tg_tok_s"] / row["page_rule_tok_s"] if row["page_rule_tok_s"] else math.nan
        row["tg_inside"] = inside(row["tg_tok_s"], row["page_tok_s"])
        row["tg_verdict"] = verdict(row["tg_tok_s"], row["page_tok_s"])
        fit = tg_fit[(tg_fit.quant == quant) & (tg_fit.n_depth == depth)] if len(tg_fit) else tg_fit
        row["calibrated_tok_s"] = _nan(fit.loqo_tok_s.iloc[0]) if len(fit) else math.nan
        row["tg_vs_calibrated"] = row["tg_tok_s"] / row["calibrated_tok_s"] if row["calibrated_tok_s"] else math.nan
        m = mem[(mem.quant == quant) & (mem.n_depth == depth)] if len(mem) and depth is not None else mem.iloc[0:0]
        if len(m):
            m = m.iloc[0]
            row.update({k: m[k] for k in MEMORY_COLUMNS})
        else:
            row.update(dict.fromkeys(MEMORY_COLUMNS, math.nan))
        row["page_vram_bytes"] = page.page_vram_bytes(quant) if on_page else math.nan
        for n in points.CONTEXT_COLUMNS:
            for kv in KV_PAIRS:
                row[context_key(n, kv)] = context_memory(row, ctxp if ctxp is not None else
                                                         points.context_points(None), device, n, kv)
        # the verdict is on what the run needs (on a GPU: NVML's peak; on a CPU: llama.cpp's allocations with
        # repacked weights counted once), never on RSS, which holds reclaimable file pages
        row["mem_vs_page"] = row["needed_bytes"] / row["page_vram_bytes"] if on_page else math.nan
        row["mem_inside"] = inside(row["needed_bytes"], row["page_vram_bytes"])
        row["mem_verdict"] = verdict(row["needed_bytes"], row["page_vram_bytes"])
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
    tg = points.tg_points(df)
    mem = points.memory_points(df, device.get("peak_source", "rss"))
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
    if any(TILED in str(r) for r in refs):  # runs before the tiled writer (writer version 3) quantized whole
        ref += f" {TILED}: {TILED_MEANING}"
    return "Weights: " + " ".join(parts) + ref


def device_statement(device: dict) -> str:
    bw = device.get("bandwidth_gb_s")
    bw_s = f"{bw:,.1f} GB/s ({device.get('bandwidth_source')})" if bw else device.get("bandwidth_source", "unknown")
    if device.get("kind") == "rpc":
        return (f"Device: **{device.get('name')}**: llama.cpp offloads to it as to a GPU (layers, buffers and "
                "device memory below are a device's), but its speed is its server's and the network's: not a GPU's "
                "figure, no verdict against the page's GPU rule, and no part of a GPU calibration.")
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


SPEED_HEAD = ["quant", "depth", "tg tok/s mean ± sd (n)", "tg median [95% CI]", "tg not distinguishable from",
              "pp tok/s mean ± sd (n)", "page tok/s (printed)", "tg / page", "verdict (page ±20%)",
              "page's rule, extrapolated tok/s", "tg / rule", "calibrated tok/s (held out)", "tg / calibrated"]
KV_PAIRS = (("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"))


def context_key(n_ctx: int, kv: tuple[str, str]) -> str:
    return f"needed_ctx{n_ctx}_{kv[0]}" + ("" if kv[0] == kv[1] else f"_{kv[1]}") + "_bytes"


def _ctx_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


CONTEXT_HEAD = (["quant", "page VRAM MiB"] + [f"+{_ctx_label(n)} MiB" for n in points.CONTEXT_COLUMNS]
                + ["+128K q8_0 KV MiB", "+128K q4_0 KV MiB"])


def context_rows(t: pd.DataFrame) -> list[list[str]]:
    """The page's "+ Context" column, measured: per quant, the memory needed at each context (f16 KV), and at
    128K with q8_0 and q4_0 KV; '-' where the run's memory test did not make that context."""
    rows = []
    for r in t.to_dict("records"):
        rows.append([r["quant"], _mib(r["page_vram_bytes"])]
                    + [_mib(r[context_key(n, ("f16", "f16"))]) for n in points.CONTEXT_COLUMNS]
                    + [_mib(r[context_key(131072, kv)]) for kv in KV_PAIRS[1:]])
    return rows


KV_HEAD = ["context", "K/V", "flash attention", "KV MiB", "KV MiB by arithmetic", "compute MiB", "measured on"]


def kv_rows(ctxp: pd.DataFrame, arch=None) -> list[list[str]]:
    """llama.cpp's KV and compute buffers per context, type and flash-attention setting (one quant's memory
    test: they do not depend on the weights), beside the KV arithmetic of the model's shape (from the header):
    layers x KV heads x (K + V head size x bytes per element: f16 2, q8_0 34/32, q4_0 18/32) x cells (256-cell
    padding); '-' for a model with sliding-window layers, whose cache holds a window, not the context."""
    if ctxp is None or not len(ctxp):
        return []
    per_elem = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32}
    first = ctxp.quant.iloc[0]
    d = ctxp[ctxp.quant == first].sort_values(["n_ctx", "type_k", "type_v", "flash_attn"])
    rows = []
    for r in d.itertuples():
        cells = points.kv_cells(int(r.n_ctx))
        want = math.nan
        if isinstance(arch, dict) and arch.get("sliding_window"):
            pass  # sliding-window layers keep a window, not the context: no simple arithmetic (left '-')
        elif isinstance(arch, dict) and arch.get("n_layer") and arch.get("n_head_kv") and arch.get("head_dim"):
            per = arch["n_layer"] * arch["n_head_kv"] * cells
            want = per * (arch["head_dim"] * per_elem.get(r.type_k, math.nan)
                          + (arch.get("v_head_dim") or arch["head_dim"]) * per_elem.get(r.type_v, math.nan))
        elif arch is not None and not isinstance(arch, dict):
            half = arch.n_layer * arch.n_head_kv * (arch.n_embd // arch.n_head) * cells
            want = half * (per_elem.get(r.type_k, math.nan) + per_elem.get(r.type_v, math.nan))
        fa = f"{r.flash_attn}" + (f" ({r.fa})" if r.fa and r.fa != r.flash_attn else "")
        rows.append([f"{r.n_ctx:,}", f"{r.type_k}/{r.type_v}", fa, _f(r.kv_bytes / MIB), _f(want / MIB),
                     _f(r.compute_bytes / MIB), str(first)])
    return rows


MEMORY_COLUMNS = ("weights_bytes", "weights_needed_bytes", "kv_bytes", "compute_bytes", "output_bytes", "peak_bytes",
                  "needed_bytes", "rss_anon_bytes", "rss_file_bytes")
MEMORY_HEAD = ["quant", "weights MiB", "KV MiB", "compute MiB", "needed MiB", "page VRAM MiB", "needed / page",
               "verdict (page ±20%)", "peak MiB", "anon MiB", "file MiB", "buffers as logged MiB"]
SIZE_HEAD = ["quant", "true bits/weight", "page bits", "file MiB", "page file MiB", "file / page"]


def _ci(med, lo, hi) -> str:
    if med is None or pd.isna(med):
        return "-"
    return f"{med:,.1f} [{lo:,.1f}, {hi:,.1f}]" if not pd.isna(lo) else f"{med:,.1f}"


def speed_rows(t: pd.DataFrame) -> list[list[str]]:
    """mean ± sample standard deviation (n), as llama-bench prints it; the median with its 95% bootstrap interval;
    the quants whose interval overlaps this one's (the table does not rank those)."""
    ties = stats.overlapping({r.quant: (r.tg_ci_lo, r.tg_ci_hi) for r in t.itertuples()})
    return [[r.quant, "-" if r.n_depth is None or pd.isna(r.n_depth) else str(int(r.n_depth)),
             summary.mean_sd(r.tg_mean, r.tg_sd, r.tg_n), _ci(r.tg_tok_s, r.tg_ci_lo, r.tg_ci_hi),
             ", ".join(ties.get(r.quant, [])) or "-", summary.mean_sd(r.pp_mean, r.pp_sd, r.pp_n), _f(r.page_tok_s),
             _x(r.tg_vs_page), r.tg_verdict if not pd.isna(r.page_tok_s) else "- (no figure printed)",
             _f(r.page_rule_tok_s), _x(r.tg_vs_rule), _f(r.calibrated_tok_s), _x(r.tg_vs_calibrated)]
            for r in t.itertuples()]


def memory_rows(t: pd.DataFrame) -> list[list[str]]:
    return [[r.quant, _mib(r.weights_needed_bytes), _mib(r.kv_bytes), _mib(r.compute_bytes), _mib(r.needed_bytes),
             _mib(r.page_vram_bytes), _x(r.mem_vs_page), r.mem_verdict, _mib(r.peak_bytes), _mib(r.rss_anon_bytes),
             _mib(r.rss_file_bytes), _mib(r.weights_bytes + r.kv_bytes + r.compute_bytes + r.output_bytes)]
            for r in t.itertuples()]


DEVICE_MEMORY_HEAD = ["quant", "where", "layers on device", "model on device MiB", "model on host MiB",
                      "KV on device MiB", "compute on device MiB", "compute on host MiB", "device used MiB",
                      "runtime fixed cost MiB", "used source"]


def device_memory_rows(df: pd.DataFrame) -> list[list[str]]:
    """What a quant needs on a device, line by line: its model buffers on the device and those llama.cpp keeps on
    the host (token_embd stays in CPU_Mapped), the KV and compute buffers on each side, the device memory this
    run holds (its source: the holding process's own, or the whole device's drop) and what is left of it once the
    buffers are taken away: the runtime's fixed cost (context, cuBLAS workspace, pools; for an RPC server its
    process). One row per quant and test context: the largest reading."""
    rows = []
    if df is None or not len(df) or "device" not in df:
        return rows
    ok = df[(df.status == "ok") & df.device.notna() & (df.device != "cpu")]
    for (quant, test), d in ok.groupby(["quant", "test"], sort=False):
        r = d.loc[d.device_used_bytes.fillna(-1).idxmax()] if "device_used_bytes" in d else d.iloc[0]

        def part(bufs, host: bool) -> float:
            return float(sum(v for k, v in (bufs or {}).items() if llamalog.is_host_buffer(k) == host))

        mdev, mhost = part(r.model_buffers, False), part(r.model_buffers, True)
        kv, cdev, chost = part(r.kv_buffers, False), part(r.compute_buffers, False), part(r.compute_buffers, True)
        used = r.get("device_used_bytes")
        used = None if used is None or pd.isna(used) else float(used)
        n_off, n_all = r.get("n_layers_offloaded"), r.get("n_layers_offloadable")
        layers = "-" if n_off is None or pd.isna(n_off) else f"{int(n_off)}/{int(n_all)}"
        where = f"{r.device}" + (f", {test}" if test else "")
        rows.append([str(quant), where, layers, _f(mdev / MIB), _f(mhost / MIB), _f(kv / MIB), _f(cdev / MIB),
                     _f(chost / MIB), _f(None if used is None else used / MIB),
                     _f(None if used is None else (used - mdev - kv - cdev) / MIB),
                     str(r.get("device_used_source") or "-")])
    return rows


def size_rows(t: pd.DataFrame) -> list[list[str]]:
    return [[r.quant, _f(r.true_bits, "{:.2f}"), _f(r.page_bits, "{:.2f}"), _mib(r.file_bytes),
             _mib(r.page_file_bytes), _x(r.file_vs_page)] for r in t.itertuples()]


def _fmt_err(e: dict | None) -> str:
    if not e or e.get("median_ape") is None:
        return "-"
    return f"median {_f(e['median_ape'], '{:.1%}')}, worst {_f(e.get('worst_ape'), '{:.1%}')}"


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
                   f"calibrated, held out (LOQO, the chosen model): {_fmt_err(tg.get('loqo'))}")
        nested = tg.get("nested") or {}
        if nested.get("median_ape") is not None:
            ci = [x if x is not None else math.nan for x in (nested.get("rms_ci95") or [math.nan, math.nan])]
            out.append(f"- held out with the model choice repeated inside each fold (nested; the ± of `estimate`): "
                       f"{_fmt_err(nested)}, RMS {_f(nested.get('rms_ape'), '{:.1%}')} (95% interval "
                       f"{_f(ci[0], '{:.1%}')}-{_f(ci[1], '{:.1%}')}); "
                       "chosen without each quant: "
                       + ", ".join(f"{q} {m}" for q, m in (nested.get("chosen_without") or {}).items()))
        stab = tg.get("selection_stability")
        if stab:
            out.append("- model chosen when each cell's repetitions are resampled: "
                       + ", ".join(f"{m} {f:.0%}" for m, f in stab.items()))
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
                   f"{mem['overhead_bytes'] / MIB:,.0f} MiB; held out (LOQO): {_fmt_err(mem.get('loqo'))}, nested: "
                   f"{_fmt_err(mem.get('nested'))} (across quants only: KV and compute are the same for every "
                   "quant here, so this error says nothing about them: see the memory test's terms below); "
                   f"the page's VRAM against the measured peak: {_fmt_err(mem.get('page'))}")
    else:
        out.append("- memory model: not fitted (no peak memory or buffer sizes in the records)")
    ctxm = cal.get("contexts") or {}
    if ctxm:
        out.append("- buffers against the context (memory test), each term held out one context at a time:")
        out.append("")
        rows = []
        for key, m in ctxm.items():
            h = m.get("held_out") or {}
            rows.append([key, f"{m['kv_bytes_per_cell'] / 1024:,.2f}", _fmt_err(h.get("kv")),
                         f"{m['compute_bytes_intercept'] / MIB:,.1f} + {m['compute_bytes_per_ctx_token'] / 1024:,.3f}"
                         " KiB x n_ctx", _fmt_err(h.get("compute")),
                         f"{min(m['contexts']):,}-{max(m['contexts']):,}"])
        out.append(md_table(["K/V, flash attention", "KV KiB per cell", "KV held out", "compute MiB",
                             "compute held out", "contexts"], rows))
        out.append("")
    return out


def probe_rows(cal: dict, probe_df: pd.DataFrame | None) -> list[list[str]]:
    """One row per probed tensor type: its probe's speed, cost per weight, and the weights of it per quant."""
    costs = cal.get("probes") or {}
    ref = (costs.get("Q4_K") or min(costs.values(), key=lambda c: c["s_per_weight"])) if costs else None
    quants = cal.get("quants") or {}
    rows = []
    for t, c in sorted(costs.items(), key=lambda kv: kv[1]["s_per_weight"]):
        used = [q for q, info in quants.items() if (info.get("tensor_types") or {}).get(t.split(" (")[0])]
        rows.append([t, _rate(c["tok_s"], c.get("spread")), str(c["n"]), f"{c['s_per_weight'] * 1e12:,.1f}",
                     f"{c['s_per_weight'] / ref['s_per_weight']:.2f}", ", ".join(used) or "-"])
    errors = probe_df[probe_df.status == "error"] if probe_df is not None and len(probe_df) else None
    if errors is not None:
        for r in errors.itertuples():
            rows.append([str(r.quant), "failed", "0", "-", "-", str(r.error)[:120]])
    return rows


PROBE_HEAD = ["tensor type", "probe tg tok/s", "reps", "ps per weight", "vs Q4_K", "in quants"]


def md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(out)


def html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


# --- the page on its GPUs (from the shipped cross-device calibration) -------------------------------------------

PAGE_GPU_HEAD = ["GPU", "quant", "page tok/s (its ±20%)", "cross-device estimate tok/s", "held-out error (median, "
                 "worst)", "family", "other candidate model tok/s"]
PAGE_GPU_PUBLISHED_HEAD = ["GPU", "model (as published)", "runtime", "backend", "measured tok/s",
                           "page's rule at its size (extrapolated)", "measured / rule",
                           "verdict (printed figure ±20%)", "source"]
QUALITY_HEAD = ["quant", "page's quality claim", "published figure", "metric", "source"]


def page_gpu_rows(gpus: list[dict]) -> list[list[str]]:
    rows = []
    for g in gpus:
        for q in g["quants"]:
            p = q["page_tok_s"]
            est = q["estimate_tok_s"]
            err = ("-" if q["held_out_median"] is None else
                   f"{q['held_out_median']:.0%}, {q['held_out_worst']:.0%}")
            rows.append([g["device"], q["quant"], f"{p:,.0f} ({p * 0.8:,.0f}-{p * 1.2:,.0f})",
                         f"{est:,.0f}" if est else "none", err if est else "-",
                         (q["family"] + ("" if q.get("rests_on_small_rows") else "; no 1B-3B row in it: an "
                                         "upper bound")) if est else q["family"].split(" (")[0],
                         f"{q['other_model_tok_s']:,.0f}" if q.get("other_model_tok_s") else "-"])
    return rows


def page_gpu_published_rows(gpus: list[dict]) -> list[list[str]]:
    rows = []
    for g in gpus:
        for r in g["published"]:
            rows.append([g["device"], str(r["model"]), r.get("runtime") or "unknown", r["family"].split("-", 1)[1],
                         f"{r['tok_s']:,.1f}", f"{r['page_rule_tok_s']:,.0f}", f"{r['ratio']:.2f}x",
                         verdict(r["tok_s"], r["printed_tok_s"]) if r.get("printed_tok_s") else
                         "- (the page prints no figure for this model)", r.get("url") or r.get("source")])
    return rows


def quality_table(xcal: dict) -> list[list[str]]:
    claims = page.QUALITY_CLAIMS
    pub = {}
    for r in xcal.get("quality") or []:
        pub.setdefault(r["quant"], []).append(r)
    rows = []
    for q in [*page.BY_QUANT, *[q for q in pub if q not in page.BY_QUANT]]:
        if q not in claims and q not in pub:
            continue
        for r in pub.get(q) or [None]:
            rows.append([q, claims.get(q, "-"), r["value_as_printed"] if r else "none found",
                         r["metric"] if r else "-", f"{r['url']} ({r['date']})" if r else "-"])
    return rows


QUALITY_MEASURED_HEAD = ["quant", "KLD mean ± err", "KLD median", "KLD p99", "PPL(Q) ± err", "PPL(Q)/PPL(ref)",
                         "same top %", "Δp RMS %", "needed MiB", "tg tok/s", "page's claim", "worth choosing"]


def quality_points(qdf: pd.DataFrame, t: pd.DataFrame) -> pd.DataFrame:
    """One row per scored quant: its quality statistics beside what it needs and its tg speed (from the run's
    per-quant table `t`), and whether another quant beats it on both memory and KL divergence (the quants no
    other beats are the ones worth choosing)."""
    ok = qdf[qdf.status == "ok"] if len(qdf) else qdf
    rows = []
    tq = t.set_index("quant") if len(t) and "quant" in t else None
    for r in ok.itertuples():
        q = r.quality or {}
        need = tok = None
        if tq is not None and r.quant in tq.index:
            row = tq.loc[r.quant]
            row = row.iloc[0] if isinstance(row, pd.DataFrame) else row
            need = row.get("needed_bytes")
            tok = row.get("tg_tok_s")
        rows.append({"quant": r.quant, **q, "needed_bytes": need, "tg_tokens_per_s": tok,
                     "reference": (r.extra or {}).get("reference_label")})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    mem = out.needed_bytes.astype(float).fillna(out.get("kld_mean") * 0 + np.inf).to_numpy()
    kld = out.kld_mean.astype(float).to_numpy()
    out["dominated"] = [bool(((mem <= mem[i]) & (kld <= kld[i]) & ((mem < mem[i]) | (kld < kld[i]))).any())
                        for i in range(len(out))]
    return out.sort_values("kld_mean").reset_index(drop=True)


def quality_measured_rows(qp: pd.DataFrame) -> list[list[str]]:
    rows = []
    for r in qp.itertuples():
        rows.append([r.quant, f"{r.kld_mean:.4f} ± {r.kld_unc:.4f}", f"{r.kld_median:.4f}", f"{r.kld_p99:.3f}",
                     f"{r.ppl:.3f} ± {r.ppl_unc:.3f}", f"{r.ppl_ratio:.4f}", f"{100 * r.same_top:.2f}",
                     f"{100 * r.dp_rms:.2f}", _mib(r.needed_bytes), _f(r.tg_tokens_per_s),
                     page.QUALITY_CLAIMS.get(r.quant, "-"), "no" if r.dominated else "yes"])
    return rows
