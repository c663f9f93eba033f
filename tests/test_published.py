"""The importer on real pasted llama-bench output (data/published/, each with its source), and the cross-device
fit on fixed rows with exact answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, run_cli

from harness.analysis import crossgpu, summary
from harness.analysis.fit import rate_ape
from harness.catalog import devices
from harness.sources import published

DATA = REPO / "data" / "published"


@pytest.mark.parametrize("text, want", [
    ("llama 1B Q4_K - Medium", ("llama", "1B", "Q4_K_M")),
    ("LLaMA 7B mostly Q4_0", ("llama", "7B", "Q4_0")),
    ("llama 8B Q8_0", ("llama", "8B", "Q8_0")),
    ("llama 1B IQ3_S mix - 3.66 bpw", ("llama", "1B", "IQ3_M")),
    ("qwen2 14B Q4_K - Medium", ("qwen2", "14B", "Q4_K_M")),
    ("gpt-oss 20B MXFP4 MoE", ("gpt-oss", "20B", "MXFP4")),
    ("llama 1B Q9_9", None),
    ("a model", None),
])
def test_model_strings(text, want):
    assert published.parse_model(text) == want


def test_units_rates_and_tests_as_printed():
    assert published.parse_size("636.18 MiB") == (round(636.18 * 2**20), "MiB")
    assert published.parse_size("4.33 GiB") == (round(4.33 * 2**30), "GiB")
    assert published.parse_size("1.10 GB") == (1_100_000_000, "GB")  # a GB is not a GiB
    assert published.parse_rate("762.37 ± 4.41") == (762.37, 4.41)
    assert published.parse_rate("  18709.17 ± 59.99 ") == (18709.17, 59.99)
    assert published.parse_rate("95.05") == (95.05, None)
    assert published.parse_rate("n/a") is None
    assert published.parse_test("tg 128") == ("tg", 0, 128, 0)
    assert published.parse_test("pp512 @ d4096") == ("pp", 512, 0, 4096)
    assert published.parse_test("pp4096+tg128") is None


def test_a_geerlingguy_table_with_huge_spread_and_a_mixed_test():
    recs, skipped, src = published.import_file(DATA / "geerlingguy-43-rtx4090-tinyllama.txt", "t")
    assert src.url == "https://github.com/geerlingguy/ai-benchmarks/issues/43"
    assert [(r.test, r.n_prompt, r.n_gen, r.tokens_per_s) for r in recs] == [
        ("pp", 512, 0, 10802.35), ("pp", 4096, 0, 18709.17), ("tg", 0, 128, 762.37)]
    assert recs[0].extra["ts_sd"] == 9881.63 and recs[0].extra["size_as_printed"] == "636.18 MiB"
    r = recs[2]
    assert (r.weights, r.quant, r.gpu_name, r.device) == ("published", "Q4_K_M", "NVIDIA GeForce RTX 4090", "vulkan")
    assert r.model_n_params == 1_100_000_000 and r.extra["build"] == "build: 086a63e3a (7340)"
    assert r.extra["line"].startswith("| llama 1B Q4_K - Medium") and "762.37 ± 4.41" in r.extra["line"]
    assert [s.why for s in skipped] == ["test 'pp4096+tg128': not a pp or tg test of one size"]


def test_a_pr_comparison_table_gives_one_record_per_rate_column_and_keeps_the_moe_row():
    recs, skipped, _ = published.import_file(DATA / "llamacpp-pr21024-rtx3090-vulkan.txt", "t")
    assert not skipped and len(recs) == 16
    tg = [r for r in recs if r.quant == "Q8_0" and r.test == "tg"]
    assert {(r.extra["column"], r.tokens_per_s) for r in tg} == {("t/s (before)", 95.05), ("t/s (after)", 95.18)}
    assert all(r.flash_attn == "on" and r.model_size_bytes == round(7.95 * 2**30) for r in tg)
    assert any(r.model_desc == "gpt-oss 20B MXFP4 MoE" for r in recs)


def test_old_metal_layout_master_vs_pr():
    recs, skipped, _ = published.import_file(DATA / "llamacpp-pr2959-m2max30c-metal.txt", "t")
    assert not skipped
    r = next(r for r in recs if r.test == "tg" and r.n_gen == 128 and r.extra["column"] == "t/s (PR)")
    assert (r.tokens_per_s, r.quant, r.gpu_name, r.device) == (61.71, "Q4_0", "Apple M2 Max", "metal")


def test_fa_column_separator_with_one_dash():
    """llama-bench prints flash attention's column separator as "-:" (one dash): still a table."""
    recs, skipped, _ = published.import_file(DATA / "llamacpp-pr17675-rtx5090-vulkan-llama1b-q2k.txt", "t")
    r = next(r for r in recs if r.quant == "Q2_K")
    assert (r.tokens_per_s, r.extra["ts_sd"], r.flash_attn) == (947.0, 9.72, "on")
    assert r.gpu_name == "NVIDIA GeForce RTX 5090"
    assert r.model_size_bytes == round(546.50 * 2**20) and r.model_n_params == 1_240_000_000
    assert not any("no llama-bench table" in s.why for s in skipped)


