"""``python -m harness estimate``: the page's estimate for a device and quant beside the calibrated one.

    python -m harness estimate --device "RTX 4090" --quant Q4_K_M [--context 8192] [--calibration FILE ...]
    python -m harness estimate --device "H100 SXM" --quant Q4_K_M --users 16 --context 4096   # serving:
        N users at C tokens each, memory term by term and a batched step model (harness.estimate_serving)

The page's estimate is its own rule (:mod:`harness.catalog.page`). The calibrated estimate comes from a
``calibration.json`` written by ``python -m harness report``: the one from the same device if given, else
the one whose device's bandwidth is nearest, scaled by the bandwidth ratio (and said so).
"""

from __future__ import annotations

import math
import re
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


def resolve_device(name: str, bandwidth_gb_s: float | None = None, cals: list[dict] | None = None,
                   vendor: str | None = None) -> dict[str, Any]:
    """The target device as a dict (name, kind, vendor, bandwidth_gb_s, memory_bytes, source).

    "cpu" is this machine's CPU ("here": True; :func:`this_cpu`): its fingerprint, its bandwidth measured now
    (about 2 s) unless --bandwidth gives it, and which CPU calibrations are this machine's. A CPU named is the
    calibration's of that name, never this machine. Any other name is looked up in the catalog (UnknownDevice
    says "did you mean"); a GPU the catalog does not know is taken with --bandwidth (and its vendor from --vendor
    or its name)."""
    if name.strip().lower() in ("cpu", "this cpu", "host"):
        return this_cpu(bandwidth_gb_s, cals)
    cpu_named = [c for c in cals or [] if (c.get("device") or {}).get("kind") == "cpu"
                 and name in ((c["device"].get("reported_name") or ""), (c["device"].get("name") or ""))]
    if cpu_named or re.search(r"\b(xeon|epyc|ryzen|threadripper|core\(tm\)|core i\d)\b", name.lower()):
        d = (cpu_named[0] if cpu_named else {}).get("device") or {}
        bw = bandwidth_gb_s or d.get("bandwidth_gb_s")
        return {"name": name, "kind": "cpu", "vendor": "cpu", "bandwidth_gb_s": float(bw) if bw else None,
                "memory_bytes": None, "here": False,  # a name is not a machine: `--device cpu` is this one
                "source": "given with --bandwidth" if bandwidth_gb_s else
                          (f"from {cpu_named[0].get('source_path', 'its calibration')}" if bw else "bandwidth unknown")}
    try:
        d = devices.lookup(name)
    except devices.UnknownDevice:
        if not bandwidth_gb_s:
            raise
        v = vendor or vendor_of(name)
        if v is None:
            raise devices.UnknownDevice(f"{name!r} is not in the device catalog and its vendor is not in its name: "
                                        "give --vendor nvidia|amd|apple|intel with --bandwidth") from None
        return {"name": name, "kind": "apple" if v == "apple" else "gpu", "vendor": v,
                "bandwidth_gb_s": float(bandwidth_gb_s), "memory_bytes": None, "hbm": False, "catalogued": False,
                "source": "not in the catalog: bandwidth given with --bandwidth"
                          + ("" if vendor else f", vendor {v} from its name")}
    out = {"name": d.name, "kind": "gpu", "vendor": vendor or d.vendor, "bandwidth_gb_s": float(d.bandwidth_gb_s),
           "memory_bytes": d.memory_bytes, "hbm": d.hbm, "source": f"catalog: {d.source}"}
    if d.vendor == "apple":
        out["kind"] = "apple"
    if bandwidth_gb_s:
        out["bandwidth_gb_s"], out["source"] = float(bandwidth_gb_s), "given with --bandwidth"
    return out


