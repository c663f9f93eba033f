"""``python -m harness estimate``: the page's estimate for a device and quant beside the calibrated one.

    python -m harness estimate --device "RTX 4090" --quant Q4_K_M [--context 8192] [--calibration FILE ...]

The page's estimate is its own rule (:mod:`harness.catalog.page`). The calibrated estimate comes from a
``calibration.json`` written by ``python -m harness report``: the one from the same device if given, else
the one whose device's bandwidth is nearest, scaled by the bandwidth ratio (and said so).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from harness.analysis import calibration, crossgpu, predict
from harness.analysis.points import kv_cells
from harness.catalog import devices, page, quants

GB = 1e9
GIB = 1024**3
EXIT_USAGE = 2


class EstimateError(ValueError):
    pass


def resolve_device(name: str, bandwidth_gb_s: float | None = None, cals: list[dict] | None = None) -> dict[str, Any]:
    """The target device as a dict (name, kind, vendor, bandwidth_gb_s, memory_bytes, source).

    "cpu" is this machine's CPU: its bandwidth from --bandwidth, else from a CPU calibration given, else
    measured now (about 2 s). Any other name is looked up in the catalog (UnknownDevice says "did you mean")."""
    if name.strip().lower() in ("cpu", "this cpu", "host"):
        from harness.measure import env

        here = env.cpu_model()
        # a calibration's bandwidth is this machine's only if it was measured on this CPU
        cpu_cals = [c for c in cals or [] if (c.get("device") or {}).get("kind") == "cpu"
                    and ((c["device"].get("reported_name") or c["device"].get("name")) == here)]
        if bandwidth_gb_s:
            bw, src = bandwidth_gb_s, "given with --bandwidth"
        elif cpu_cals and cpu_cals[0]["device"].get("bandwidth_gb_s"):
            bw = cpu_cals[0]["device"]["bandwidth_gb_s"]
            src = f"from {cpu_cals[0].get('source_path', 'the calibration')}"
        else:  # the probe the runs use (compiled STREAM, numpy's without a compiler), so the two agree
            d = env.memory_bandwidth()
            if d is None:
                raise devices.UnknownDevice("cpu: its memory bandwidth could not be measured; give --bandwidth")
            bw, src = d["measured_gb_s"], f"measured now: {d['method']}"
        import psutil

        return {"name": here, "kind": "cpu", "vendor": "cpu", "bandwidth_gb_s": float(bw),
                "memory_bytes": psutil.virtual_memory().total, "source": src}
    d = devices.lookup(name)
    out = {"name": d.name, "kind": "gpu", "vendor": d.vendor, "bandwidth_gb_s": float(d.bandwidth_gb_s),
           "memory_bytes": d.memory_bytes, "hbm": d.hbm, "source": f"catalog: {d.source}"}
    if d.vendor == "apple":
        out["kind"] = "apple"
    if bandwidth_gb_s:
        out["bandwidth_gb_s"], out["source"] = float(bandwidth_gb_s), "given with --bandwidth"
    return out


def _same_device(cal: dict, device: dict) -> bool:
    cd = cal.get("device") or {}
    if device["kind"] == "cpu" or cd.get("kind") == "cpu":
        return device["kind"] == cd.get("kind") == "cpu" and (cd.get("reported_name") or cd.get("name")) == \
            device["name"]
    found = devices.find(cd.get("name")) or devices.find(cd.get("reported_name"))
    return found is not None and found.name == device["name"]


def choose(cals: list[dict], device: dict) -> tuple[dict | None, str]:
    """The calibration to use for `device` and why: the same device (the lowest held-out error among them),
    else the nearest bandwidth (on a log scale), preferring a calibration with a known bandwidth."""
    usable = [c for c in cals if c.get("tg")]
    if not usable:
        return None, "no calibration with a tg fit given"
    same = [c for c in usable if _same_device(c, device)]
    if same:
        best = min(same, key=lambda c: (c["tg"].get("loqo") or {}).get("rms_ape") or math.inf)
        return best, "measured on this device"
    bw = device.get("bandwidth_gb_s")
    known = [c for c in usable if (c.get("device") or {}).get("bandwidth_gb_s")]
    if bw and known:
        best = min(known, key=lambda c: abs(math.log(c["device"]["bandwidth_gb_s"] / bw)))
        return best, (f"nearest bandwidth to {bw:,.0f} GB/s among {len(usable)} calibration(s); "
                      "this device was not measured")
    return usable[0], "the only usable calibration; this device was not measured"


def page_estimate(device: dict, quant: str) -> dict[str, Any] | None:
    """The page's VRAM, file size and tok/s (as its rule gives them) for a quant it lists."""
    if quant not in page.BY_QUANT:
        return None
    bw = device.get("bandwidth_gb_s")
    tok = page.page_tok_s(bw, device.get("vendor"), quant) if bw else None
    return {"vram_bytes": page.page_vram_bytes(quant), "file_bytes": page.page_file_bytes(quant), "tok_s": tok,
            "model_gb": page.speed_model_gb(quant), "efficiency": page.efficiency(device.get("vendor"))}