def test_compare_llama_bench_layout_with_capitalised_columns_and_a_cpu_column():
    """compare-llama-bench.py's tables ("| CPU | Model | Test | t/s master | t/s <branch> | Speedup |"): the
    device from the CPU/GPU column, one record per t/s column, the Speedup column not a rate."""
    recs, skipped, _ = published.import_file(DATA / "llamacpp-pr10238-m2ultra-metal-llama3b.txt", "t")
    assert recs and not [s for s in skipped if "Speedup" in s.why]
    tg = [r for r in recs if r.test == "tg" and r.model_desc == "llama 3B F16"]
    assert {(r.extra["column"], r.tokens_per_s) for r in tg} == {("t/s master", 72.29),
                                                               ("t/s gg/metal-refactor-args", 73.29)}
    assert all(r.gpu_name == "Apple M2 Ultra" and r.device == "metal" for r in recs)
    assert {r.extra["column"] for r in recs} == {"t/s master", "t/s gg/metal-refactor-args"}


def test_a_truncated_table_and_an_unknown_device_are_skipped_with_reasons(tmp_path):
    text = (DATA / "llamacpp-pr2059-rx6800xt-opencl-vulkan-rocm.txt").read_text()
    cut = tmp_path / "cut.txt"
    cut.write_text(text[: text.rindex("|", 0, len(text) - 2) - 5])  # the last row torn mid-cell
    recs, skipped, _ = published.import_file(cut, "t", {"url": "https://example.org/x", "device": "AMD RX 6800 XT"})
    assert not recs
    assert all(s.why.startswith(("device: unknown device", "7 cells", "6 cells")) for s in skipped), skipped
    recs, skipped, _ = published.import_file(cut, "t", {"url": "https://example.org/x", "device": "RTX 4090"})
    assert recs and all(r.gpu_name == "NVIDIA GeForce RTX 4090" for r in recs)  # given on the command line
    assert any("cells under a header" in s.why for s in skipped)  # the torn row


def test_duplicate_rows_are_kept_once(tmp_path):
    src = (DATA / "geerlingguy-43-rtx4090-tinyllama.txt").read_text().splitlines()
    f = tmp_path / "dup.txt"
    f.write_text("\n".join(src + [src[-2]]) + "\n")
    recs, skipped, _ = published.import_file(f, "t", {"url": "https://example.org/d", "device": "RTX 4090"})
    assert len(recs) == 3 and any(s.why.startswith("duplicate") for s in skipped)


def test_json_output_of_llama_bench(tmp_path):
    f = tmp_path / "bench.json"
    f.write_text('[{"model_type": "llama 1B Q8_0", "model_size": 1313251328, "model_n_params": 1235814400, '
                 '"backends": "CUDA", "gpu_info": "NVIDIA GeForce RTX 4090", "n_gpu_layers": 99, "n_prompt": 0, '
                 '"n_gen": 128, "n_depth": 0, "avg_ts": 512.25, "stddev_ts": 1.5}]')
    recs, skipped, _ = published.import_file(f, "t", {"url": "https://example.org/j"})
    assert not skipped and len(recs) == 1
    r = recs[0]
    assert (r.test, r.n_gen, r.tokens_per_s, r.extra["ts_sd"], r.gpu_name, r.device) == (
        "tg", 128, 512.25, 1.5, "NVIDIA GeForce RTX 4090", "cuda")


