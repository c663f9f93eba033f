"""The report's "Serving" section: the batched test's records (batched.jsonl, llama-batched-bench's protocol) as a
table per quant and cell against the number of users, where adding users stops paying, and the page's single-stream
figure set beside them.

Pure functions of the batched records DataFrame, the device dict and the run's per-user floor, as the rest of the
report is: :func:`cells` aggregates the repetitions (median, and the min-max spread the other tables print),
:func:`section` turns that into the report's blocks.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pandas as pd

from harness import llamalog, stats
from harness.catalog import page, quants
from harness.report.tables import MIB, _f, _mib, _rate

log = logging.getLogger(__name__)

GAIN = 0.10  # adding users stops paying where the aggregate S_TG gains less than this over the previous pl
CELL = ["quant", "pp", "tg", "pps"]
WEIGHTS = {  # what the serving figures stand for, by the records' weights (the report's opening says more)
    "synthetic": "shape-faithful synthetic weights (the model's tensor shapes and llama.cpp's quant types, seeded "
                 "random values): speed and memory stand for the real model's, quality does not",
    "hub": "the real weights, from the Hugging Face Hub",
    "local": "local GGUF files given in the config",
}  # a line of the table and of the figure: one quant at one (pp, tg)

SERVING_HEAD = ["quant", "pp", "tg", "pl (users)", "reps", "S_TG tok/s (aggregate)", "tg tok/s per user",
                "S_PP tok/s", "time to first token ms", "KV cells", "KV MiB", "compute MiB", "output MiB",
                "KV + compute + output on device MiB", "... on host MiB", "device used MiB"]


# --- the records, aggregated --------------------------------------------------------------------------------------

def floor_of(results_dir: str | Path | None) -> float:
    """The run's per-user floor (bench.batched.floor_tg_per_user of config.resolved.yaml), 0 where it names none."""
    import yaml

    path = Path(results_dir) / "config.resolved.yaml" if results_dir else None
    if path is None or not path.is_file():
        return 0.0
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
        return float(((cfg.get("bench") or {}).get("batched") or {}).get("floor_tg_per_user") or 0.0)
    except (yaml.YAMLError, TypeError, ValueError, AttributeError) as e:
        log.warning("%s: no per-user floor read (%s)", path, e)
        return 0.0


_PL = re.compile(r"\bpl(\d+)\b")


def _cell_of(r) -> dict:
    """(pp, tg, pl, pps) of a record; an error record has no `batched` field, its error text starts with the cell's
    label ("pp32 tg16 pl64: ...")."""
    b = r.batched if isinstance(r.batched, dict) else {}
    pl = b.get("pl")
    if pl is None:
        m = _PL.search(str(r.error or ""))
        pl = int(m.group(1)) if m else None
    pps = b.get("is_pp_shared")
    if pps is None:
        pps = " pps:" in str(r.error or "")
    return {"pp": int(b.get("pp", r.n_prompt)), "tg": int(b.get("tg", r.n_gen)), "pl": pl, "pps": bool(pps)}


def _sides(r) -> tuple[float, float]:
    """KV + compute + output buffers of one record, on the device and on the host (llamalog.is_host_buffer)."""
    dev = host = 0.0
    for bufs in (r.kv_buffers, r.compute_buffers, r.output_buffers):
        for name, v in (bufs if isinstance(bufs, dict) else {}).items():
            if llamalog.is_host_buffer(name):
                host += float(v)
            else:
                dev += float(v)
    return dev, host


def _stat(values: pd.Series) -> tuple[float, float, float, float]:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if not len(v):
        return math.nan, math.nan, math.nan, math.nan
    med = float(v.median())
    return med, stats.spread(med, v.min(), v.max()), float(v.min()), float(v.max())


def _num(v) -> float:
    return math.nan if v is None or pd.isna(v) else float(v)


