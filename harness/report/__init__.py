"""The report of one run: the page's predictions beside the measurements, per quant, with verdicts.

``python -m harness report RESULTS_DIR [--out DIR]`` reads ``records.jsonl`` and ``env.json`` and writes
``reports/<run-id>/``: ``report.md``, a self-contained ``report.html`` (figures embedded as PNG),
``summary.csv`` (the per-quant table), ``calibration.json`` (:mod:`harness.analysis.calibration`) and, where the
run has the batched test (``batched.jsonl``), ``serving.csv`` (:mod:`harness.report.serving`).

Every table and figure is a pure function of the records DataFrame, the environment dict and the
calibration dict, so the report is tested on records made in the test.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pandas as pd

from harness import schema
from harness.analysis import calibration, crossgpu, kernels, points, summary
from harness.catalog import page
from harness.config import output_dir
from harness.report import serving
from harness.report.figures import fig_page_gpus, fig_quality, fig_serving, figures
from harness.report.render import render_html, render_markdown
from harness.report.tables import (
    CONTEXT_HEAD,
    DEVICE_MEMORY_HEAD,
    KV_HEAD,
    MEMORY_HEAD,
    PAGE_GPU_HEAD,
    PAGE_GPU_PUBLISHED_HEAD,
    PROBE_HEAD,
    QUALITY_HEAD,
    QUALITY_MEASURED_HEAD,
    SIZE_HEAD,
    SPEED_HEAD,
    calibration_lines,
    context_rows,
    context_table,
    device_memory_rows,
    device_statement,
    kv_rows,
    memory_rows,
    page_gpu_published_rows,
    page_gpu_rows,
    probe_rows,
    quality_measured_rows,
    quality_points,
    quality_table,
    quant_table,
    size_rows,
    speed_rows,
    weights_statement,
)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


def default_reports() -> Path:
    return output_dir("reports")


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


def load_contexts(results_dir: str | Path) -> pd.DataFrame | None:
    """The memory test's records of a results folder (contexts.jsonl), None where the run made none."""
    path = Path(results_dir) / "contexts.jsonl"
    if not path.is_file():
        return None
    return summary.records_frame(schema.read_records(path))


def load_quality(results_dir: str | Path) -> pd.DataFrame | None:
    """The quality test's records (quality.jsonl), None where the run made none."""
    path = Path(results_dir) / "quality.jsonl"
    if not path.is_file():
        return None
    return summary.records_frame(schema.read_records(path))


def load_batched(results_dir: str | Path) -> pd.DataFrame | None:
    """The batched test's records (batched.jsonl), None where the run made none."""
    path = Path(results_dir) / "batched.jsonl"
    if not path.is_file():
        return None
    return summary.records_frame(schema.read_records(path))


def load_probes(results_dir: str | Path) -> pd.DataFrame | None:
    """The kernel-probe records of a results folder (probes.jsonl), None where the run measured none."""
    path = Path(results_dir) / "probes.jsonl"
    if not path.is_file():
        return None
    return summary.records_frame(schema.read_records(path))