def this_cpu(bandwidth_gb_s: float | None, cals: list[dict] | None) -> dict[str, Any]:
    """This machine's CPU as a device: its fingerprint (harness.measure.fingerprint) with its bandwidth measured
    now (about 2 s; --bandwidth overrides the figure used, not the one compared), and for each CPU calibration
    given whether it is this machine's (`matches`: the identity fields equal, the bandwidth in its band)."""
    import psutil

    from harness.measure import env, fingerprint

    d = env.memory_bandwidth()  # the probe the runs use (compiled STREAM, numpy's without a compiler)
    now = d["measured_gb_s"] if d else None
    fp = fingerprint.collect(now)
    if bandwidth_gb_s:
        bw, src = bandwidth_gb_s, "given with --bandwidth"
    elif now:
        bw, src = now, f"measured now: {d['method']}"
    else:
        raise devices.UnknownDevice("cpu: its memory bandwidth could not be measured; give --bandwidth")
    matches = []
    for c in cals or []:
        cd = c.get("device") or {}
        if cd.get("kind") == "cpu":
            ok, why = fingerprint.same_machine(cd.get("fingerprint"), fp)
            matches.append({"calibration": c.get("source_path"), "this_machine": ok, "why": why})
    return {"name": fp["model_name"], "kind": "cpu", "vendor": "cpu", "bandwidth_gb_s": float(bw),
            "memory_bytes": psutil.virtual_memory().total, "source": src, "here": True, "fingerprint": fp,
            "matches": matches}


_VENDOR_WORDS = (("nvidia", r"nvidia|geforce|\brtx|\bgtx|quadro|tesla|\b[ahlbv]100\b|\bh200|\bl40|\bgb?200"),
                 ("amd", r"\bamd\b|radeon|instinct|\bmi\d{2,3}"), ("apple", r"apple|\bm[1-9]\b"),
                 ("intel", r"intel|\barc\b"))


def vendor_of(name: str) -> str | None:
    """A GPU's vendor from the words of its name ("NVIDIA RTX PRO 6000" -> nvidia), None where none says."""
    low = name.lower()
    return next((v for v, pat in _VENDOR_WORDS if re.search(pat, low)), None)