def cells(bdf: pd.DataFrame | None) -> pd.DataFrame:
    """One row per quant, cell (pp, tg, shared prompt) and pl: the medians over the repetitions of S_TG, S_TG / pl,
    S_PP and the time to first token with their spread (half the min-max range over the median), llama.cpp's KV,
    compute and output buffers of the cell's context (and their device and host shares), the device memory used
    (the largest reading), and the error of a cell no repetition of which finished. Quants in the recipe table's
    order, cells by pp, tg, then pl."""
    if bdf is None or not len(bdf):
        return pd.DataFrame()
    b = bdf.assign(**pd.DataFrame([_cell_of(r) for r in bdf.itertuples()], index=bdf.index))
    b = b[b.pl.notna()]
    order = {q: i for i, q in enumerate(quants.RECIPES)}
    rows = []
    for (quant, pp, tg, pps, pl), d in b.groupby(CELL + ["pl"], sort=False):
        ok = d[d.status == "ok"]
        fig = pd.DataFrame(list(ok.batched)) if len(ok) else pd.DataFrame()
        row = {"quant": quant, "pp": int(pp), "tg": int(tg), "pps": bool(pps), "pl": int(pl), "n": len(ok),
               "n_error": int((d.status == "error").sum())}
        for key, col in (("s_tg", "speed_tg"), ("per_user", "speed_tg_per_user"), ("s_pp", "speed_pp"),
                         ("ttft_s", "ttft_s")):
            med, spread, lo, hi = _stat(fig[col]) if col in fig else (math.nan,) * 4
            row.update({key: med, f"{key}_spread": spread, f"{key}_min": lo, f"{key}_max": hi})
        first = ok.iloc[0] if len(ok) else None
        for k in ("n_kv", "n_kv_max", "n_seq_max", "kv_unified"):
            row[k] = fig[k].iloc[0] if k in fig and len(fig) else None
        for k in ("kv_bytes", "compute_bytes", "output_bytes"):
            row[k] = _num(first[k]) if first is not None else math.nan
        dev, host = _sides(first) if first is not None else (math.nan, math.nan)
        row.update(on_device_bytes=dev, on_host_bytes=host)
        used = pd.to_numeric(ok.device_used_bytes, errors="coerce").dropna() if "device_used_bytes" in ok else []
        row["device_used_bytes"] = float(used.max()) if len(used) else math.nan
        row["device"] = first.device if first is not None else None
        row["weights"] = first.weights if first is not None else None
        row["error"] = "; ".join(sorted(set(d.error.dropna().astype(str)))) or None
        rows.append(row)
    out = pd.DataFrame(rows)
    out["_q"] = [order.get(q, len(order)) for q in out.quant]
    return out.sort_values(["_q", "quant", "pp", "tg", "pps", "pl"]).drop(columns="_q").reset_index(drop=True)


# --- where adding users stops paying ------------------------------------------------------------------------------

def stop_paying(c: pd.DataFrame, floor: float = 0.0) -> dict:
    """Where adding users stops paying, for one quant at one cell (`c`: its rows of :func:`cells`): the first pl
    whose median S_TG gains under 10% over the previous pl measured (the previous pl is the last that paid), or
    whose median per-user tg falls below `floor` tokens/s (the previous pl is the most users that hold it),
    whichever comes first. Keys: at (the last pl that pays, None where even pl 1 is under the floor), next (the
    pl where it stops), why ("gain", "floor" or None: still paying at the largest pl), gain, per_user, last_pl, and
    overlap: whether the two pl's repetitions overlap in S_TG (min-max), where a gain decided it."""
    c = c[c.s_tg.notna()].sort_values("pl")
    out = {"at": None, "next": None, "why": None, "gain": math.nan, "per_user": math.nan,
           "last_pl": int(c.pl.iloc[-1]) if len(c) else None, "last_gain": math.nan, "overlap": False}
    prev = None
    for r in c.itertuples():
        gain = r.s_tg / prev.s_tg - 1 if prev is not None else math.nan
        if floor and r.per_user < floor:
            return {**out, "at": int(prev.pl) if prev is not None else None, "next": int(r.pl), "why": "floor",
                    "gain": gain, "per_user": r.per_user}
        if prev is not None and gain < GAIN:
            ranges = [getattr(x, k, math.nan) for x in (prev, r) for k in ("s_tg_min", "s_tg_max")]
            overlap = bool(ranges[0] <= ranges[3] and ranges[2] <= ranges[1])  # NaN (no ranges): False
            return {**out, "at": int(prev.pl), "next": int(r.pl), "why": "gain", "gain": gain,
                    "per_user": r.per_user, "overlap": overlap}
        prev = r
        out["last_gain"] = gain
    if prev is not None:
        out["per_user"] = prev.per_user
    return out