def _sections(df: pd.DataFrame, env: dict, t: pd.DataFrame, cal: dict, device: dict, run_id: str,
              probe_df: pd.DataFrame | None = None, ctxp: pd.DataFrame | None = None,
              gpus: tuple[dict, list[dict]] | None = None, mem_df: pd.DataFrame | None = None,
              qp: pd.DataFrame | None = None, qdf: pd.DataFrame | None = None,
              serving_blocks: list[tuple] | None = None, everything: pd.DataFrame | None = None) -> list[tuple]:
    """The report as (kind, payload) blocks, rendered to markdown or HTML: ("h", text), ("p", markdown-ish
    text), ("list", [lines]), ("table", head, rows), ("fig", name), ("raw-md", text). `everything`: the pp/tg
    records with the batched test's, for what the report says of the files (weights, model, versions)."""
    ok = df[df.status == "ok"] if len(df) else df
    every = everything if everything is not None else df
    every_ok = every[every.status == "ok"] if len(every) else every
    versions = ", ".join(sorted(every_ok.llama_cpp_version.dropna().unique())) if len(every_ok) else ""
    harness = env.get("harness") or {}
    head = ("Llama 3.2 1B quants: the page's claims vs measurements" if points.is_page_model(every)
            else "GGUF files measured with llama.cpp")
    s: list[tuple] = [("h1", f"{head} - run {run_id}")]
    s.append(("p", weights_statement(every)))
    if len(every_ok) and not points.is_page_model(every):
        models = sorted(every_ok.model_desc.dropna().astype(str).unique())
        whose = "this model's own" if len(models) == 1 else f"these {len(models)} models' own, fitted together"
        s.append(("p", f"The page covers Llama 3.2 1B only, and these files are not it ({', '.join(models[:4])}): no "
                       f"page figures or verdicts here; speed, memory, llama.cpp's buffers and the calibration are "
                       f"{whose}."))
    s.append(("p", device_statement(device)))
    s.append(("p", f"llama-cpp-python {versions or '-'}; harness commit {harness.get('commit') or '-'}"
                   f"{' (dirty)' if harness.get('dirty') else ''}; environment recorded {env.get('utc') or '-'}."))
    s.append(("p", _settings_line(ok) if len(ok) or not serving_blocks else
                   "No pp or tg test in this run (bench.n_prompt and bench.n_gen are 0): the batched test only, in "
                   "Serving below."))
    reach = _llama_bandwidth_line(t, device, env)
    if reach:
        s.append(("p", reach))
    for w in env.get("warnings") or []:
        s.append(("p", f"WARNING: {w}"))
    if not t.empty:
        s += _headline(t, device)
        s.append(("h2", "Speed"))
        s.append(("p", "tg: generation, pp: prompt processing, in tok/s over the repetitions: mean ± sample "
                       "standard deviation (n), as llama-bench reports it, and the median with its 95% bootstrap "
                       "interval. Quants whose intervals overlap are listed as not distinguishable: their order "
                       "in this table is not a ranking. The verdicts and the calibration use the median. "
                       "'calibrated (held out)': the fitted model's prediction for a quant when that quant is left "
                       "out of the fit."))
        s.append(("table", SPEED_HEAD, speed_rows(t)))
        s.append(("fig", "speed.png"))
        s.append(("h2", "Memory"))
        src = ("NVML (the process's usage, else the device's growth since load)" if device.get("peak_source") ==
               "gpu" else "the process's peak resident set (VmHWM), which includes the Python runtime")
        s.append(("p", "'needed': on a GPU, the device memory NVML saw; on a CPU, llama.cpp's own allocations "
                       "(weights, KV, compute, output buffers) with the weights it repacks for its CPU kernels "
                       "counted once: with mmap the file's pages of a repacked tensor stay resident only as clean, "
                       "reclaimable page cache beside the repacked copy. The verdict is on 'needed'. Beside it, as "
                       f"measured: the peak from {src}; the resident set at the end of a repetition split into "
                       "anonymous memory and file-backed pages (smaps_rollup); and the buffers as llama.cpp logs "
                       "them (CPU_Mapped + CPU_REPACK count repacked weights twice)."))
        s.append(("table", MEMORY_HEAD, memory_rows(t)))
        s.append(("fig", "memory.png"))
        dm_rows = device_memory_rows(pd.concat([x for x in (df, mem_df) if x is not None and len(x)])
                                     if mem_df is not None and len(mem_df) else df)
        if dm_rows:
            s.append(("h2", "On the device"))
            s.append(("p", "What each quant needs on the device it was offloaded to, term by term, as llama.cpp "
                           "allocated it (its log's buffers) and as the device's memory moved (read at the tests' "
                           "boundaries, never inside a timed region). 'device used': the growth of the process "
                           "holding the device's memory since before the load where the harness knows it (NVML's "
                           "per-process figure; the RPC server it started), else the device's free-memory drop, "
                           "which includes other tenants. 'runtime fixed cost' = device used - the device's model, "
                           "KV and compute buffers. Test 'mem' rows: the memory test's contexts, decoded once."))
            s.append(("table", DEVICE_MEMORY_HEAD, dm_rows))
        s.append(("h2", "+ Context"))
        if ctxp is not None and len(ctxp):
            s.append(("p", "The page's VRAM column has no context term (its '+ Context' column is blank). Measured "
                           "here by the memory test (bench.contexts): a context of each size "
                           f"{_mem_test_decode(mem_df)}, llama.cpp's KV and compute buffers recorded. Memory needed "
                           "at each context = "
                           "the quant's weights + that context's buffers (on a GPU: NVML's device memory with the "
                           "context made, where that quant's memory test ran). KV f16 unless named."))
            s.append(("table", CONTEXT_HEAD, context_rows(t)))
            s.append(("fig", "context_memory.png"))
            s.append(("table", KV_HEAD, kv_rows(ctxp, points.shape_of(df) or points.arch_of(df))))
        else:
            s.append(("p", "No memory test in this run (bench.contexts is empty): the page's '+ Context' column "
                           "stays unmeasured here."))
        s.append(("h2", "Sizes"))
        s.append(("p", "True bits per weight = 8 x llama.cpp's model size / its parameter count; file size from "
                       "disk (1 MiB = 1,048,576 bytes; the page's GB are 1e9 bytes)."))
        s.append(("table", SIZE_HEAD, size_rows(t)))
        errors = t[t.error.notna()] if "error" in t else t.iloc[0:0]
        if len(errors):
            s.append(("h2", "Failures"))
            s.append(("list", [f"{r.quant}: {r.error}" for r in errors.itertuples()]))
    s += serving_blocks or []
    if qp is not None and len(qp):
        r0 = qdf[qdf.status == "ok"].iloc[0]
        x = r0.extra or {}
        s.append(("h2", "Quality"))
        ref = Path(str(x.get("reference_file"))).name
        s.append(("p", f"Each quant's KL divergence from {x.get('reference_label')} ({ref}, "
                       f"sha256 {str(x.get('reference_sha256'))[:12]}) and its perplexity, on {x.get('text_name')} "
                       f"({x.get('n_tokens_text'):,} tokens, sha256 {str(x.get('text_sha256'))[:12]}), "
                       f"{x.get('n_chunks')} chunks of {int(r0.n_ctx)} tokens, the second half of each scored: "
                       "llama-perplexity's --kl-divergence protocol and arithmetic (the harness agrees with it to its "
                       "printed digits: tests/test_quality.py). Weights: "
                       f"{', '.join(sorted(qdf.weights.dropna().unique()))} files. 'worth choosing': no other quant "
                       "needs less memory and diverges less. The page's quality percentages are its own, of no "
                       "stated metric: set beside, not compared."))
        s.append(("table", QUALITY_MEASURED_HEAD, quality_measured_rows(qp)))
        s.append(("fig", "quality.png"))
    prows = probe_rows(cal, probe_df)
    if prows:
        s.append(("h2", "Kernel probes"))
        refs = (probe_df[~probe_df.quant.astype(str).str.contains("@")].weights_ref.dropna().unique()
                if probe_df is not None and len(probe_df) else [])
        first = refs[0] if len(refs) == 1 else "; ".join(refs)
        s.append(("p", "Each tensor type's own cost, measured apart from the quants: a model with this model's "
                       f"layer shapes but few layers, every matrix in that one type ({first}), run with the "
                       "same generation test between the quants. Cost per weight = time per token / the probe's "
                       "weights (the probe's per-token overhead included). The calibration's probe models sum "
                       "it over each file's tensors, so a held-out quant's kernels are known without its own "
                       "measurement."))
        s.append(("table", PROBE_HEAD, prows))
    if gpus is not None:
        s += _page_on_gpus(*gpus, device=device)
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