def test_import_command(tmp_path):
    r = run_cli("import", str(DATA), "--out", str(tmp_path / "pub"), "-q", timeout=300)
    assert r.returncode == 0, r.stderr
    recs = (tmp_path / "pub" / "records.jsonl").read_text().splitlines()
    assert len(recs) > 200 and "cross-device calibration" in r.stdout
    assert (tmp_path / "pub" / "crossgpu.json").is_file()
    r = run_cli("import", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "x"), timeout=60)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


def _rows(spec):
    """tg rows: (device, backend, bytes, tok/s) -> records frame of published rows."""
    from harness import schema

    out = []
    for dev, backend, nbytes, tok_s, *quant in spec:
        out.append(schema.make(run_id="t", utc="u", status="ok", quant=(quant or ["Q4_0"])[0], weights="published",
                               weights_ref="https://example.org", test="tg", n_prompt=0, n_gen=128, n_depth=0, rep=0,
                               tokens_per_s=tok_s, model_size_bytes=nbytes, model_n_params=1_000_000_000,
                               gpu_name=dev, device=backend, model_desc="llama 1B Q4_0"))
    return summary.records_frame(out)


def test_cross_gpu_fit_recovers_exact_terms_and_never_sees_the_held_out_device():
    # time per token = 2 ms + bytes / (0.8 x bandwidth) on three NVIDIA GPUs (catalog bandwidths)
    bw = {"NVIDIA GeForce RTX 4090": 1008e9, "NVIDIA GeForce RTX 3090": 936e9, "NVIDIA L40S": 864e9}
    spec = [(d, "cuda", b, 1 / (2e-3 + b / (0.8 * bw[d]))) for d in bw for b in (7e8, 1.4e9, 4.2e9)]
    df = _rows(spec)
    pts = crossgpu.tg_rows(df)
    p = crossgpu.fit(pts, crossgpu.OVERHEAD)["families"]["nvidia-cuda"]
    assert p["efficiency"] == pytest.approx(0.8) and p["overhead_s"] == pytest.approx(2e-3)
    pred = crossgpu.leave_one_device_out(pts, crossgpu.OVERHEAD)
    assert np.allclose(pred, pts.t_s)  # exact data: every device predicted exactly from the others
    # a device that disagrees is predicted from the others only: its own rows never enter its fit
    spec_bad = [(d, b, tok * (0.5 if d == "NVIDIA L40S" else 1)) for d, _, b, tok in spec]
    pts2 = crossgpu.tg_rows(_rows([(d, "cuda", b, t) for d, b, t in spec_bad]))
    pred2 = crossgpu.leave_one_device_out(pts2, crossgpu.OVERHEAD)
    l40s = (pts2.device == "NVIDIA L40S").to_numpy()
    assert np.allclose(pred2[l40s], pts.t_s[l40s])  # predicted as the clean model would, not as it measured
    cal = crossgpu.calibrate(df)
    assert cal["held_out"][crossgpu.OVERHEAD]["all"]["worst_ape"] == pytest.approx(0, abs=1e-9)
    assert cal["chosen"] == crossgpu.OVERHEAD  # the candidate without overhead cannot fit a floor
    page = cal["held_out"]["page formula"]["all"]["median_ape"]
    assert page > 0.1 and not math.isnan(page)  # the page's formula has no overhead term