def _cell_label(pp: int, tg: int, pps: bool) -> str:
    return f"pp {pp}, tg {tg}" + (", one shared prompt" if pps else "")


def stop_sentences(c: pd.DataFrame, floor: float = 0.0) -> list[str]:
    """One sentence per quant: where adding users stops paying at each of its cells."""
    out = []
    floor_s = f"the floor of {floor:g} tok/s per user (bench.batched.floor_tg_per_user)"
    for quant, q in c.groupby("quant", sort=False):
        parts = []
        for (pp, tg, pps), d in q.groupby(["pp", "tg", "pps"], sort=False):
            s = stop_paying(d, floor)
            where = _cell_label(pp, tg, pps)
            if s["last_pl"] is None:
                parts.append(f"at {where} no cell finished")
            elif s["why"] == "gain":
                parts.append(f"at {where} adding users stops paying after pl {s['at']}: pl {s['next']} gains "
                             f"{s['gain']:+.0%} aggregate S_TG over pl {s['at']} (under {GAIN:.0%})"
                             + ("; their repetitions' ranges overlap, so the repetitions do not tell the two apart"
                                if s["overlap"] else ""))
            elif s["why"] == "floor" and s["at"] is None:
                parts.append(f"at {where} even one user reads below {floor_s}: {s['per_user']:,.1f} tok/s at "
                             f"pl {s['next']}")
            elif s["why"] == "floor":
                parts.append(f"at {where} adding users stops paying after pl {s['at']}: at pl {s['next']} each "
                             f"user reads {s['per_user']:,.1f} tok/s, below {floor_s}")
            elif s["last_pl"] == int(d.pl.min()):
                parts.append(f"at {where} only pl {s['last_pl']} was measured: nothing to compare")
            else:
                parts.append(f"at {where} still paying at pl {s['last_pl']}, the most users measured "
                             f"({s['last_gain']:+.0%} aggregate S_TG over the pl before it, each user "
                             f"{s['per_user']:,.1f} tok/s" + (f", above {floor_s}" if floor else "") + ")")
        out.append(f"{quant}: " + "; ".join(parts) + ".")
    return out


# --- the page's single stream --------------------------------------------------------------------------------------

def _page_speeds() -> str:
    return ", ".join(f"{s.device} {s.tok_s:,}" for s in page.SPEEDS)