def _mem_test_decode(mem_df: pd.DataFrame | None) -> str:
    """What the memory test did with each context, as its records say: runs before it decoded carry no
    extra.decoded_tokens, and created the context only."""
    extra = mem_df["extra"] if mem_df is not None and "extra" in mem_df else []
    decoded = any(isinstance(e, dict) and e.get("decoded_tokens") for e in extra)
    return "created and decoded once" if decoded else "created, not decoded (the harness of this run did not)"


def _headline(t: pd.DataFrame, device: dict) -> list[tuple]:
    """The page's claims this run can judge: a speed verdict only where the page prints a speed for this device
    (Q4_K_M on its four GPUs), its rule extrapolated everywhere else (a ratio, no verdict), and the memory
    verdicts against the VRAM it prints for every quant."""
    n_in = int(t.tg_inside.fillna(False).astype(bool).sum())
    n_tg = int(t.tg_inside.notna().sum())
    m_in = int(t.mem_inside.fillna(False).astype(bool).sum())
    m_n = int(t.mem_inside.notna().sum())
    if not (n_tg or m_n or t.page_rule_tok_s.notna().any()):
        return []
    where = ", ".join(s.device for s in page.SPEEDS)
    if n_tg:
        speed = (f"The page prints a speed for this device at {page.SPEED_QUANT} and claims 'typically within ±20%': "
                 f"{n_in} of {n_tg} measured {'is' if n_tg == 1 else 'are'} inside that band of its figure.")
    else:
        speed = (f"The page prints no speed for this device (it prints one for {page.SPEED_QUANT} on {where} "
                 "only): no speed verdict here.")
    ratio = t.tg_vs_rule.dropna()
    if len(ratio):
        speed += (f" Its rule (bandwidth / (weights + 0.1 GB) x {page.efficiency(device.get('vendor'))}), "
                  "extrapolated to this device and to quants it prints no speed for: measured / rule is "
                  f"{ratio.min():.2f}x to {ratio.max():.2f}x over {len(ratio)} quants (column 'page's rule, "
                  "extrapolated'; a ratio, not a verdict).")
    mem = (f" The page prints VRAM for every quant: {m_in} of {m_n} quants' memory needed is inside ±20% of it."
           if m_n else "")
    return [("p", speed + mem)]