def calibrated_estimate(cal: dict, device: dict, quant: str, context: int) -> dict[str, Any]:
    """Calibrated tg tok/s (empty cache and at `context` tokens) and peak memory at `context`."""
    same = _same_device(cal, device)
    bw = None if same else device.get("bandwidth_gb_s")
    rate0, rel, notes = predict.predict_tg_tok_s(cal, quant, 0, bw)
    rate_ctx, _, ctx_notes = predict.predict_tg_tok_s(cal, quant, context, bw)
    notes = list(notes) + [n for n in ctx_notes if n not in notes]
    out: dict[str, Any] = {"tok_s": rate0, "tok_s_at_context": rate_ctx, "tok_s_rel": rel, "notes": notes,
                           "context_extrapolated": any("extrapolated, not calibrated" in n for n in ctx_notes)}
    if not same and device["kind"] == "cpu":  # one CPU's kernels are not another's: carry the measured error
        xfer = crossgpu.load_shipped().get("cpu_transfer") or {}
        err = xfer.get("all")
        out["tok_s_rel"] = err["median_ape"] if err else math.nan
        out["rel_what"] = "the median error of carrying a calibration from one CPU to another (see the note)"
        out["notes"].insert(0, f"this CPU was not measured: {cal['device']['name']}'s calibration is carried by "
                               "the bandwidth ratio, which between the CPUs measured here is off by "
                               + (f"median {err['median_ape']:.0%}, worst {err['worst_ape']:.0%} ({xfer['n']} "
                                  f"quants, {len(xfer['pairs'])} directions)" if err else "an unknown amount")
                               + "; ± is that error. Measure this CPU: `make run`")
    try:
        mem, mem_rel, mem_notes = predict.predict_memory_bytes(cal, quant, context)
        out.update(memory_bytes=mem, memory_rel=mem_rel)
        if not same:
            mem_notes.append(f"memory overhead measured on {cal['device']['name']}: another device's runtime "
                             "(GPU context, drivers) differs")
        out["notes"] += [n for n in mem_notes if n not in out["notes"]]
    except calibration.CalibrationError as e:
        out.update(memory_bytes=None, memory_rel=None)
        out["notes"].append(str(e))
    return out