def page_line(c: pd.DataFrame, device: dict, page_model: bool) -> str:
    """The page's single-stream figure beside the serving table: what it prints, for what, and whether for this
    device (on a CPU or the RPC device: its figures are for GPUs); then, said plainly, that a batch-1 number is not a
    serving number, with this run's own pl-1 and largest-pl figures to show why."""
    printed = page.printed_speed(device.get("name"), page.SPEED_QUANT) if device.get("kind") == "gpu" else None
    out = [f"The page prints one tok/s per GPU, for Llama 3.2 1B at {page.SPEED_QUANT} on its four GPUs only "
           f"({_page_speeds()} tok/s): a single stream, batch 1 ('Speed depends on batch size', it says itself)."]
    if device.get("kind") == "rpc":
        out.append("This run measured its files on llama.cpp's RPC device, whose speed is its server's and the "
                   "network's, not a GPU's: no GPU measured them, and the page's figures are for GPUs.")
    elif device.get("kind") == "gpu":
        out.append(f"For this device ({device.get('name')}) it prints {printed.tok_s:,} tok/s." if printed else
                   f"It prints none for this device ({device.get('name')}).")
    else:
        out.append("No GPU measured this run's files: the page's figures are for GPUs.")
    if not page_model:
        out.append("These files are not Llama 3.2 1B: no page figure stands beside them.")
    out.append("A batch-1 number is not a serving number: it is one user reading alone, and says neither how many "
               "users a device holds, nor how fast each then reads, nor how long each waits.")
    ok = c[c.s_tg.notna()] if len(c) else c
    if len(ok):
        quant = page.SPEED_QUANT if (ok.quant == page.SPEED_QUANT).any() else ok.quant.iloc[0]
        pick = ok[ok.quant == quant]
        r0 = pick.iloc[0]
        d = pick[(pick.pp == r0.pp) & (pick.tg == r0.tg) & (pick.pps == r0.pps)].sort_values("pl")
        lo, hi = d.iloc[0], d.iloc[-1]
        beside = (f" (the page: {printed.tok_s:,})" if printed and page_model and quant == page.SPEED_QUANT
                  and lo.pl == 1 else "")
        if hi.pl > lo.pl:
            out.append(f"Here, {quant} at {_cell_label(r0.pp, r0.tg, r0.pps)}: pl {lo.pl} reads {lo.s_tg:,.1f} "
                       f"tok/s{beside}; pl {hi.pl} users together read {hi.s_tg:,.1f} tok/s "
                       f"({hi.s_tg / lo.s_tg:.2f}x), each of them {hi.per_user:,.1f} tok/s "
                       f"({hi.per_user / lo.per_user:.2f}x the pl {lo.pl} figure), and waits "
                       f"{hi.ttft_s * 1e3:,.1f} ms for a first token (pl {lo.pl}: {lo.ttft_s * 1e3:,.1f} ms).")
    return " ".join(out)


# --- the table, the section, the terminal -------------------------------------------------------------------------

def _ms(v: float) -> float:
    return v * 1e3 if v is not None and not pd.isna(v) else math.nan


def serving_rows(c: pd.DataFrame) -> list[list[str]]:
    rows = []
    for r in c.itertuples():
        if not r.n:
            rows.append([r.quant, str(r.pp), str(r.tg), str(r.pl), "0", f"failed: {str(r.error)[:100]}"]
                        + ["-"] * (len(SERVING_HEAD) - 6))
            continue
        rows.append([r.quant, str(r.pp) + (" (shared)" if r.pps else ""), str(r.tg), str(r.pl),
                     str(r.n) + (f" ({r.n_error} failed)" if r.n_error else ""),
                     _rate(r.s_tg, r.s_tg_spread), _rate(r.per_user, r.per_user_spread), _rate(r.s_pp, r.s_pp_spread),
                     _rate(_ms(r.ttft_s), r.ttft_s_spread), _f(r.n_kv, "{:,.0f}"), _f(r.kv_bytes / MIB, "{:,.2f}"),
                     _f(r.compute_bytes / MIB, "{:,.2f}"), _f(r.output_bytes / MIB, "{:,.2f}"),
                     _f(r.on_device_bytes / MIB, "{:,.2f}") if r.on_device_bytes else "-",
                     _f(r.on_host_bytes / MIB, "{:,.2f}"), _mib(r.device_used_bytes)])
    return rows