def measured_where(device: dict) -> str:
    """Whether a GPU measured this run's files, said before the published figures of the page's GPUs."""
    if device.get("kind") == "gpu":
        return (f"This run measured its files on {device.get('name')} (the tables above); the figures below are "
                "published llama.cpp results on the page's GPUs")
    if device.get("kind") == "rpc":
        return ("This run measured its files on llama.cpp's RPC device, whose speed is its server's and the "
                "network's, not a GPU's: no GPU measured them. The figures below are published llama.cpp results")
    return "No GPU measured this run's files: these figures are published llama.cpp results"


def _page_on_gpus(xcal: dict, gpus: list[dict], device: dict) -> list[tuple]:
    """The page's four GPUs: its tok/s beside the shipped cross-device estimate and the published measurements
    on them (each against the page's rule at its own size), and its quality claims beside published figures."""
    s: list[tuple] = [("h2", "The page on GPUs")]
    n_pub = sum(len(g["published"]) for g in gpus)
    judged = [r for g in gpus for r in g["published"] if r.get("printed_tok_s")]
    n_in = sum(bool(r["inside"]) for r in judged)
    ratios = [r["ratio"] for g in gpus for r in g["published"]]
    method = (xcal.get("held_out") or {}).get("method", "held out")
    s.append(("p", f"{measured_where(device)} "
                   f"(weights: published, from {xcal.get('built_from')}, each row with its source, runtime and "
                   f"build) and the cross-device calibration fitted on them ({xcal.get('n_rows')} tg rows on "
                   f"{xcal.get('n_devices')} devices; model: {xcal.get('chosen')}, {xcal.get('chosen_by')}). "
                   "The estimate is Llama 3.2 1B at each quant's size as llama.cpp counts it on the "
                   f"shape-faithful files; ± is its GPU family's error {method}. "
                   + (f"Of the {n_pub} published measurements on the page's GPUs, {len(judged)} "
                      f"{'is' if len(judged) == 1 else 'are'} of what the page prints a speed for (Llama 3.2 1B "
                      f"{page.SPEED_QUANT} on llama.cpp), {n_in} of them inside ±20% of its figure; the others are "
                      "of other models, set against the page's rule at their own size (extrapolated: measured / "
                      f"rule {min(ratios):.2f}x to {max(ratios):.2f}x, no verdict)." if n_pub else "")))
    s.append(("list", [x.strip() for x in crossgpu.lines(xcal)[1:]]))
    s.append(("table", PAGE_GPU_HEAD, page_gpu_rows(gpus)))
    pub = page_gpu_published_rows(gpus)
    if pub:
        s.append(("table", PAGE_GPU_PUBLISHED_HEAD, pub))
    s.append(("fig", "page_gpus.png"))
    s.append(("p", "Quality. The page prints a quality percentage per quant without saying what "
                   "it measures. Beside it, published figures for Llama 3.2 1B quants (not measured here: the "
                   "shape-faithful weights are random, so no quality carries over):"))
    s.append(("table", QUALITY_HEAD, quality_table(xcal)))
    return s