def cross_device_estimate(xcal: dict, device: dict, quant: str, context: int, backend: str | None
                          ) -> dict[str, Any]:
    """tg tok/s and memory of Llama 3.2 1B `quant` on a GPU from the shipped cross-device calibration: time per
    token = overhead + (weights + the KV cache read) / (efficiency x spec bandwidth) for the device's vendor x
    backend; memory = weights as stored + KV (llama.cpp's f16 cache at `context`, padded to 256 cells), the
    compute buffer and the runtime's fixed cost named but not counted (no published load log of this model on
    a GPU gives them)."""
    from harness.analysis import crossgpu
    from harness.analysis.points import kv_bytes_per_token, kv_cells

    sizes = (xcal.get("llama_3_2_1b") or {}).get("model_size_bytes") or {}
    size = sizes.get(quant)
    out: dict[str, Any] = {"size_source": (xcal.get("llama_3_2_1b") or {}).get("source"), "quant": quant}
    if size is None:
        if quant not in page.BY_QUANT:
            out["why"] = f"{quant}: no measured size of Llama 3.2 1B in it (it has {', '.join(sizes)})"
            return out
        size = page.page_file_bytes(quant, printed=False)
        out["size_source"] = "the page's file size (not measured)"
    kvt = kv_bytes_per_token()
    hbm = bool(device.get("hbm"))
    rate0, fam, family = crossgpu.predict_tok_s(xcal, device["vendor"], device["bandwidth_gb_s"], size, quant,
                                                backend, device=device["name"], hbm=hbm)
    out.update(family=family, fam=fam, weights_bytes=size, kv_bytes=kvt * kv_cells(max(context, 1)))
    if rate0 is None:
        out["why"] = family
        return out
    rate_ctx, _, _ = crossgpu.predict_tok_s(xcal, device["vendor"], device["bandwidth_gb_s"],
                                            size + kvt * context, quant, backend, device=device["name"], hbm=hbm)
    other = crossgpu.other_tok_s(xcal, device["vendor"], device["bandwidth_gb_s"], size, quant, backend, hbm=hbm)
    out.update(tok_s=rate0, tok_s_at_context=rate_ctx, other_tok_s=other)
    return out


def render_cross(lines: list[str], device: dict, context: int, x: dict, xcal: dict, why: str) -> None:
    if "tok_s" not in x:
        lines.append(f"calibrated: none ({x.get('why')})")
        return
    fam = x["fam"]
    held = (fam.get("held_out") or {})
    small, every = held.get("small"), held.get("all")

    def err(e, n):
        return f"median {e['median_ape']:.0%}, worst {e['worst_ape']:.0%} over {n} rows" if e else f"none ({n} rows)"
    lines.append(f"calibrated: tg ~{x['tok_s']:,.0f} tok/s with an empty cache, ~{x['tok_s_at_context']:,.0f} tok/s "
                 f"at {context:,} tokens (the KV cache read added); cross-device: efficiency {fam['efficiency']:.2f}"
                 f" x {fam['kind_factor']:.2f} ({fam['kind']})"
                 + (f", overhead {fam['overhead_s'] * 1e3:.2f} ms/token" if fam.get("overhead_s") else "")
                 + f" of the spec bandwidth for {x['family']}")
    other = x.get("other_tok_s")
    if other and abs(other / x["tok_s"] - 1) > 0.25:
        lines.append(f"            the other model that fits the published rows ({xcal.get('other')}) says "
                     f"~{other:,.0f} tok/s here: the published rows do not tell the two apart on this device; "
                     "a measurement on it does")
    if fam.get("basis") == "device":  # this device's own published rows
        models = "; ".join(fam["models"][:4])
        lines.append(f"            from this device's own {fam['n_rows']} published rows ({models}"
                     f"): held-out error (leave one row out) {err(every, held.get('n_all', 0))}; they are of "
                     f"other models, whose size is scaled ({why}; harness/data/crossgpu.json, from "
                     f"{xcal.get('built_from')})")
    else:
        lines.append(f"            held-out error (leave one device out) of {x['family']}: 1B-3B rows "
                     f"{err(small, held.get('n_small', 0))}; all its rows {err(every, held.get('n_all', 0))}; "
                     f"rests on {fam['n_rows']} published rows on {len(fam['devices'])} "
                     f"device{'s' if len(fam['devices']) != 1 else ''} "
                     f"({', '.join(fam['devices'][:6])}{', ...' if len(fam['devices']) > 6 else ''}); model "
                     f"{xcal.get('chosen')} ({why}; harness/data/crossgpu.json, from {xcal.get('built_from')})")
    if not crossgpu.rests_on_small_rows(fam):
        lines.append("            none of these rows is of a 1B-3B model: the per-token floor (kernel launches, "
                     "synchronisation) that a 1B model meets on a fast device is not in them, so read this as an "
                     "upper bound")
    b = device_buffers(x.get("quant"), context)
    if b is None:
        mem = x["weights_bytes"] + x["kv_bytes"]
        lines.append(f"memory:     at least {mem / GB:.2f} GB = weights {x['weights_bytes'] / GB:.2f} GB as stored "
                     f"({x['size_source']}) + KV {x['kv_bytes'] / GB:.3f} GB (f16, {kv_cells(max(context, 1)):,} "
                     "cells x 32 KiB); not counted: llama.cpp's compute buffer and the runtime's fixed cost (the GPU "
                     "context), neither published for this model on a GPU nor measured here")
        return
    dev = b["device_model"] + b["device_context"] + b["device_compute"]
    lines.append(f"memory:     on the GPU {dev / GB:.2f} GB + the runtime's fixed cost = model "
                 f"{b['device_model'] / GB:.3f} GB + KV {b['device_context'] / GB:.3f} GB (f16) + compute "
                 f"{b['device_compute'] / GB:.3f} GB (n_ubatch {b['n_ubatch']}, flash attention on), at "
                 f"{b['n_ctx']:,} tokens{' (the next context tabulated)' if b['n_ctx'] != max(context, 1) else ''};"
                 f" on the host {(b['host_model'] + b['host_compute']) / GB:.3f} GB (token_embd "
                 f"{b['host_model'] / GB:.3f} GB: llama.cpp keeps the input embeddings there, and copies them to the "
                 f"GPU as the tied output layer; compute {b['host_compute'] / GB:.3f} GB)")
    lines.append("            llama.cpp's own arithmetic for this quant fully offloaded (no_alloc, simulated on its "
                 "RPC device: harness/data/buffers-1b.json, scripts/ship-buffers.py); not in it: the runtime's fixed "
                 "cost (CUDA context, cuBLAS workspace, pools), which no run here has measured on a GPU")