def test_quant_kinds_and_hbm_parts_get_terms_of_their_own():
    """Rows made exactly as efficiency[family] x factor[kind] x spec bandwidth, GDDR cards at 0.8 and HBM
    parts at 0.4, F16 at 1, Q4_0 at 0.85, Q4_K_M at 0.7: the kind model recovers every term and predicts each
    held-out device exactly; the plain fit (one efficiency per vendor x backend) cannot."""
    eff = {"NVIDIA GeForce RTX 4090": 0.8, "NVIDIA GeForce RTX 3090": 0.8, "NVIDIA A100 80GB": 0.4,
           "NVIDIA H100 PCIe": 0.4}
    kind = {"F16": 1.0, "Q4_0": 0.85, "Q4_K_M": 0.7}
    spec = []
    for d, e in eff.items():
        bw = devices.lookup(d).bandwidth_gb_s * 1e9
        for q, k in kind.items():
            b = {"F16": 2.4e9, "Q4_0": 7e8, "Q4_K_M": 8e8}[q]
            spec.append((d, "cuda", b, e * k * bw / b, q))
    pts = crossgpu.tg_rows(_rows(spec))
    assert set(pts.family) == {"nvidia-cuda", "nvidia-cuda-hbm"} and set(pts.base_family) == {"nvidia-cuda"}
    fams, kinds = crossgpu.fit_kinds(pts)
    assert fams == pytest.approx({"nvidia-cuda": 0.8, "nvidia-cuda-hbm": 0.4})
    assert kinds == pytest.approx({"f16": 1.0, "q4_0-q5_1": 0.85, "k/i-quants": 0.7})
    assert np.allclose(crossgpu.leave_one_device_out(pts, crossgpu.KINDS), pts.t_s)
    plain = rate_ape(pts, crossgpu.leave_one_device_out(pts, crossgpu.PLAIN))
    assert np.nanmax(plain) > 0.3  # HBM and GDDR averaged together, and every quant at one efficiency
    cal = crossgpu.calibrate(_rows(spec))
    assert cal["chosen"] == crossgpu.KINDS and cal["kinds"]["k/i-quants"]["factor"] == pytest.approx(0.7)
    # the models compared on the same rows: every row here has a prediction from each fitted model
    h = cal["held_out"]
    assert h["n_common"] == len(pts) and h[crossgpu.KINDS]["common"]["worst_ape"] == pytest.approx(0, abs=1e-9)
    assert h[crossgpu.PLAIN]["common"]["worst_ape"] == pytest.approx(np.nanmax(plain))
    # a device's own rows are brought to F16 terms: the H100 PCIe's own efficiency is 0.4, whatever the quant
    assert cal["per_device"]["NVIDIA H100 PCIe"]["nvidia-cuda-hbm"]["efficiency"] == pytest.approx(0.4)
    # the H100 SXM (no rows of its own) from its HBM family, at an IQ quant (a k/i-quant) of 1 GB
    rate, terms, what = crossgpu.predict_tok_s(cal, "nvidia", 3352, 1e9, "IQ4_XS", device="NVIDIA H100 SXM",
                                               hbm=True)
    assert what == "nvidia-cuda-hbm" and rate == pytest.approx(0.4 * 0.7 * 3352)
    assert crossgpu.predict_tok_s(cal, "nvidia", 3352, 1e9, "F16")[2] == "nvidia-cuda"


def test_quant_kinds():
    assert [crossgpu.quant_kind(q) for q in ("BF16", "Q8_0", "Q4_1", "Q5_0", "Q6_K", "Q4_K_M", "IQ3_M", "Q2_K_L",
                                             None, "TQ1_0")] == [
        "f16", "q8_0", "q4_0-q5_1", "q4_0-q5_1", "k/i-quants", "k/i-quants", "k/i-quants", "k/i-quants", "other",
        "other"]


def test_rows_that_cannot_be_a_dense_read_are_left_out():
    df = _rows([("NVIDIA GeForce RTX 4090", "cuda", 1e9, 5000.0),  # 5 TB/s from a 1 TB/s card
                ("NVIDIA GeForce RTX 4090", "cuda", 1e9, 500.0)])
    assert len(crossgpu.tg_rows(df)) == 1
    df.loc[1, "model_desc"] = "gpt-oss 20B MXFP4 MoE"
    assert crossgpu.tg_rows(pd.DataFrame(df)).empty


def test_small_models_by_llamas_size_label():
    """"1B-3B" follows llama.cpp's size label: older builds print Llama 3.2 3B as "llama 3B" with 3.61 B params
    (tied embeddings counted twice), which a parameter cut at 3.5 B would drop."""
    assert crossgpu.size_label_b("llama 3B Q4_0", 3.61e9) == 3.0
    assert crossgpu.size_label_b("llama 1.1B Q4_0", None) == 1.1
    assert crossgpu.size_label_b("qwen2 14B Q4_K - Medium", 14.77e9) == 14.0
    assert crossgpu.size_label_b("llama ?B Q4_0", 1.24e9) == pytest.approx(1.24)
    assert math.isnan(crossgpu.size_label_b(None, None))