def _llama_bandwidth_line(t: pd.DataFrame, device: dict, env: dict) -> str | None:
    """The bandwidth probe cross-checked against what llama.cpp itself moves: the largest quant's model bytes
    x its tg tok/s (every weight read once per token, a lower bound on its traffic)."""
    if t.empty or "model_size_bytes" not in t or not t.model_size_bytes.notna().any():
        return None
    r = t.loc[t.model_size_bytes.idxmax()]
    if pd.isna(r.tg_tok_s):
        return None
    reach = r.model_size_bytes * r.tg_tok_s / 1e9
    bw = device.get("bandwidth_gb_s")
    probe = (env.get("memory_bandwidth") or {}) if device.get("kind") == "cpu" else {}
    parts = [f"llama.cpp itself reads {reach:,.1f} GB/s generating with {r.quant} (model bytes x tg tok/s)"]
    if bw:
        parts.append(f"{reach / bw:.0%} of the {bw:,.1f} GB/s this report uses for the device")
    if probe.get("ratio"):
        parts.append(f"the bandwidth probe's two kernels agree within {probe['ratio']:.2f}x "
                     f"(read-only sum {probe.get('sum_gb_s')}, triad {probe.get('triad_gb_s')} GB/s)")
    elif probe.get("copy_gb_s") and probe.get("triad_gb_s"):
        hi, lo = max(probe["copy_gb_s"], probe["triad_gb_s"]), min(probe["copy_gb_s"], probe["triad_gb_s"])
        parts.append(f"the (numpy) probe's kernels disagree {hi / lo:.1f}x (copy {probe['copy_gb_s']}, triad "
                     f"{probe['triad_gb_s']} GB/s): a run made before the compiled probe")
    return "; ".join(parts) + "."


def _settings_line(ok: pd.DataFrame) -> str:
    """Tests, threads and pinning, and how many repetitions the machine's state flags as descheduled."""
    if not len(ok):
        return "No measurements."
    tests = sorted({f"{t}{int(p + g)}" for t, p, g in zip(ok.test, ok.n_prompt, ok.n_gen)})
    threads = sorted({int(x) for x in ok.n_threads.dropna()})
    extras = [x for x in ok.extra if isinstance(x, dict)]
    pins = sorted({tuple(x["affinity"]) for x in extras if x.get("affinity")})
    states = [x["machine"] for x in extras if isinstance(x.get("machine"), dict)]
    flagged = sum(1 for m in states if m.get("descheduled"))
    line = (f"Tests {', '.join(tests)}; {', '.join(map(str, threads)) or '-'} threads"
            + (f", pinned to CPUs {', '.join(str(list(p)) for p in pins)}" if pins else ", not pinned") + ". ")
    if states:
        line += (f"{flagged} of {len(states)} repetitions flagged as descheduled (more than 5% of the host's time "
                 "stolen, or on a CPU the threads running less than 60% of the time); they are kept and marked in "
                 "the records (extra.machine).")
    else:
        line += "The records carry no per-repetition machine state (measured before it was recorded)."
    return line