_BUFFERS: dict | None = None


def device_buffers(quant: str | None, context: int, flash_attn: str = "on") -> dict[str, Any] | None:
    """llama.cpp's breakdown of Llama 3.2 1B `quant` fully offloaded at the smallest tabulated context that holds
    `context` (the largest where none does), from harness/data/buffers-1b.json; None where it has no such quant."""
    global _BUFFERS
    if _BUFFERS is None:
        import json
        from pathlib import Path

        p = Path(__file__).resolve().parent / "data" / "buffers-1b.json"
        _BUFFERS = json.loads(p.read_text()) if p.is_file() else {}
    cells = (_BUFFERS.get("quants") or {}).get(quant or "")
    if not cells:
        return None
    ctxs = sorted(_BUFFERS["contexts"])
    n = next((c for c in ctxs if c >= max(context, 1)), ctxs[-1])
    return {**cells[f"{flash_attn}:{n}"], "n_ctx": n, "n_ubatch": _BUFFERS.get("n_ubatch")}


def _pm(rel) -> str:
    if rel is None or math.isnan(rel):
        return ""
    return f" ±{rel:.1%}" if rel < 0.1 else f" ±{rel:.0%}"


def render(device: dict, quant: str, context: int, pg: dict | None, cal: dict | None, why: str,
           est: dict | None) -> str:
    bw = device.get("bandwidth_gb_s")
    mem = device.get("memory_bytes")
    lines = [f"Llama 3.2 1B {quant} on {device['name']} ({bw:,.1f} GB/s" + (f", {mem / GIB:,.1f} GiB" if mem else "")
             + f"; {device['source']})"]
    if pg is None:
        lines.append(f"page:       no row for {quant} (it lists {', '.join(page.BY_QUANT)})")
    else:
        tok = (f"~{pg['tok_s']:,.0f} tok/s = {bw:,.0f} GB/s / {pg['model_gb']:.3g} GB x {pg['efficiency']} "
               f"(it claims ±20%: {pg['tok_s'] * 0.8:,.0f}-{pg['tok_s'] * 1.2:,.0f})") if pg["tok_s"] else "no tok/s"
        lines.append(f"page:       VRAM {pg['vram_bytes'] / GB:.1f} GB, file {pg['file_bytes'] / GB:.2f} GB, {tok}; "
                     "no context term")
    if cal is None or est is None:
        lines.append(f"calibrated: none ({why}; `python -m harness report RESULTS_DIR` writes calibration.json, "
                     "pass it with --calibration)")
        return "\n".join(lines)
    mem_s = (f"; peak memory ~{est['memory_bytes'] / GB:.2f} GB{_pm(est['memory_rel'])} at context {context:,}"
             if est.get("memory_bytes") else "")
    lines.append(f"calibrated: tg ~{est['tok_s']:,.1f} tok/s{_pm(est['tok_s_rel'])} with an empty cache, "
                 f"~{est['tok_s_at_context']:,.1f} tok/s at {context:,} tokens of context"
                 f"{' (extrapolated: see the note)' if est.get('context_extrapolated') else ''}{mem_s}")
    d = cal.get("device") or {}
    run = cal.get("run") or {}
    tg = cal.get("tg") or {}
    worst = (tg.get("nested") or {}).get("worst_ape") or (tg.get("loqo") or {}).get("worst_ape")
    pm = (est["rel_what"] if est.get("rel_what") else
          f"the held-out (LOQO) RMS error, worst {'-' if worst is None else f'{worst:.1%}'}")
    lines.append(f"            factors from {d.get('name')} ({why}); run {run.get('run_id')}, llama-cpp-python "
                 f"{cal.get('llama_cpp_version') or '-'}, model {tg.get('chosen')}; ± is {pm}; "
                 f"{cal.get('source_path', '')}")
    for n in est["notes"]:
        lines.append(f"            note: {n}")
    if mem and est.get("memory_bytes"):
        fits = "fits" if est["memory_bytes"] <= mem else "does NOT fit"
        lines.append(f"fit:        {fits} in {mem / GIB:,.1f} GiB")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("estimate", help="the page's estimate for a device beside the calibrated one",
                              description=__doc__.splitlines()[0])
    p.add_argument("--device", required=True, help='device name, e.g. "RTX 4090", "NVIDIA H100 80GB HBM3", '
                                                   '"M2 Max", or "cpu" (this machine)')
    p.add_argument("--quant", required=True, help="quant name, e.g. Q4_K_M")
    p.add_argument("--context", type=int, default=2048, help="tokens of context (default 2048, the page's '2K')")
    p.add_argument("--calibration", type=Path, nargs="+", default=[], metavar="FILE",
                   help="calibration.json files from `harness report` (the same device's is used, else the "
                        "nearest bandwidth's)")
    p.add_argument("--bandwidth", type=float, help="override the device's memory bandwidth, GB/s")
    p.add_argument("--backend", choices=["cuda", "vulkan", "rocm", "metal"],
                   help="llama.cpp's backend on a GPU (default: CUDA on NVIDIA, ROCm on AMD, Metal on Apple)")


