"""``python -m harness estimate --users N --context C``: N users at C tokens each, on any catalogued device.

    python -m harness estimate --device "H100 SXM" --quant Q4_K_M --users 16 --context 4096 [--prompt 512]
        [--batched RESULTS_DIR_OR_FILE ...] [--kv-unified] [-ctk q8_0 -ctv q8_0] [--json]

Memory term by term (llama.cpp's buffers: harness.analysis.serving), whether it fits and the most users that fit
at C; a speed from a batched step model (weights read once a step, each user's KV read, each user's compute), and
the time to the first token of N users arriving at once with P prompt tokens each. Each term says what it rests
on: this device's batched records (``batched.jsonl``, fitted here), or on a GPU without them, the cross-device fit
of published single-stream rows and the published batched rows of ``harness/data/batched-published.json``, which
are of another model on another GPU, and the output says so beside each figure.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from harness.analysis import crossgpu
from harness.analysis import serving as sv

log = logging.getLogger(__name__)

GB = 1e9
GIB = 1024**3
NO_GPU_BATCHED = "no GPU batched measurement of this model stands behind it"


def add_arguments(p) -> None:
    """The serving options of `estimate` (harness.estimate.add_parser)."""
    g = p.add_argument_group("serving (--users N --context C: N users at C tokens of context each)")
    g.add_argument("--users", type=int, metavar="N", help="users decoding at once (llama.cpp's parallel sequences)")
    g.add_argument("--prompt", type=int, metavar="P", help="prompt tokens each user arrives with, for the time to "
                                                           "first token (default: 512, or C if smaller)")
    g.add_argument("--batched", type=Path, nargs="+", default=None, metavar="PATH",
                   help="batched.jsonl files or results folders to fit the step model on (default: every "
                        "batched.jsonl under ./results or $HARNESS_RESULTS)")
    g.add_argument("--kv-unified", dest="kv_unified", action="store_true",
                   help="one KV cache shared by all users (llama.cpp's --kv-unified; default: split by user)")
    g.add_argument("-ctk", "--cache-type-k", dest="cache_type_k", default="f16", help="K cache type (default f16)")
    g.add_argument("-ctv", "--cache-type-v", dest="cache_type_v", default="f16", help="V cache type (default f16)")


def check(args) -> str | None:
    """The one-line complaint about the serving arguments, or None."""
    if args.users is None:
        return None
    if args.users < 1:
        return f"--users must be at least 1, got {args.users}"
    if args.users > sv.LLAMA_MAX_SEQ:
        return (f"--users {args.users}: llama.cpp holds at most {sv.LLAMA_MAX_SEQ} sequences at once "
                "(LLAMA_MAX_SEQ)")
    if args.context < 1:
        return f"--context must be at least 1 token per user, got {args.context}"
    if args.prompt is not None and not 1 <= args.prompt <= args.context:
        return f"--prompt must be between 1 and the context per user ({args.context:,}), got {args.prompt}"
    from harness.catalog.quants import suggest
    from harness.config import CACHE_TYPES

    for flag, t in (("-ctk", args.cache_type_k), ("-ctv", args.cache_type_v)):
        if t not in CACHE_TYPES:
            return f"{flag} {t!r}: not a KV cache type llama.cpp takes{suggest(t, CACHE_TYPES)}; it takes " \
                   f"{', '.join(CACHE_TYPES)}"
    return None


# --- batched records ---------------------------------------------------------------------------------------------

def find_batched(paths: list[Path] | None) -> list[Path]:
    """batched.jsonl files: the paths given (files, or folders searched), else those under the results folder."""
    from harness.config import output_dir

    roots = paths if paths is not None else [output_dir("results")]
    out: list[Path] = []
    for p in roots:
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(p.rglob("batched.jsonl"))
        elif paths is not None:
            raise sv.ServingError(f"--batched {p}: no such file or folder")
    return out


def _same_model(r: dict[str, Any]) -> bool:
    s = (r.get("extra") or {}).get("shape") or {}
    a = sv.ARCH_1B
    return (s.get("n_layer"), s.get("n_embd"), s.get("n_head_kv"), s.get("head_dim")) == \
        (a.n_layer, a.n_embd, a.n_head_kv, a.head_dim)


def records_for(files: list[Path], device: dict[str, Any]) -> tuple[list[dict], list[str], list[str]]:
    """The batched records of Llama 3.2 1B on `device` (this CPU by its fingerprint; a GPU by its name), the
    runs they come from, and one note per file whose records are not used and why."""
    from harness.catalog import devices

    used, runs, notes = [], [], []
    for f in files:
        recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        recs = [r for r in recs if r.get("test") == "batched"]
        if not recs:
            continue
        env_p = f.parent / "env.json"
        env = json.loads(env_p.read_text()) if env_p.is_file() else {}
        name = f.parent.name
        if not any(_same_model(r) for r in recs):
            s = (recs[0].get("extra") or {}).get("shape") or {}
            notes.append(f"{name}: records of another model ({s.get('n_layer')} layers, n_embd {s.get('n_embd')}), "
                         "not Llama 3.2 1B's: not used")
            continue
        recs = [r for r in recs if _same_model(r)]
        kind = (recs[0].get("device") or "cpu").lower()
        if device["kind"] == "cpu":
            if kind != "cpu":
                notes.append(f"{name}: records on {recs[0].get('device')}, not a CPU: not used")
                continue
            if device.get("here"):
                from harness.measure import fingerprint

                ok, why = fingerprint.same_machine(((env.get("cpu") or {}).get("fingerprint")), device["fingerprint"])
                if not ok:
                    notes.append(f"{name}: {why}: not used (a CPU's batched speed is its own)")
                    continue
            elif ((env.get("cpu") or {}).get("model")) != device["name"]:
                notes.append(f"{name}: measured on {(env.get('cpu') or {}).get('model')}: not used")
                continue
        else:
            gpu = devices.find(recs[0].get("gpu_name"))
            if kind.startswith("rpc") or gpu is None or gpu.name != device["name"]:
                notes.append(f"{name}: records on {recs[0].get('gpu_name') or recs[0].get('device')}, not "
                             f"{device['name']}: not used")
                continue
        used += recs
        runs.append(name)
    return used, runs, notes


# --- the estimate ------------------------------------------------------------------------------------------------

def size_of(quant: str) -> float:
    """Llama 3.2 1B `quant`'s tensors in bytes (the shape-faithful files' own, harness/data/crossgpu.json)."""
    sizes = (crossgpu.load_shipped().get("llama_3_2_1b") or {}).get("model_size_bytes") or {}
    if quant in sizes:
        return float(sizes[quant])
    m = sv.model_buffers(quant)
    return float(m["device"] + m["host"])


def estimate(device: dict[str, Any], quant: str, users: int, context: int, prompt: int, files: list[Path],
             type_k: str = "f16", type_v: str = "f16", unified: bool = False, backend: str | None = None,
             cal: dict | None = None) -> dict[str, Any]:
    """Everything the serving estimate prints, as a dict (also what --json gives)."""
    mem = sv.memory(quant, users, context, type_k, type_v, unified)
    on_device = device["kind"] != "cpu"
    cap = device.get("memory_bytes")
    fixed = None
    if not on_device and cal and ((cal.get("memory") or {}).get("overhead_bytes") or 0) > 0:
        fixed = {"bytes": cal["memory"]["overhead_bytes"], "basis": f"the calibration's memory overhead "
                 f"({cal.get('source_path')})"}
    used_total = sv.total(mem, on_device) + (fixed["bytes"] if fixed else 0)
    doc: dict[str, Any] = {
        "device": {k: v for k, v in device.items() if k not in ("fingerprint", "matches")}, "quant": quant,
        "users": users, "context": context, "prompt": prompt, "memory": mem, "fixed_cost": fixed,
        "total_bytes": used_total, "capacity_bytes": cap,
        "fits": None if not cap else used_total <= cap,
        "max_users": None if not cap else sv.max_users(quant, context, cap - (fixed["bytes"] if fixed else 0),
                                                       on_device, type_k, type_v, unified)}
    recs, runs, notes = records_for(files, device)
    doc["records"] = {"files": [str(f) for f in files], "runs": runs, "notes": notes, "n": len(recs)}
    doc["compute_measured"] = _measured_compute(recs, quant) if not on_device else None
    size = size_of(quant)
    ctx_kv = mem["kv_bytes_per_cell"]
    if recs:
        doc["speed"] = _measured_speed(device, recs, quant, size, users, context, prompt, ctx_kv)
    elif on_device:
        doc["speed"] = _gpu_speed(device, quant, size, users, context, prompt, ctx_kv, backend)
    else:
        doc["speed"] = {"none": "no batched records of Llama 3.2 1B on this CPU: run the serving sweep "
                                "(`python -m harness run configs/1b-serving.yaml`) and pass its folder with "
                                "--batched; a CPU's speed is never carried from another machine or a GPU"}
    return doc


def _measured_compute(recs: list[dict], quant: str) -> dict[str, Any] | None:
    """A CPU run's own compute buffer of `quant` (a cell whose prompts filled a ubatch, the largest context per
    user) beside the table's figure at that context: the table is llama.cpp's as fully offloaded."""
    full = [r for r in recs if r.get("quant") == quant and r.get("compute_bytes")
            and r["batched"]["pl"] * r["batched"]["pp"] >= r["batched"]["n_ubatch"]]
    if not full:
        return None
    r = max(full, key=lambda r: r["n_ctx"] // r["batched"]["pl"])
    per = r["n_ctx"] // r["batched"]["pl"]
    t = sv.compute_buffers(quant, per)
    return {"bytes": r["compute_bytes"], "ctx_per_user": per, "n_ubatch": r["batched"]["n_ubatch"],
            "table_bytes": t["device"] + t["host"], "run": r.get("run_id")}


def _measured_speed(device, recs, quant, size, users, context, prompt, kvb) -> dict[str, Any]:
    cells, notes = sv.cells_of(recs)
    bw = device.get("bandwidth_gb_s")
    kv_fallback = 1 / (bw * 1e9) if bw else None
    fit = sv.fit_step(cells, kv_fallback, f"this device's bandwidth ({bw:,.1f} GB/s, {device.get('source')}): "
                                          "the KV read can take no less; the records' contexts do not tell it "
                                          "apart" if bw else "")
    st = sv.predict_step(fit, quant, size, users, context, kvb)
    pf = sv.fit_prompt(cells)
    ttft, per_token, ttft_how = sv.predict_ttft(pf, quant, size, users, prompt)
    basis = (f"fitted on {fit['n_cells']} batched cells of this device ({', '.join(sorted(fit['quants']))}; "
             f"users {', '.join(str(p) for p in sorted({p for q in fit['quants'].values() for p in q['pl']}))}); "
             f"in-sample error RMS {fit['rms_rel']:.0%}, worst {fit['worst_rel']:.0%}")
    return {"basis": "measured", "fit": {k: v for k, v in fit.items()}, "notes": notes + fit["notes"],
            "terms": [
                {"what": "weights + the step's fixed work", "s": st["weights_s"],
                 "basis": basis + ("" if st["how"] == "measured" else f"; {st['how']}")},
                {"what": "KV read", "s": st["kv_s"],
                 "basis": f"{users} x {context:,} tokens x {kvb / 1024:.1f} KiB at {fit['k_s_per_byte'] * 1e12:.2f} "
                          f"ps/byte: {fit['k_basis']}"},
                {"what": "compute per user", "s": st["compute_s"],
                 "basis": f"{users} x {st['g_s'] * 1e3:.3f} ms"
                          + ("" if st["how"] == "measured" else f" ({st['how']})")}],
            "step_s": st["step_s"], "ttft_s": ttft,
            "ttft_basis": (f"{users} x {prompt:,} tokens at {per_token * 1e3:.3f} ms a token: the prompt phase of "
                           f"this device's batched cells, prompts of {', '.join(map(str, pf['pp']))} tokens"
                           + ("" if ttft_how == "measured" else f" ({ttft_how})")
                           + ("" if pf["mu_s"] else
                              "; one prompt length only: attention's growth with a longer prompt is not in it"
                              if len(pf["pp"]) < 2 else "; no growth with the prompt's length found in them"))}


def _gpu_speed(device, quant, size, users, context, prompt, kvb, backend) -> dict[str, Any]:
    xcal = crossgpu.load_shipped()
    rate0, fam, family = crossgpu.predict_tok_s(xcal, device["vendor"], device["bandwidth_gb_s"], size, quant,
                                                backend, device=device["name"], hbm=bool(device.get("hbm")))
    if rate0 is None:
        return {"none": f"the cross-device fit has no terms for this device: {family}"}
    bw = device["bandwidth_gb_s"] * 1e9
    s_byte = 1 / (fam["efficiency"] * fam["kind_factor"] * bw)  # the fit's seconds per byte of this quant
    q8 = ((xcal.get("kinds") or {}).get("q8_0") or {}).get("factor", 1.0)
    s_byte_q8 = 1 / (fam["efficiency"] * q8 * bw)
    pub = sv.published_terms()
    src = pub["source"]
    scale = (sv.ARCH_1B.n_params() / pub["params"]) * (s_byte_q8 / pub["s_per_byte"])
    g = pub["g_s"] * scale
    tau = pub["tau_s"] * scale
    floor = fam.get("overhead_s", 0.0)
    weights = size * s_byte
    kv = users * context * kvb * s_byte
    on = crossgpu.basis(xcal, fam, family)
    runtime = xcal.get("runtime") or crossgpu.DEFAULT_RUNTIME
    where = (f"{src['model'].rsplit('/', 1)[-1]} ({src['params']} parameters, {src['weights_type']}) on "
             f"{src['device']} ({src['backend']}, llama.cpp {src['build']}, {src['date']}: {src['url']})")
    lo, hi = min(pub["pp"]), max(pub["pp"])
    pp_fall = 1 - (pub["tau_s"] + pub["mu_s"] * lo) / (pub["tau_s"] + pub["mu_s"] * hi)
    return {
        "basis": "carried", "family": family, "runtime": runtime, "published": {k: v for k, v in pub.items()
                                                                                if k != "source"},
        "published_source": src["id"],
        "terms": [
            {"what": "step floor", "s": floor,
             "basis": f"{on['floor'] or 'the fit of ' + family}: the cross-device fit of published llama-bench tg rows "
                      f"({runtime}), one user: {NO_GPU_BATCHED}"},
            {"what": "weights read once", "s": weights,
             "basis": f"{size / GB:.3f} GB at the fit's {1 / s_byte / GB:,.0f} GB/s for {quant} ({family}: efficiency "
                      f"{fam['efficiency']:.2f} x {fam['kind_factor']:.2f} of {device['bandwidth_gb_s']:,.0f} GB/s), "
                      f"the single-stream rows' term: {NO_GPU_BATCHED}"},
            {"what": "KV read", "s": kv,
             "basis": f"{users} x {context:,} tokens x {kvb / 1024:.1f} KiB at the same rate per byte, as the "
                      f"single-user estimate's context term: {NO_GPU_BATCHED}"},
            {"what": "compute per user", "s": users * g,
             "basis": f"{users} x {g * 1e3:.4f} ms: the per-user term of published batched rows of another model "
                      f"on another GPU, {where}, {pub['g_s'] * 1e3:.3f} ms a user there ({pub['n_rows']} rows, "
                      f"fit error RMS {pub['rms_rel']:.1%}), scaled by parameters ({sv.ARCH_1B.n_params() / 1e9:.2f} "
                      f"B / {pub['params'] / 1e9:.2f} B) and by seconds per byte of Q8_0 weights (this device's "
                      f"{s_byte_q8 * 1e12:.3f} ps from the cross-device fit / {pub['s_per_byte'] * 1e12:.3f} ps "
                      f"there): assumes this device's compute-to-bandwidth ratio is the {src['device']}'s; "
                      f"{NO_GPU_BATCHED}"}],
        "step_s": floor + weights + kv + users * g,
        "single_user_tok_s": rate0,
        "ttft_s": users * prompt * tau,
        "ttft_basis": (f"{users} x {prompt:,} tokens at {tau * 1e3:.4f} ms a token: the prompt rate of the same "
                       f"published rows ({pub['tau_s'] * 1e3:.3f} ms a token there), scaled the same way; attention's "
                       f"growth with the prompt not carried (there the rate falls {pp_fall:.0%} from "
                       f"{lo:,} to {hi:,} tokens); {NO_GPU_BATCHED}"),
    }


# --- printing ----------------------------------------------------------------------------------------------------

def _gb(b: float) -> str:
    return f"{b / GB:,.3f} GB"


def render(doc: dict[str, Any]) -> str:
    d, m = doc["device"], doc["memory"]
    n, c = doc["users"], doc["context"]
    on_device = d["kind"] != "cpu"
    bw = d.get("bandwidth_gb_s")
    cap = doc["capacity_bytes"]
    lines = [f"Llama 3.2 1B {doc['quant']} on {d['name']} ({f'{bw:,.1f} GB/s' if bw else 'bandwidth unknown'}"
             + (f", {cap / GIB:,.1f} GiB" if cap else "") + f"; {d['source']}): {n} users x {c:,} tokens each"]
    per_user = m["kv_cells_per_user"]
    streams = "one stream shared by all" if m["unified"] else f"{n} x {per_user:,} per user"
    kv_how = (f"{m['kv_cells']:,} cells ({streams}; "
              f"llama.cpp pads to 256) x {m['kv_bytes_per_cell']:,} bytes ({sv.ARCH_1B.n_layer} layers x K "
              f"{m['type_k']} + V {m['type_v']} rows of {sv.ARCH_1B.n_head_kv} x {sv.ARCH_1B.head_dim})")
    side = "on the GPU" if on_device else "in RAM"
    lines.append(f"memory {side}:")
    rows = [("weights", m["weights_device"] if on_device else m["weights_device"] + m["weights_host"],
             "llama.cpp's model buffer" + (" on the device" if on_device else "s (all in RAM on a CPU: token_embd "
                                          "included; repacked tensors counted once)")
             + " (harness/data/buffers-1b.json: its no_alloc arithmetic)"),
            ("KV", m["kv"], kv_how),
            ("compute", m["compute_device"] if on_device else m["compute_device"] + m["compute_host"],
             f"llama.cpp's compute buffer{'' if on_device else 's (device + host, as fully offloaded)'} for one "
             f"user's {m['kv_cells_per_user']:,} cells, {m['compute_how']} (buffers-1b.json, n_ubatch "
             f"{m['n_ubatch']}, flash attention on): reserved for a full ubatch, it does not grow with the users")]
    if not on_device:
        rows.append(("output", m["output"], f"{n} x {sv.ARCH_1B.n_vocab:,} logits x 4 bytes (n_seq_max rows)"))
    for name, b, why in rows:
        lines.append(f"  {name:<12}{_gb(b):>12}   {why}")
        cm = doc.get("compute_measured")
        if name == "compute" and cm:
            lines.append(f"  {'':<12}{'':>12}   this CPU's own, measured (run {cm['run']}): {_gb(cm['bytes'])} at "
                         f"{cm['ctx_per_user']:,} tokens per user, n_ubatch {cm['n_ubatch']} (the table: "
                         f"{_gb(cm['table_bytes'])} there)")
    fixed = doc["fixed_cost"]
    if fixed:
        lines.append(f"  {'fixed cost':<12}{_gb(fixed['bytes']):>12}   {fixed['basis']}")
    else:
        lines.append(f"  {'fixed cost':<12}{'-':>12}   not counted: the runtime's fixed cost "
                     + ("(CUDA context, cuBLAS workspace, pools) has not been measured on a GPU here"
                        if on_device else "(the process and its libraries) needs a calibration of this machine "
                                          "with a memory fit (--calibration)"))
    tot = doc["total_bytes"]
    fit = ("" if cap is None else
           f": {'fits' if doc['fits'] else 'does NOT fit'} in {cap / GIB:,.1f} GiB; the most users that fit at "
           f"{c:,} tokens each: "
           + (f"{doc['max_users']}" if doc["max_users"] < sv.LLAMA_MAX_SEQ else
              f"all {sv.LLAMA_MAX_SEQ} llama.cpp holds (LLAMA_MAX_SEQ)")
           + (" (without the fixed cost)" if not fixed else ""))
    lines.append(f"  {'total':<12}{_gb(tot):>12}" + (" + the fixed cost" if not fixed else "") + fit)
    if on_device:
        lines.append(f"  on the host: {_gb(m['weights_host'] + m['compute_host'] + m['output'])} = token_embd "
                     f"{_gb(m['weights_host'])} (llama.cpp keeps the input embeddings there) + compute "
                     f"{_gb(m['compute_host'])} + output {_gb(m['output'])} ({n} x {sv.ARCH_1B.n_vocab:,} logits "
                     "x 4 bytes)")
    sp = doc["speed"]
    if "none" in sp:
        lines.append(f"speed:      none ({sp['none']})")
    else:
        lines.append(f"speed: one generation step of {n} users at {c:,} tokens each (the last step of a full context, "
                     "the slowest)")
        for t in sp["terms"]:
            lines.append(f"  {t['what']:<32}{t['s'] * 1e3:>10.3f} ms   {t['basis']}")
        step = sp["step_s"]
        lines.append(f"  {'step':<32}{step * 1e3:>10.3f} ms   -> ~{n / step:,.0f} tok/s aggregate, ~{1 / step:,.1f} "
                     "tok/s per user" + (f" (one user alone, empty cache: ~{sp['single_user_tok_s']:,.0f} tok/s by "
                                         "the cross-device fit)" if sp.get("single_user_tok_s") else "")
                     + (f": the sum of the terms above, {NO_GPU_BATCHED}" if sp["basis"] == "carried" else ""))
        lines.append(f"first token: ~{sp['ttft_s']:,.2f} s for {n} users arriving at once with {doc['prompt']:,} "
                     f"prompt tokens each ({sp['ttft_basis']})")
        for note in sp.get("notes") or []:
            lines.append(f"  note: {note}")
    for note in doc["records"]["notes"]:
        lines.append(f"  records: {note}")
    return "\n".join(lines)


def main(args, device: dict[str, Any], cals: list[dict], _error, _json) -> int:
    """The serving estimate for resolved `device` (harness.estimate.main has checked the quant and device, and
    hands in its one-line error and its JSON printer)."""
    try:
        files = find_batched(args.batched)
        prompt = args.prompt or min(512, args.context)
        cal = next((c for c in cals if (c.get("device") or {}).get("kind") == device["kind"]), None)
        doc = estimate(device, args.quant, args.users, args.context, prompt, files, args.cache_type_k,
                       args.cache_type_v, args.kv_unified, args.backend, cal)
    except sv.ServingError as e:
        return _error(str(e))
    if args.json:
        return _json(doc)
    print(render(doc))
    return 0