def build(df: pd.DataFrame, env: dict, run_id: str, results_dir: str | None = None,
          tensor_types: dict[str, dict] | None = None, probe_df: pd.DataFrame | None = None,
          mem_df: pd.DataFrame | None = None, quality_df: pd.DataFrame | None = None,
          batched_df: pd.DataFrame | None = None, floor_tg_per_user: float = 0.0
          ) -> tuple[pd.DataFrame, dict, dict[str, bytes], str, str]:
    """Everything the report holds, computed from the records: (per-quant table, calibration, figures,
    markdown, html). `tensor_types` ({quant: {ggml type: weights}}) lets the calibration cost each tensor's
    kernel; `probe_df` (kernel-probe records) measures those costs; `batched_df` (the batched test's records) and
    `floor_tg_per_user` (the config's, tokens/s) make the Serving section."""
    ctxp = points.context_points(mem_df)
    cal = calibration.calibrate(df, env, run_id=run_id, results_dir=results_dir, tensor_types=tensor_types,
                                probe_costs=kernels.costs(probe_df), ctxp=ctxp)
    has_batched = batched_df is not None and (batched_df.status == "ok").any()
    every = pd.concat([df, batched_df]) if has_batched and len(df) else batched_df if has_batched else df
    if has_batched and not (df.status == "ok").any():  # the batched test only: its records say where it ran
        cal["device"] = {**calibration.run_device(batched_df, env), "page_model": points.is_page_model(batched_df)}
    device = cal["device"]
    t = quant_table(df, device, cal, ctxp)
    ctx = context_table(df, device)
    figs = figures(t, ctx, cal, device, ctxp)
    serving_blocks = serving.section(batched_df, device, floor_tg_per_user, points.is_page_model(every))
    cells = serving.cells(batched_df)
    if len(cells) and cells.s_tg.notna().any():
        figs["serving.png"] = fig_serving(cells, floor_tg_per_user)
    gpus = None  # the page on its GPUs: the shipped cross-device calibration, for the page's model only
    if points.is_page_model(every):
        xcal = crossgpu.load_shipped()
        gpus = (xcal, crossgpu.page_gpus(xcal))
        figs["page_gpus.png"] = fig_page_gpus(gpus[1])
    qp = quality_points(quality_df, t) if quality_df is not None and len(quality_df) else None
    if qp is not None and len(qp):
        figs["quality.png"] = fig_quality(qp)
    sections = _sections(df, env, t, cal, device, run_id, probe_df, ctxp, gpus, mem_df, qp, quality_df,
                         serving_blocks, every)
    title = f"{'Llama 3.2 1B quants' if points.is_page_model(every) else 'GGUF files'} - run {run_id}"
    return t, cal, figs, render_markdown(sections, figs), render_html(sections, figs, title)


def cluster_groups(df: pd.DataFrame) -> list[str]:
    """The device groups of a cluster run's records (extra.cluster.group), in order; [] for a local run."""
    if "extra" not in df or not len(df):
        return []
    return list(dict.fromkeys(g for g in map(schema.cluster_group, df.extra) if g))


def of_group(df: pd.DataFrame | None, group: str) -> pd.DataFrame | None:
    """The records of one device group of a cluster run."""
    if df is None or "extra" not in df:
        return df
    return df[[schema.cluster_group(e) == group for e in df.extra]]


def write_report(results_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write report.md, report.html, summary.csv, calibration.json (and the figures as PNG files) for a
    results folder, into `out` (default: <repo>/reports/<results folder name>). Returns the folder. A cluster
    run gets one report per device group, in `out`/<group> (each with its group's node environment)."""
    results_dir = Path(results_dir)
    df, env = load_run(results_dir)
    run_id = results_dir.name
    if out is None:  # beside the results folder: reports/<run-id> for results/<run-id>, else <folder>/report
        in_default = results_dir.resolve().parent == output_dir("results").resolve()
        out = default_reports() / run_id if in_default else results_dir / "report"
    out = Path(out)
    groups = cluster_groups(df)
    if groups:
        for g in groups:
            slug = schema.group_slug(g)
            node_envs = sorted(results_dir.glob(f"env-{slug}-*.json"))
            genv = json.loads(node_envs[0].read_text()) if node_envs else env
            _write_one(of_group(df, g), genv, f"{run_id} [{g}]", results_dir, out / slug,
                       of_group(load_contexts(results_dir), g), batched_df=of_group(load_batched(results_dir), g))
        return out
    return _write_one(df, env, run_id, results_dir, out, load_contexts(results_dir), load_probes(results_dir),
                      load_batched(results_dir))


def _write_one(df: pd.DataFrame, env: dict, run_id: str, results_dir: Path, out: Path,
               mem_df: pd.DataFrame | None, probe_df: pd.DataFrame | None = None,
               batched_df: pd.DataFrame | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    t, cal, figs, md, page_html = build(df, env, run_id, str(results_dir), points.tensor_types_from_records(df),
                                        probe_df, mem_df, load_quality(results_dir), batched_df,
                                        serving.floor_of(results_dir))
    for name, png in figs.items():
        (out / name).write_bytes(png)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(page_html)
    t.to_csv(out / "summary.csv", index=False)
    cells = serving.cells(batched_df)
    if len(cells):
        cells.to_csv(out / "serving.csv", index=False)
    calibration.write(cal, out / "calibration.json")
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