def main(args) -> int:
    try:
        quants.get(args.quant)
    except quants.UnknownQuant as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.context < 0:
        print("error: --context must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    try:
        cals = [calibration.load(p) for p in args.calibration]
    except calibration.CalibrationError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        device = resolve_device(args.device, args.bandwidth, cals)
    except devices.UnknownDevice as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    pg = page_estimate(device, args.quant)
    if device["kind"] != "cpu":
        # a CPU's fit is kernel-bound: never carried to a GPU; a GPU's own (or another GPU's) calibration is
        # an RPC device's calibration (kind "rpc") is its server's and the network's speed: never a GPU's
        gpu_cals = [c for c in cals if (c.get("device") or {}).get("kind") == "gpu"]
        if not gpu_cals:
            xcal = crossgpu.load_shipped()
            why = ("no GPU calibration given" if not cals else
                   "the calibrations given are of CPUs or of llama.cpp's RPC device, whose speed is not a GPU's: "
                   "not carried to a GPU")
            lines = render(device, args.quant, args.context, pg, None, "", None).splitlines()[:2]
            render_cross(lines, device, args.context,
                         cross_device_estimate(xcal, device, args.quant, args.context, args.backend), xcal, why)
            print("\n".join(lines))
            return 0
        cals = gpu_cals
    cal, why = choose(cals, device) if cals else (None, "no --calibration given")
    est = None
    if cal is not None:
        try:
            est = calibrated_estimate(cal, device, args.quant, args.context)
        except calibration.CalibrationError as e:
            why = str(e)
            cal = None
    print(render(device, args.quant, args.context, pg, cal, why, est))
    return 0