def test_the_shipped_cross_device_calibration_is_what_the_data_builds():
    """harness/data/crossgpu.json (what `estimate` uses on a GPU) cannot drift from data/published/: rebuilt
    here from the repository's files, the same families, terms and held-out errors."""
    import json

    from harness import importer

    sizes = REPO / "reports" / "20261128T055841Z-llama-3.2-1b-synthetic" / "calibration.json"
    cpus = [REPO / "reports" / f"{r}-llama-3.2-1b-synthetic" / "calibration.json"
            for r in ("20261128T005750Z", "20261128T055841Z")]
    built = json.loads(json.dumps(importer.build_shipped(DATA, sizes, cpus), default=float, sort_keys=True))
    shipped = json.loads(crossgpu.SHIPPED.read_text())
    assert built.keys() == shipped.keys()
    for f, fam in built["families"].items():
        assert fam["efficiency"] == pytest.approx(shipped["families"][f]["efficiency"], rel=1e-9), f
        assert fam["n_rows"] == shipped["families"][f]["n_rows"]
    assert built["held_out"] == shipped["held_out"]
    assert built["llama_3_2_1b"] == shipped["llama_3_2_1b"] and built["page_gpu_rows"] == shipped["page_gpu_rows"]
    assert [p["n"] for p in built["cpu_transfer"]["pairs"]] == [p["n"] for p in shipped["cpu_transfer"]["pairs"]]
    assert built["cpu_transfer"]["all"]["median_ape"] == pytest.approx(shipped["cpu_transfer"]["all"]["median_ape"])


def test_the_page_on_its_gpus():
    """The page's rule at a file's size is its own printed arithmetic (RTX 4090, Q4_K_M: 1008 / 0.82 x 0.65 =
    799); every published row on a page GPU gets that rule at its own size and a verdict; the MI300X is
    estimated from its own published ROCm rows, the H100 SXM (none of its own) from the HBM parts' family."""
    xcal = crossgpu.load_shipped()
    assert crossgpu.page_rule_tok_s(1008, "nvidia", 1.2e9 * 4.8 / 8) == pytest.approx(1008 / 0.82 * 0.65)
    gpus = {g["device"]: g for g in crossgpu.page_gpus(xcal)}
    assert set(gpus) == {"NVIDIA GeForce RTX 4090", "NVIDIA H100 SXM", "AMD Instinct MI300X", "AMD Instinct MI250X"}
    g = gpus["NVIDIA GeForce RTX 4090"]
    assert [q["quant"] for q in g["quants"]] == list(crossgpu_page_quants())
    q = next(q for q in g["quants"] if q["quant"] == "Q4_K_M")
    assert round(q["page_tok_s"]) == 799 and q["estimate_tok_s"] > 0
    assert q["family"] == "nvidia-cuda on NVIDIA GeForce RTX 4090"  # its own published CUDA rows
    tiny = next(r for r in g["published"] if r["model"] == "llama 1B Q4_K - Medium")  # geerlingguy issue 43
    assert tiny["tok_s"] == 762.37 and tiny["inside"] == (abs(762.37 / tiny["page_rule_tok_s"] - 1) <= 0.2)
    mi = gpus["AMD Instinct MI300X"]
    # llm-tracker's MI300X ROCm rows (llama 7B Q4_0, 183.18 and 157.84 t/s): far below the page's rule
    assert {r["tok_s"] for r in mi["published"]} == {183.18, 157.84} and not any(r["inside"] for r in mi["published"])
    assert all(q["family"] == "amd-rocm-hbm on AMD Instinct MI300X" for q in mi["quants"])
    h100 = next(q for q in gpus["NVIDIA H100 SXM"]["quants"] if q["quant"] == "Q4_K_M")
    assert h100["family"] == "nvidia-cuda-hbm"  # no rows of its own: its family, HBM parts apart
    assert h100["rests_on_small_rows"] is False  # A100 / H100 PCIe rows of 8B models only: an upper bound
    from harness.report import tables

    assert all("upper bound" in r[5] for r in tables.page_gpu_rows([gpus["NVIDIA H100 SXM"]]))