def _same_device(cal: dict, device: dict) -> bool:
    cd = cal.get("device") or {}
    if device.get("here"):  # this machine: by its fingerprint, never by the CPU's name
        return any(m["this_machine"] and m["calibration"] == cal.get("source_path") for m in device["matches"])
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
    printed = page.printed_speed(device.get("name"), quant) if device.get("kind") != "cpu" else None
    return {"vram_bytes": page.page_vram_bytes(quant), "file_bytes": page.page_file_bytes(quant), "tok_s": tok,
            "printed_tok_s": printed.tok_s if printed else None,
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
    if not same and device["kind"] == "cpu":  # one CPU's kernels are not another's: never carried by bandwidth
        xfer = crossgpu.load_shipped().get("cpu_transfer") or {}
        err = xfer.get("all")
        n_cpus = len({p["from"].split(" (")[0] for p in xfer.get("pairs") or []})
        if n_cpus < MIN_CPUS_FOR_BAND:
            raise calibration.CalibrationError(
                f"{device['name']} was not measured, and carrying {cal['device']['name']}'s calibration to another "
                f"CPU has an error band measured across {n_cpus} CPUs only (median "
                + (f"{err['median_ape']:.0%}, worst {err['worst_ape']:.0%}" if err else "unknown")
                + f"; at least {MIN_CPUS_FOR_BAND} are needed): declined. On that CPU, `harness estimate --device cpu` "
                "measures its kernels, and `make run` calibrates it")
        out["tok_s_rel"] = err["median_ape"] if err else math.nan
        out["rel_what"] = "the median error of carrying a calibration from one CPU to another (see the note)"
        out["notes"].insert(0, f"this CPU was not measured: {cal['device']['name']}'s calibration is carried, "
                               f"which between the {n_cpus} CPUs measured is off by median {err['median_ape']:.0%}, "
                               f"worst {err['worst_ape']:.0%}; ± is that error. Measure this CPU: `make run`")
    try:
        what = "needed" if device["kind"] == "cpu" else "peak"  # a CPU's RSS peak counts repacked weights twice
        mem, mem_rel, mem_notes = predict.predict_memory_bytes(cal, quant, context, what=what)
        out.update(memory_bytes=mem, memory_rel=mem_rel)
        if not same:
            mem_notes.append(f"memory overhead measured on {cal['device']['name']}: another device's runtime "
                             "(GPU context, drivers) differs")
        out["notes"] += [n for n in mem_notes if n not in out["notes"]]
    except calibration.CalibrationError as e:
        out.update(memory_bytes=None, memory_rel=None)
        out["notes"].append(str(e))
    return out


MIN_CPUS_FOR_BAND = 3  # CPUs a cross-CPU error band must be measured across before a calibration is carried


PROBE_BAND = 0.25  # a kernel probe measured now against the calibration's: within this share, the same machine


def confirm_this_machine(cal: dict, device: dict, quant: str) -> tuple[bool, str]:
    """Whether a calibration whose fingerprint is this machine's still measures as this machine: a short kernel
    probe now (the quant's most-weighted type that the calibration probed) against the calibration's cost of it.
    (confirmed, the line that says so)."""
    from harness.analysis import probe_here

    match = next(m["why"] for m in device["matches"] if m["calibration"] == cal.get("source_path"))
    probed = cal.get("probes") or {}
    types = tensor_types(cal, quant) or {}
    t = next((t for t, _ in sorted(types.items(), key=lambda kv: -kv[1]) if (probed.get(t) or {}).get("s_per_weight")),
             None)
    if t is None:
        return False, (f"{match}; not confirmed: the calibration has no kernel probe of {quant}'s types to measure "
                       "again, so its figures are not used")
    try:
        now = probe_here.kernel_costs([t], fresh=True)[t]["s_per_weight"]
    except (probe_here.ProbeHereError, RuntimeError, OSError) as e:
        return False, f"{match}; not confirmed: the kernel probe failed ({e})"
    then = probed[t]["s_per_weight"]
    ok = abs(now / then - 1) <= PROBE_BAND
    said = (f"a {t} kernel probe measured now: {now * 1e12:.2f} ps/weight vs {then * 1e12:.2f} in the "
            f"calibration ({now / then - 1:+.0%}, band ±{PROBE_BAND:.0%})")
    if ok:
        return True, f"this machine's calibration: {match}; confirmed by {said}"
    return False, f"{match}; NOT confirmed by {said}: its figures are not used"


def tensor_types(cal: dict | None, quant: str) -> dict[str, int] | None:
    """{ggml type: weights} of Llama 3.2 1B `quant`: from the calibration's measured file, else the shipped
    table (harness/data/crossgpu.json, the shape-faithful files' own types)."""
    types = (((cal or {}).get("quants") or {}).get(quant) or {}).get("tensor_types")
    return types or ((crossgpu.load_shipped().get("llama_3_2_1b") or {}).get("tensor_types") or {}).get(quant)


def here_estimate(cal: dict | None, device: dict, quant: str, context: int) -> dict[str, Any]:
    """tg tok/s of Llama 3.2 1B `quant` on this machine from its own kernels, measured now (the runner's kernel
    probes of the quant's tensor types; cached, so seconds after the first time): time per token = f x the
    probes' kernel time + overhead (+ the bytes term at this machine's bandwidth where the calibration's model
    has one), f and the overhead from `cal`'s probe model where it has one (another CPU's), else f = 1 and no
    overhead (the probes alone)."""
    from harness.analysis import probe_here
    from harness.analysis.points import kernel_seconds, kv_bytes_per_token

    types = tensor_types(cal, quant)
    if not types:
        raise calibration.CalibrationError(f"no tensor types known for {quant}: measure it (`harness run --quants "
                                           f"{quant}`)")
    costs = probe_here.kernel_costs([t for t in types if t.upper() != "F32"])
    k_s = kernel_seconds(types, costs)
    params = ((cal or {}).get("tg") or {}).get("params") or {}
    probe_model = bool(params.get("kernel_factor"))
    f = params["kernel_factor"] if probe_model else 1.0
    overhead = params.get("overhead", 0.0) if probe_model else 0.0
    size = ((((cal or {}).get("quants") or {}).get(quant) or {}).get("model_size_bytes")
            or ((crossgpu.load_shipped().get("llama_3_2_1b") or {}).get("model_size_bytes") or {}).get(quant) or 0.0)
    bw = device["bandwidth_gb_s"] * 1e9
    t0 = f * k_s + overhead + params.get("s_per_byte", 0.0) * size * (cal["device"]["bandwidth_gb_s"] * 1e9 / bw
                                                                      if probe_model and cal else 0.0)
    kv_read = kv_bytes_per_token() * context
    t_ctx = t0 + kv_read / bw  # the KV cache read at this machine's bandwidth: a lower bound on its cost
    tg = (cal or {}).get("tg") or {}
    rel = (tg.get("nested") or {}).get("rms_ape") if probe_model else math.nan
    where = ", ".join(f"{t} {c['s_per_weight'] * 1e12:.2f} ps/weight" for t, c in costs.items())
    notes = [f"kernel probes measured on this machine ({device['name']}): {where}; kernel time "
             f"{k_s * 1e3:.2f} ms per token"]
    if probe_model:
        notes.append(f"f = {f:.3f}" + (f" and overhead {overhead * 1e3:.2f} ms" if overhead else "")
                     + f" from {cal['device']['name']}'s probe model ({tg.get('chosen')}); ± is that model's "
                     "held-out error there: the factor is the probe's ratio to a whole model's time, not a CPU's speed")
    else:
        notes.append("f = 1, no overhead: " + ("no calibration given" if not cal else
                                                f"{cal['device']['name']}'s calibration has no probe model")
                     + "; the probes alone (their cost per weight excludes a whole model's per-token overhead)")
    notes.append(f"at {context:,} tokens: the KV cache read ({kv_read / 1e9:.3f} GB per token) added at "
                 f"{device['bandwidth_gb_s']:,.1f} GB/s ({device['source']}), attention's compute left out")
    out: dict[str, Any] = {"tok_s": 1 / t0, "tok_s_at_context": 1 / t_ctx, "tok_s_rel": rel, "notes": notes,
                           "basis": "kernel probes measured here", "kernel_s": k_s, "kernel_costs": costs,
                           "memory_bytes": None, "memory_rel": None, "context_extrapolated": False}
    if cal:
        out["rel_what"] = (f"{cal['device']['name']}'s probe model's held-out RMS error" if probe_model else
                           "unknown")
        try:
            mem, _, mem_notes = predict.predict_memory_bytes(cal, quant, context, what="needed")
            out.update(memory_bytes=mem, memory_rel=math.nan)
            out["notes"] += mem_notes
        except calibration.CalibrationError as e:
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
    on = crossgpu.basis(xcal, fam, x["family"])
    err_case = on["error"] or held.get("small") or held.get("all")
    rng = crossgpu.tok_s_range(x["tok_s"], err_case)

    def err(e, n):
        return (f"median {e['median_ape']:.0%}, RMS {e['rms_ape']:.0%}, worst {e['worst_ape']:.0%} over {n} rows"
                if e else f"none ({n} rows)")
    runtime = xcal.get("runtime") or crossgpu.DEFAULT_RUNTIME
    span = (f" (likely {rng[0]:,.0f}-{rng[1]:,.0f}" if rng and math.isfinite(rng[1]) else
            f" (likely above {rng[0]:,.0f}" if rng else " (no held-out error for this case")
    lines.append(f"calibrated: tg ~{x['tok_s']:,.0f} tok/s{span}{': ' + on['case'] if rng else ''}) on "
                 f"{runtime} with an empty cache, ~{x['tok_s_at_context']:,.0f} tok/s at {context:,} tokens (the KV "
                 "cache read added)")
    what = (f"this device's own ({x['family']})" if fam.get("basis") == "device" else
            "its back end's (no published row of its family)" if fam.get("basis") == "backend" else
            f"its family's ({x['family']})")
    lines.append(f"            rests on: {what} efficiency {fam['efficiency']:.2f} x {fam['kind_factor']:.2f} "
                 f"({fam['kind']}) of the spec bandwidth"
                 + (f", plus {on['floor']}" if on["floor"] else
                    f", overhead {fam['overhead_s'] * 1e3:.2f} ms/token" if fam.get("overhead_s") else "")
                 + f"; model {xcal.get('chosen')} ({why}; harness/data/crossgpu.json, from "
                 f"{xcal.get('built_from')})")
    if rng:
        lines.append(f"            the range is the held-out error ({(xcal.get('held_out') or {}).get('method')}) for "
                     f"{on['case']}: 1B-3B rows {err(err_case, on['n'])}")
    other = x.get("other_tok_s")
    if other and xcal.get("selection_close", True) and abs(other / x["tok_s"] - 1) > 0.25:
        lines.append(f"            the selection was close: the runner-up model ({xcal.get('other')}) says "
                     f"~{other:,.0f} tok/s here; a measurement on this device tells them apart")
    if fam.get("basis") == "device":  # this device's own published rows
        models = "; ".join(fam["models"][:4])
        lines.append(f"            this device's own {fam['n_rows']} published rows of {runtime} ({models}): "
                     f"{err(held.get('all'), held.get('n_all', 0))} ({held.get('method')}); they are of other "
                     "models, whose size is scaled")
    elif fam.get("devices"):
        lines.append(f"            {x['family']}: {fam['n_rows']} published rows on {len(fam['devices'])} "
                     f"device{'s' if len(fam['devices']) != 1 else ''} "
                     f"({', '.join(fam['devices'][:6])}{', ...' if len(fam['devices']) > 6 else ''}); its "
                     f"held-out error, all its rows: {err(held.get('all'), held.get('n_all', 0))}")
    for name, o in (xcal.get("other_runtimes") or {}).items():
        if device["name"] in o.get("devices", []):
            vs = (f"; its {o['n_predicted']} rows (on {', '.join(o['devices'])}) run at a median "
                  f"{o['measured_over_fit_median']:.2f}x this fit's prediction" if o.get("measured_over_fit_median")
                  else "")
            lines.append(f"            this device also has rows of {name} ({', '.join(o['sources'])}): another "
                         f"runtime, not in the fit{vs}; this estimate is for {runtime}")
    if on["upper_bound"]:
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
    lines = [f"Llama 3.2 1B {quant} on {device['name']} ({f'{bw:,.1f} GB/s' if bw else 'bandwidth unknown'}"
             + (f", {mem / GIB:,.1f} GiB" if mem else "")
             + f"; {device['source']})"]
    if pg is None:
        lines.append(f"page:       no row for {quant} (it lists {', '.join(page.BY_QUANT)})")
    else:
        rule = f"{bw:,.0f} GB/s / {pg['model_gb']:.3g} GB x {pg['efficiency']}" if pg["tok_s"] else ""
        if pg.get("printed_tok_s"):
            tok = (f"~{pg['printed_tok_s']:,} tok/s printed (= {rule}; it claims ±20%: "
                   f"{pg['tok_s'] * 0.8:,.0f}-{pg['tok_s'] * 1.2:,.0f})")
        else:
            tok = (f"no speed printed for this device and quant; its rule extrapolated: ~{pg['tok_s']:,.0f} tok/s = "
                   f"{rule}" if pg["tok_s"] else "no tok/s")
        lines.append(f"page:       VRAM {pg['vram_bytes'] / GB:.1f} GB, file {pg['file_bytes'] / GB:.2f} GB, {tok}; "
                     "no context term")
    if est is not None and est.get("basis") == "kernel probes measured here":
        mem_s = (f"; memory needed ~{est['memory_bytes'] / GB:.2f} GB at context {context:,}"
                 if est.get("memory_bytes") else "")
        lines.append(f"measured:   tg ~{est['tok_s']:,.1f} tok/s{_pm(est['tok_s_rel'])} with an empty cache, "
                     f"~{est['tok_s_at_context']:,.1f} tok/s at {context:,} tokens of context{mem_s} ({why})")
        lines += [f"            note: {n}" for n in est["notes"]]
        return "\n".join(lines)
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
                                                   '"M2 Max", or "cpu" (this machine: its kernels measured now)')
    p.add_argument("--quant", required=True, help="quant name, e.g. Q4_K_M")
    p.add_argument("--context", type=int, default=2048, help="tokens of context (default 2048, the page's '2K')")
    p.add_argument("--calibration", type=Path, nargs="+", default=[], metavar="FILE",
                   help="calibration.json files from `harness report` (the same device's is used, else the "
                        "nearest bandwidth's)")
    p.add_argument("--bandwidth", type=float, help="the device's memory bandwidth, GB/s: overrides the catalog's, "
                                                   "or names a GPU the catalog does not know")
    p.add_argument("--vendor", choices=["nvidia", "amd", "apple", "intel"],
                   help="the GPU's vendor, where the catalog does not know it and its name does not say")
    p.add_argument("--backend", choices=["cuda", "vulkan", "rocm", "metal"],
                   help="llama.cpp's backend on a GPU (default: CUDA on NVIDIA, ROCm on AMD, Metal on Apple)")
    p.add_argument("--json", action="store_true", help="the same figures as one JSON object on stdout")
    from harness import estimate_serving

    estimate_serving.add_arguments(p)


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def main(args) -> int:
    try:
        quants.get(args.quant)
    except quants.UnknownQuant as e:
        return _error(str(e))
    if args.context < 0:
        return _error("--context must be >= 0")
    from harness import estimate_serving

    bad = estimate_serving.check(args)
    if bad:
        return _error(bad)
    if args.bandwidth is not None and not args.bandwidth > 0:
        return _error("--bandwidth must be a positive number of GB/s")
    try:
        cals = [calibration.load(p) for p in args.calibration]
    except calibration.CalibrationError as e:
        return _error(str(e))
    try:
        device = resolve_device(args.device, args.bandwidth, cals, args.vendor)
    except devices.UnknownDevice as e:
        return _error(str(e))
    if args.users is not None:  # N users at C tokens each: memory term by term and a batched step model
        return estimate_serving.main(args, device, cals, _error, _json)
    pg = page_estimate(device, args.quant)
    doc: dict[str, Any] = {"device": device, "quant": args.quant, "context": args.context, "page": pg}
    if device["kind"] != "cpu":
        # a CPU's fit is kernel-bound: never carried to a GPU; an RPC device's calibration (kind "rpc") is its
        # server's and the network's speed: never a GPU's
        gpu_cals = [c for c in cals if (c.get("device") or {}).get("kind") == "gpu"]
        if not gpu_cals:
            xcal = crossgpu.load_shipped()
            why = ("no GPU calibration given" if not cals else
                   "the calibrations given are of CPUs or of llama.cpp's RPC device, whose speed is not a GPU's: "
                   "not carried to a GPU")
            x = cross_device_estimate(xcal, device, args.quant, args.context, args.backend)
            doc["cross_device"] = {**{k: v for k, v in x.items() if k != "fam"}, "terms": x.get("fam"),
                                   "runtime": xcal.get("runtime") or crossgpu.DEFAULT_RUNTIME, "why_basis": why,
                                   "buffers": device_buffers(args.quant, args.context)}
            if args.json:
                return _json(doc)
            lines = render(device, args.quant, args.context, pg, None, "", None).splitlines()[:2]
            render_cross(lines, device, args.context, x, xcal, why)
            print("\n".join(lines))
            return 0
        cals = gpu_cals
    cal, why = choose(cals, device) if cals else (None, "no --calibration given")
    est = None
    own = False
    mine = bool(device.get("here")) and cal is not None and _same_device(cal, device)  # by its fingerprint
    if mine:
        own, why = confirm_this_machine(cal, device, args.quant)
    if device.get("here") and not own:
        # this machine, not calibrated here (or not confirmed): its own kernels, measured now, instead of another
        # machine's fit
        try:
            est = here_estimate(cal, device, args.quant, args.context)
            est["notes"] += [f"{m['calibration']}: {m['why']}" for m in device["matches"] if not m["this_machine"]]
            if mine:  # this machine's fingerprint, not confirmed by its probe: why
                est["notes"].append(why)
            why = ("kernel probes measured on this machine" + (f"; factors from {cal['device']['name']}" if cal
                                                               else ""))
        except (calibration.CalibrationError, RuntimeError, OSError) as e:
            why, cal = str(e), None
    elif cal is not None:
        try:
            est = calibrated_estimate(cal, device, args.quant, args.context)
        except calibration.CalibrationError as e:
            why = str(e)
            cal = None
    doc["calibrated"] = None if est is None else {
        **{k: v for k, v in est.items() if k != "kernel_costs"}, "why": why,
        "calibration": (cal or {}).get("source_path"),
        "calibration_device": ((cal or {}).get("device") or {}).get("name"),
        "model": ((cal or {}).get("tg") or {}).get("chosen")}
    if est is None:
        doc["why_none"] = why
    if args.json:
        return _json(doc)
    print(render(device, args.quant, args.context, pg, cal, why, est))
    return 0


def _json(doc: dict[str, Any]) -> int:
    import json

    def clean(v):
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    print(json.dumps(clean(doc), indent=1, default=float))
    return 0