def _settings(bdf: pd.DataFrame, c: pd.DataFrame, device: dict) -> str:
    ok = bdf[bdf.status == "ok"]
    figs = pd.DataFrame(list(ok.batched)) if len(ok) else pd.DataFrame()
    if figs.empty:
        return "No batched cell finished."

    def one(col: str) -> str:
        return ", ".join(str(x) for x in sorted(set(figs[col].dropna()))) if col in figs else "-"

    per_cell = "n_seq_max" in figs and (figs.n_seq_max == figs.pl).all() and (figs.n_kv_max >= figs.n_kv).all()
    ctx = ("each cell in a context of its own holding what its pl users need (n_seq_max = pl; llama.cpp pads each "
           "user's share to 256 cells)" if per_cell else
           f"one context of {one('n_kv_max')} cells for every cell (-c), n_seq_max {one('n_seq_max')}")
    unified = "one KV buffer shared by all users (-kvu)" if figs.get("kv_unified", pd.Series([False])).any() else \
        "the KV cache split evenly between the users"
    weights = sorted(bdf.weights.dropna().unique()) if "weights" in bdf else []
    wsay = "; ".join(WEIGHTS.get(w, f"{w} weights") for w in weights) or "weights unknown (the records do not say)"
    where = {"cpu": "on the CPU, so every buffer is host memory",
             "rpc": "on llama.cpp's RPC device (a device's buffers; its speed is its server's and the network's)",
             "gpu": f"on {device.get('name')}"}.get(device.get("kind"), "")
    states = [x["machine"] for x in ok.extra if isinstance(x, dict) and isinstance(x.get("machine"), dict)]
    flagged = (f" {sum(bool(m.get('descheduled')) for m in states)} of {len(states)} repetitions flagged as "
               "descheduled (extra.machine; kept)." if states else "")
    return (f"The batched test (llama-batched-bench's protocol: harness/measure/batched.py): per cell, pl users' "
            f"prompts of pp random tokens decoded together (S_PP = pl x pp / t_pp), then tg steps of one token for "
            f"each user (S_TG = pl x tg / t_tg, the aggregate; per user: S_TG / pl); {one('n_threads')} threads, "
            f"n_batch {one('n_batch')}, n_ubatch {one('n_ubatch')}, flash attention {one('flash_attn')} (-1: auto); "
            f"{ctx}; {unified}; measured {where}. Each figure is the median over the repetitions, ± half their "
            f"min-max range. Time to first token: the prompt phase of pl users arriving at once (every first token "
            f"comes out of its last decode). Memory: llama.cpp's KV, compute and output buffers of the cell's "
            f"context, with the side each is on (device or host), and where on a device the device memory in use "
            f"(weights included). Weights: {wsay}.{flagged}")


def section(bdf: pd.DataFrame | None, device: dict, floor: float, page_model: bool) -> list[tuple]:
    """The Serving section's blocks (see harness.report._sections), [] where the run has no batched records."""
    c = cells(bdf)
    if c.empty:
        return []
    s: list[tuple] = [("h2", "Serving"), ("p", _settings(bdf, c, device)),
                      ("table", SERVING_HEAD, serving_rows(c))]
    if c.s_tg.notna().any():
        s.append(("fig", "serving.png"))
    s.append(("p", f"Where adding users stops paying: the first pl whose aggregate S_TG gains under {GAIN:.0%} over "
                   "the previous pl (medians), or whose per-user tg falls below the floor the config names "
                   + (f"({floor:g} tok/s)" if floor else "(none here: bench.batched.floor_tg_per_user is 0)") + "."))
    s.append(("list", stop_sentences(c, floor)))
    s.append(("p", page_line(c, device, page_model)))
    failed = c[c.error.notna()]
    if len(failed):
        s.append(("p", "Failed cells:"))
        s.append(("list", [f"{r.quant} pp {r.pp} tg {r.tg} pl {r.pl}: {r.error}" for r in failed.itertuples()]))
    return s


def text_table(bdf: pd.DataFrame) -> str:
    """The batched test for the terminal: one line per quant, cell and pl (medians)."""
    c = cells(bdf)
    if c.empty:
        return "batched test: no records"
    head = ["quant", "pp", "tg", "pl", "S_TG tok/s", "per user", "S_PP tok/s", "TTFT ms", "KV MiB", "error"]
    lines = [[r.quant, str(r.pp), str(r.tg), str(r.pl), _f(r.s_tg), _f(r.per_user), _f(r.s_pp),
              _f(_ms(r.ttft_s)), _f(r.kv_bytes / MIB, "{:,.2f}"), "" if r.n else str(r.error)[:80]]
             for r in c.itertuples()]
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(x, widths)).rstrip() for x in lines]
    return "\n".join(["batched test (medians over the repetitions):", *out])