def test_a_device_with_rows_of_its_own_uses_them():
    """Per-device terms on fixed rows with exact answers: efficiency = the median of bytes / (bandwidth x
    time); leave-one-row-out error from the others' median."""
    pts = pd.DataFrame({"device": ["A"] * 3, "family": ["x-cuda"] * 3, "bytes": [1e9, 2e9, 4e9],
                        "bandwidth_b_s": [1e12] * 3, "t_s": [1e-3 / 0.5, 2e-3 / 0.6, 4e-3 / 0.7],
                        "model": ["m1", "m2", "m4"], "kind": ["f16"] * 3})
    own = crossgpu.per_device(pts)["A"]["x-cuda"]
    assert own["efficiency"] == pytest.approx(0.6) and own["n_rows"] == 3
    # row 0 (0.5) from the others' median (0.65): |0.5 / 0.65 - 1|; row 1 (0.6) from 0.6: 0.0 ...
    want = sorted([abs(0.5 / 0.65 - 1), abs(0.6 / 0.6 - 1), abs(0.7 / 0.55 - 1)])
    assert own["held_out"]["all"]["worst_ape"] == pytest.approx(want[-1])
    rate, terms, what = crossgpu.predict_tok_s({"per_device": {"A": {"x-cuda": own}}}, "x", 1000, 1e9,
                                               backend="cuda", device="A")
    assert what == "x-cuda on A" and rate == pytest.approx(0.6 * 1000e9 / 1e9)


def crossgpu_page_quants():
    from harness.catalog import page

    return page.BY_QUANT


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "sql"])
def test_every_llama_bench_output_format_gives_the_records_of_its_markdown_table(fmt):
    """llama-bench's machine-readable formats (real runs, tests/data/llama-bench) import to the tests and rates
    of the markdown table the same run printed (-oe md), and also carry threads, batch sizes and KV types."""
    src = REPO / "tests" / "data" / "llama-bench" / f"tiny-q4_k_m.{fmt}"
    meta = {"url": "tests/data/llama-bench/README.md", "device": "NVIDIA GeForce RTX 4090"}  # as with --device
    recs, skipped, _ = published.import_file(src, "t", meta)
    assert not skipped, skipped
    md_recs, md_skipped, _ = published.import_file(src.with_name(src.name + ".md"), "t", meta)
    assert not md_skipped and len(md_recs) == 2

    def key(r):
        return r.test, r.n_prompt, r.n_gen, round(r.tokens_per_s, 2), round(r.extra["ts_sd"], 2)
    assert sorted(map(key, recs)) == sorted(map(key, md_recs))
    assert all(r.quant == "Q4_K_M" and r.model_desc == "llama ?B Q4_K - Medium" for r in recs)
    assert all((r.n_threads, r.n_batch, r.n_ubatch, r.cache_type_k) == (2, 2048, 512, "f16") for r in recs)


def test_sql_that_is_not_llama_bench_output_is_refused(tmp_path):
    f = tmp_path / "x.sql"
    f.write_text("DROP TABLE llama_bench;\n")
    with pytest.raises(published.ImportError_, match="not llama-bench's sql output: a 'DROP' statement"):
        published.import_file(f, "t", {"url": "https://example.org", "device": "RTX 4090"})


def test_a_llama_cpp_load_log_gives_its_buffers():
    """A real load log (tests/data/llama-log): the model's buffers as logged, and the context's KV buffer equal
    to llama.cpp's rule for the 1B (2 x 16 layers x 8 KV heads x 64 x 2 bytes = 32 KiB per cell)."""
    log = REPO / "tests" / "data" / "llama-log" / "llama-3.2-1b-synthetic-q4_k_m-cpu.log"
    recs, skipped, _ = published.import_file(log, "t", {"url": "tests/data/llama-log/README.md", "format": "log",
                                                         "device": "NVIDIA GeForce RTX 4090"})
    assert not skipped and len(recs) == 1
    r = recs[0]
    assert (r.test, r.quant, r.model_n_params, r.n_ctx, r.n_ubatch) == ("mem", "Q4_K_M", 1_240_000_000, 256, 256)
    assert r.model_buffers == {"CPU_Mapped": round(753.81 * 2**20), "CPU_REPACK": round(445.50 * 2**20)}
    assert r.kv_bytes == 256 * 2 * 16 * 8 * 64 * 2 and (r.cache_type_k, r.cache_type_v) == ("f16", "f16")
    assert r.compute_bytes > 0 and r.flash_attn == "auto" and r.device == "cpu"


def test_a_log_that_names_no_model_is_skipped_with_the_reason(tmp_path):
    f = tmp_path / "x.log"
    f.write_text("llama_context: n_ctx = 4096\nllama_kv_cache: CUDA0 KV buffer size = 128.00 MiB\n")
    recs, skipped, _ = published.import_file(f, "t", {"url": "https://example.org", "format": "log",
                                                       "device": "RTX 4090"})
    assert not recs and "no model the log names" in skipped[0].why
