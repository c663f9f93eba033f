"""Per-quant summary of measured records: pure functions from records to a DataFrame and a text table."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from harness import stats
from harness.catalog import quants
from harness.schema import Record

MIB = 1024 * 1024


def records_frame(records: Iterable[Record]) -> pd.DataFrame:
    import dataclasses

    from harness.schema import FIELDS

    rows = [dataclasses.asdict(r) for r in records]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=FIELDS)


def per_quant(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (quant, depth): median tok/s and spread of pp and tg, sizes and memory. Quants keep the
    recipe table's order; a quant with only error records gets a row with its error."""
    rows = []
    if df.empty:
        return pd.DataFrame()
    order = {q: i for i, q in enumerate(quants.RECIPES)}
    ok = df[df.status == "ok"]
    for quant in sorted(df.quant.unique(), key=lambda q: order.get(q, len(order))):
        qdf = ok[ok.quant == quant]
        errors = df[(df.quant == quant) & (df.status == "error")]
        depths = sorted(qdf.n_depth.dropna().unique()) or [None]
        for depth in depths:
            row: dict = {"quant": quant, "n_depth": depth}
            d = qdf[qdf.n_depth == depth] if depth is not None else qdf
            for test in ("tg", "pp"):
                t = d[d.test == test].tokens_per_s
                row[f"{test}_tokens_per_s"] = t.median() if len(t) else None
                row[f"{test}_min"] = t.min() if len(t) else None
                row[f"{test}_max"] = t.max() if len(t) else None
                row[f"{test}_n"] = len(t)
                st = stats.describe(t.tolist())
                for k in ("mean", "sd", "ci_lo", "ci_hi"):
                    row[f"{test}_{k}"] = st[k] if len(t) else None
            first = d.iloc[0] if len(d) else None
            for col in ("file_bytes", "model_size_bytes", "weights_bytes", "device", "model_n_params",
                        "weights", "gpu_used_peak_bytes", "gpu_used_before_load_bytes", "gpu_name"):
                row[col] = first[col] if first is not None and col in d else None
            for col in ("kv_bytes", "compute_bytes", "output_bytes", "rss_peak_bytes", "gpu_process_bytes",
                        "device_used_bytes", "n_layers_offloaded", "n_layers_offloadable"):
                row[col] = d[col].max() if len(d) and col in d and d[col].notna().any() else None
            row["error"] = "; ".join(sorted(set(errors.error.dropna()))) or None
            rows.append(row)
    return pd.DataFrame(rows)


def _mib(v) -> str:
    return "-" if v is None or pd.isna(v) else f"{v / MIB:,.0f}"


def _mib1(v) -> str:
    return "-" if v is None or pd.isna(v) else f"{v / MIB:,.1f}"


def mean_sd(mean, sd, n) -> str:
    """mean ± sample standard deviation (n), as llama-bench prints it."""
    if mean is None or pd.isna(mean):
        return "-"
    return f"{mean:,.1f} ± {sd:,.1f} ({int(n)})" if sd is not None and not pd.isna(sd) else f"{mean:,.1f} ({int(n)})"


def _fixed_width(head: list[str], lines: list[list[str]]) -> list[str]:
    """Header, rule and rows in columns as wide as their widest cell; a row shorter than the header (an error
    line) lets its last cell run on unpadded."""
    widths = [max([len(head[i])] + [len(x[i]) for x in lines if len(x) > i]) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    for x in lines:
        cells = [v.ljust(w) for v, w in zip(x[:-1], widths)] + [x[-1]] if len(x) < len(head) else \
            [v.ljust(w) for v, w in zip(x, widths)]
        out.append("  ".join(cells).rstrip())
    return out


def text_table(s: pd.DataFrame) -> str:
    """Fixed-width table for the terminal: tok/s as mean ± sample standard deviation (n)."""
    if s.empty:
        return "(no records)"
    head = ["quant", "depth", "tg tok/s", "pp tok/s", "file MiB", "weights MiB", "KV MiB", "compute MiB",
            "peak RSS MiB", "GPU peak MiB", "on device MiB", "device"]
    lines = []
    for _, r in s.iterrows():
        if r.tg_n == 0 and r.pp_n == 0 and r.error:
            lines.append([r.quant, "-", "error: " + str(r.error)[:90]])
            continue
        lines.append([
            r.quant, "-" if pd.isna(r.n_depth) else str(int(r.n_depth)),
            mean_sd(r.tg_mean, r.tg_sd, r.tg_n), mean_sd(r.pp_mean, r.pp_sd, r.pp_n),
            _mib(r.file_bytes), _mib(r.weights_bytes), _mib(r.kv_bytes), _mib(r.compute_bytes),
            _mib(r.rss_peak_bytes), _mib(r.gpu_used_peak_bytes), _mib1(r.get("device_used_bytes")),
            device_label(r.device, r.get("n_layers_offloaded"), r.get("n_layers_offloadable")),
        ])
    out = _fixed_width(head, lines)
    if (s.device == "rpc").any():
        out.append(RPC_NOTE)
    return "\n".join(out)


RPC_NOTE = ("rpc: llama.cpp's RPC device (a server's CPU over loopback here): the offload path and its buffers, "
            "not a GPU's speed or memory")


def device_label(device, n_off=None, n_all=None) -> str:
    """Where the weights ran, with "N/M layers" where llama.cpp offloaded only part of them."""
    d = str(device) if isinstance(device, str) and device else "-"
    try:
        if n_off is not None and n_all and not pd.isna(n_off) and 0 < int(n_off) < int(n_all):
            return f"{d} ({int(n_off)}/{int(n_all)} layers)"
    except (TypeError, ValueError):
        pass
    return d


def context_table(df: pd.DataFrame) -> str:
    """The memory test (bench.contexts): one line per quant and context, per KV type and flash-attention
    setting: llama.cpp's KV and compute buffers, and the memory in use with the context created."""
    if df.empty:
        return "memory test: no records"
    head = ["quant", "n_ctx", "KV K/V", "fa", "KV MiB", "compute MiB", "RSS MiB", "GPU used MiB", "on device MiB",
            "error"]
    lines = []
    for _, r in df.iterrows():
        fa = r.extra.get("flash_attn_resolved") if isinstance(r.extra, dict) else None
        lines.append([str(r.quant), str(int(r.n_ctx)) if pd.notna(r.n_ctx) else "-",
                      f"{r.cache_type_k}/{r.cache_type_v}", f"{r.flash_attn}" + (f" ({fa})" if fa else ""),
                      _mib1(r.kv_bytes), _mib1(r.compute_bytes), _mib(r.rss_bytes), _mib(r.gpu_used_bytes),
                      _mib1(r.get("device_used_bytes")), "" if r.status == "ok" else str(r.error)[:80]])
    return "\n".join(["memory test (contexts created and decoded once):", *_fixed_width(head, lines)])


def probe_line(df: pd.DataFrame) -> str:
    """The kernel probes in one line: per tensor type, cheapest first, the probe's tg tok/s and ps per weight."""
    from harness.analysis import kernels

    costs = kernels.costs(df)
    failed = sorted(set(df[df.status == "error"].quant)) if len(df) else []
    parts = [f"{t} {c['tok_s']:,.1f} tok/s ({c['s_per_weight'] * 1e12:,.1f} ps/weight)"
             for t, c in sorted(costs.items(), key=lambda kv: kv[1]["s_per_weight"])]
    line = "kernel probes: " + (", ".join(parts) if parts else "none measured")
    if failed:
        line += f"; FAILED: {', '.join(failed)} (see probes.jsonl; calibration goes on without them)"
    return line
