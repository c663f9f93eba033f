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


def test_a_truncated_table_is_skipped_with_its_reason_and_an_unknown_device_imported_under_its_name(tmp_path):
    """A device the catalog does not know is no reason to drop a row: imported as printed, marked uncatalogued
    (no spec bandwidth: the cross-device fit leaves it out)."""
    text = (DATA / "llamacpp-pr2059-rx6800xt-opencl-vulkan-rocm.txt").read_text()
    cut = tmp_path / "cut.txt"
    cut.write_text(text[: text.rindex("|", 0, len(text) - 2) - 5])  # the last row torn mid-cell
    recs, skipped, _ = published.import_file(cut, "t", {"url": "https://example.org/x", "device": "AMD RX 6800 XT"})
    assert recs and all(r.gpu_name == "AMD RX 6800 XT" and r.extra["catalogued"] is False for r in recs)
    assert skipped and all(s.why.startswith(("7 cells", "6 cells")) for s in skipped), skipped
    assert crossgpu.tg_rows(summary.records_frame(recs)).empty
    recs, skipped, _ = published.import_file(cut, "t", {"url": "https://example.org/x", "device": "RTX 4090"})
    assert all(r.extra["catalogued"] is True for r in recs)
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


def _rows(spec, runtime="llama.cpp"):
    """tg rows: (device, backend, bytes, tok/s[, quant[, source]]) -> records frame of published rows of
    `runtime`, each device's rows from a llama.cpp pull request of its own unless a source URL is given."""
    from harness import schema

    out = []
    devs: list[str] = []
    for dev, backend, nbytes, tok_s, *more in spec:
        devs += [dev] if dev not in devs else []
        url = more[1] if len(more) > 1 else f"https://github.com/ggml-org/llama.cpp/pull/{devs.index(dev) + 1}"
        out.append(schema.make(run_id="t", utc="u", status="ok", quant=(more or ["Q4_0"])[0], weights="published",
                               weights_ref=url, test="tg", n_prompt=0, n_gen=128, n_depth=0, rep=0,
                               tokens_per_s=tok_s, model_size_bytes=nbytes, model_n_params=1_000_000_000,
                               gpu_name=dev, device=backend, model_desc="llama 1B Q4_0",
                               extra={"runtime": runtime, "build": None}))
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
    # held out by source, with every row on its devices: the L40S's rows predicted from the others only
    pred3 = crossgpu.held_out(pts2, crossgpu.OVERHEAD)
    assert np.allclose(pred3[l40s], pts.t_s[l40s])
    cal = crossgpu.calibrate(df)
    assert cal["held_out"][crossgpu.OVERHEAD]["all"]["worst_ape"] == pytest.approx(0, abs=1e-9)
    # the candidates without overhead cannot fit a floor; with one family on one back end the pooled floor is
    # the family's own, as exact as the per-family overhead, and simpler: chosen
    assert cal["held_out"][crossgpu.POOLED]["all"]["worst_ape"] == pytest.approx(0, abs=1e-9)
    assert cal["chosen"] == crossgpu.POOLED and cal["selection_close"]
    # the reported error is the nested one: each fold chose on its own training rows
    nest = cal["held_out"]["nested"]
    assert nest["all"]["worst_ape"] == pytest.approx(0, abs=1e-9) and nest["chosen_in_folds"] == {crossgpu.POOLED: 3}
    page = cal["held_out"]["page formula"]["all"]["median_ape"]
    assert page > 0.1 and not math.isnan(page)  # the page's formula has no overhead term


def test_the_floor_is_the_back_ends_and_an_hbm_family_without_small_rows_borrows_it():
    """Rows made exactly as 1 ms + bytes / (e x bandwidth): GDDR cards (e 0.8) with 1B-3B and 8B rows, HBM
    parts (e 0.4) with 8B rows only. The pooled model puts CUDA's floor, shown by the GDDR cards' small rows,
    under the HBM family too, and predicts an HBM part's 1B row exactly with every small row of its family
    withheld; the model without a floor cannot."""
    from harness import schema

    eff = {"NVIDIA GeForce RTX 4090": (0.8, 1008e9), "NVIDIA GeForce RTX 3090": (0.8, 936e9),
           "NVIDIA L40S": (0.8, 864e9), "NVIDIA A100 80GB": (0.4, 2039e9), "NVIDIA H100 PCIe": (0.4, 2039e9)}
    spec = []
    for i, (d, (e, bw)) in enumerate(eff.items()):
        sizes = (7e8, 2e9, 4.6e9) if e == 0.8 else (4.6e9, 9e9)
        for b in sizes:
            label = "llama 1B Q4_0" if b < 3e9 else "llama 8B Q4_0"
            spec.append((d, b, 1 / (1e-3 + b / (e * bw)), label, i))
    recs = [schema.make(run_id="t", utc="u", status="ok", quant="Q4_0", weights="published",
                        weights_ref=f"https://github.com/ggml-org/llama.cpp/pull/{i + 1}", test="tg", n_prompt=0,
                        n_gen=128, n_depth=0, rep=0, tokens_per_s=t, model_size_bytes=b, model_n_params=1e9,
                        gpu_name=d, device="cuda", model_desc=label, extra={"runtime": "llama.cpp", "build": None})
            for d, b, t, label, i in spec]
    pts = crossgpu.tg_rows(summary.records_frame(recs))
    p = crossgpu.fit(pts, crossgpu.POOLED)
    # the shrinkage pulls a family's efficiency toward its back end's (a ridge: 4 rows against SHRINK_ROWS,
    # never exact even on exact rows): the HBM family's lies between its own 0.4 and the GDDR family's 0.8;
    # the floor is the one the HBM family shares
    assert p["backends"]["cuda"]["overhead_s"] == pytest.approx(1e-3, rel=0.1)
    assert p["families"]["nvidia-cuda-hbm"]["overhead_s"] == p["backends"]["cuda"]["overhead_s"]
    assert 0.4 < p["families"]["nvidia-cuda-hbm"]["efficiency"] < 0.6
    # an HBM part's 1B row, no small row of its family in the fit: the back end's floor predicts it within 25%
    one = pts.iloc[[0]].assign(device="NVIDIA H100 PCIe", family="nvidia-cuda-hbm", bandwidth_b_s=2039e9,
                               t_s=1e-3 + 7e8 / (0.4 * 2039e9))
    assert crossgpu.predict_t(one, p, crossgpu.POOLED)[0] == pytest.approx(one.t_s.iloc[0], rel=0.25)
    # the per-family overhead model gives the HBM family no floor of its own to speak of: far slower rows
    assert crossgpu.predict_t(one, crossgpu.fit(pts, crossgpu.KINDS), crossgpu.KINDS)[0] < 0.8 * one.t_s.iloc[0]
    # a family with no row at all takes its back end's terms; the per-family model has none
    assert not np.isnan(crossgpu.predict_t(one.assign(family="nvidia-cuda-x"), p, crossgpu.POOLED)[0])
    assert np.isnan(crossgpu.predict_t(one.assign(family="nvidia-cuda-x"), crossgpu.fit(pts, crossgpu.OVERHEAD),
                                       crossgpu.OVERHEAD)[0])
    # what an estimate says it rests on: a family without small rows borrows its back end's floor (no upper
    # bound), with that case's held-out error; without a pooled floor behind it, an upper bound
    cal = {"chosen": crossgpu.POOLED, "backends": {"cuda": {"overhead_s": 1e-3, "n_small": 3}},
           "held_out": {"cases": {crossgpu.CASE_BORROWED: {"small": {"rms_ape": 0.4}, "n_small": 12}}}}
    on = crossgpu.basis(cal, {"n_small_rows": 0}, "nvidia-cuda-hbm")
    assert on["case"] == crossgpu.CASE_BORROWED and not on["upper_bound"] and on["error"]["rms_ape"] == 0.4
    assert "1.00 ms, from 3 1B-3B rows" in on["floor"]
    assert crossgpu.basis({**cal, "chosen": crossgpu.OVERHEAD}, {"n_small_rows": 0}, "nvidia-cuda-hbm")["upper_bound"]
    assert crossgpu.tok_s_range(100.0, {"rms_ape": 0.25}) == pytest.approx((80.0, 100 / 0.75))


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


def test_rows_faster_than_their_spec_bandwidth_are_kept_and_flagged_and_moe_left_out():
    df = _rows([("NVIDIA GeForce RTX 4090", "cuda", 1e9, 5000.0),  # 5 TB/s from a 1 TB/s card
                ("NVIDIA GeForce RTX 4090", "cuda", 1e9, 500.0)])
    pts = crossgpu.tg_rows(df)
    assert len(pts) == 2 and pts.over_spec.tolist() == [True, False]  # not dropped on the outcome
    over = crossgpu.calibrate(df)["over_spec"]
    assert [r["tok_s"] for r in over] == [5000.0] and over[0]["spec_limit_tok_s"] == pytest.approx(1008)
    df.loc[1, "model_desc"] = "gpt-oss 20B MXFP4 MoE"
    assert len(crossgpu.tg_rows(pd.DataFrame(df))) == 1


def test_a_forks_rows_are_apart_from_the_fit():
    """Rows of ik_llama.cpp (a fork, its own kernels) never enter llama.cpp's fit; they are shown against it."""
    bw = {"NVIDIA GeForce RTX 4090": 1008e9, "NVIDIA GeForce RTX 3090": 936e9, "NVIDIA L40S": 864e9}
    spec = [(d, "cuda", b, 1 / (b / (0.8 * bw[d]))) for d in bw for b in (7e8, 1.4e9)]
    main = _rows(spec)
    fork = _rows([("NVIDIA GeForce RTX 4090", "cuda", 7e8, 1.3 * 0.8 * 1008e9 / 7e8, "Q4_0",
                   "https://github.com/ikawrakow/ik_llama.cpp/pull/94")], runtime="ik_llama.cpp")
    cal = crossgpu.calibrate(pd.concat([main, fork], ignore_index=True))
    assert cal["runtime"] == "llama.cpp" and cal["n_rows"] == 6
    assert cal["families"]["nvidia-cuda"]["efficiency"] == pytest.approx(0.8)  # the fork's 1.3x is not in it
    o = cal["other_runtimes"]["ik_llama.cpp"]
    assert o["n_rows"] == 1 and o["sources"] == ["ikawrakow/ik_llama.cpp#94"]
    assert o["measured_over_fit_median"] == pytest.approx(1.3)


def test_sources_fold_together():
    assert crossgpu.source_key("https://github.com/ggml-org/llama.cpp/pull/4766#issuecomment-1") == \
        "ggml-org/llama.cpp#4766"
    assert crossgpu.source_key("https://github.com/XiongjieDai/GPU-Benchmarks-on-LLM-Inference/blob/9232c8/x.ipynb") \
        == "XiongjieDai/GPU-Benchmarks-on-LLM-Inference"  # one author's collection: one source
    assert crossgpu.source_key("https://github.com/geerlingguy/ai-benchmarks/issues/43") == "geerlingguy/ai-benchmarks"
    assert crossgpu.source_key("https://llm-tracker.info/x") == "llm-tracker.info"
    # one source on two devices: held out together, and a third source's row on one of those devices is out of
    # their training set too
    spec = [("NVIDIA GeForce RTX 4090", "cuda", 1e9, 700.0, "Q4_0", "https://github.com/a/b"),
            ("NVIDIA GeForce RTX 3090", "cuda", 1e9, 650.0, "Q4_0", "https://github.com/a/b"),
            ("NVIDIA GeForce RTX 4090", "cuda", 2e9, 350.0, "Q4_0", "https://github.com/ggml-org/llama.cpp/pull/1"),
            ("NVIDIA L40S", "cuda", 1e9, 600.0, "Q4_0", "https://github.com/ggml-org/llama.cpp/pull/2")]
    pts = crossgpu.tg_rows(_rows(spec))
    folds = {pts.source[held].iloc[0]: pts.index[train].tolist() for held, train in crossgpu.folds(pts)}
    assert folds["a/b"] == [3] and folds["ggml-org/llama.cpp#1"] == [1, 3] and folds["ggml-org/llama.cpp#2"] == \
        [0, 1, 2]


def test_small_models_by_llamas_size_label():
    """"1B-3B" follows llama.cpp's size label: older builds print Llama 3.2 3B as "llama 3B" with 3.61 B params
    (tied embeddings counted twice), which a parameter cut at 3.5 B would drop."""
    assert crossgpu.size_label_b("llama 3B Q4_0", 3.61e9) == 3.0
    assert crossgpu.size_label_b("llama 1.1B Q4_0", None) == 1.1
    assert crossgpu.size_label_b("qwen2 14B Q4_K - Medium", 14.77e9) == 14.0
    assert crossgpu.size_label_b("llama ?B Q4_0", 1.24e9) == pytest.approx(1.24)
    assert math.isnan(crossgpu.size_label_b(None, None))


def flat(doc, path: str = "") -> dict:
    """A JSON document as {path: leaf}, so that pytest.approx compares every number in it and the rest exactly."""
    if isinstance(doc, dict):
        return {k: v for key, x in doc.items() for k, v in flat(x, f"{path}/{key}").items()}
    if isinstance(doc, list):
        return {k: v for i, x in enumerate(doc) for k, v in flat(x, f"{path}[{i}]").items()}
    return {path: doc}


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
    # equal to the last digits a float's rounding leaves to the CPU's kernels (numpy's BLAS differs by host)
    for part in ("held_out", "llama_3_2_1b", "page_gpu_rows"):
        a, b = flat(built[part]), flat(shipped[part])
        assert a.keys() == b.keys(), part
        num = {k for k, v in b.items() if isinstance(v, float)}
        assert {k: a[k] for k in num} == pytest.approx({k: b[k] for k in num}, rel=1e-9, nan_ok=True), part
        assert {k: v for k, v in a.items() if k not in num} == {k: v for k, v in b.items() if k not in num}, part
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
    # the device's own rows, with its back end's floor, predict better than the family's fit on held-out RMS
    # (xcal["per_device_check"]): its own terms, the floor CUDA's small rows show
    assert xcal["own_rows_first"] is True and q["family"] == "nvidia-cuda on NVIDIA GeForce RTX 4090"
    assert q["case"] == crossgpu.CASE_OWN and q["rests_on_small_rows"]
    lo, hi = q["range_tok_s"]
    assert lo < q["estimate_tok_s"] < hi
    tiny = next(r for r in g["published"] if r["model"] == "llama 1B Q4_K - Medium")  # geerlingguy issue 43
    # TinyLlama (1.10 B params), not the page's Llama 3.2 1B: the rule extrapolated to its size, no verdict
    assert tiny["tok_s"] == 762.37 and tiny["printed_tok_s"] is None and tiny["inside"] is None
    assert tiny["ratio"] == pytest.approx(762.37 / tiny["page_rule_tok_s"])
    assert crossgpu.is_page_model_row({**tiny, "params": 1.24e9}) and not crossgpu.is_page_model_row(
        {**tiny, "params": 1.24e9, "runtime": "ik_llama.cpp"})
    mi = gpus["AMD Instinct MI300X"]
    # llm-tracker's MI300X ROCm rows (llama 7B Q4_0, 183.18 and 157.84 t/s): far below the page's rule
    assert {r["tok_s"] for r in mi["published"]} == {183.18, 157.84} and all(r["ratio"] < 0.5 for r in mi["published"])
    assert all(q["family"] == "amd-rocm-hbm on AMD Instinct MI300X" for q in mi["quants"])
    h100 = next(q for q in gpus["NVIDIA H100 SXM"]["quants"] if q["quant"] == "Q4_K_M")
    assert h100["family"] == "nvidia-cuda-hbm"  # no rows of its own: its family, HBM parts apart
    # A100 / H100 PCIe rows of 8B models only, but CUDA's floor pooled from the other families' small rows:
    # not an upper bound, and its range is the error of that case
    assert h100["rests_on_small_rows"] is True and h100["case"] == crossgpu.CASE_BORROWED
    from harness.report import tables

    assert not any("upper bound" in r[5] for r in tables.page_gpu_rows([gpus["NVIDIA H100 SXM"]]))


def test_a_device_with_rows_of_its_own_uses_them():
    """Per-device terms on fixed rows with exact answers: efficiency = the median of bytes / (bandwidth x
    time); each source's rows predicted by the other sources' median (three sources here)."""
    pts = pd.DataFrame({"device": ["A"] * 3, "family": ["x-cuda"] * 3, "bytes": [1e9, 2e9, 4e9],
                        "bandwidth_b_s": [1e12] * 3, "t_s": [1e-3 / 0.5, 2e-3 / 0.6, 4e-3 / 0.7],
                        "model": ["m1", "m2", "m4"], "kind": ["f16"] * 3, "source": ["s1", "s2", "s3"]})
    # two rows of one source are never held out against each other: s1's pair has no other source to go by
    one = crossgpu.leave_one_source_out_on_device(pts.assign(source=["s1", "s1", "s2"]))
    assert np.isnan(one).sum() == 0 and one[2] == pytest.approx(abs(0.7 / 0.55 - 1))
    assert np.isnan(crossgpu.leave_one_source_out_on_device(pts.assign(source="s1"))).all()
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


# --- a user's own llama-bench run: the device from llama-bench's own columns, any device imported ----------

LLAMA_BENCH = REPO / "tests" / "data" / "llama-bench"
MACHINE_FORMATS = ["csv", "json", "jsonl", "sql"]


@pytest.mark.parametrize("fmt", MACHINE_FORMATS)
def test_llama_benchs_own_output_names_the_cpu_it_ran_on(fmt):
    """No --device: a CPU-only row (backends "CPU") ran on its cpu_info, "AMD EPYC", which the catalog does not
    know: imported under that name, marked uncatalogued; its build from build_commit / build_number, runtime
    llama.cpp, the exact size and parameter count (not the markdown table's rounded print)."""
    recs, skipped, _ = published.import_file(LLAMA_BENCH / f"tiny-q4_k_m.{fmt}", "t", {"url": "x"})
    assert not skipped and len(recs) == 2
    for r in recs:
        assert (r.device, r.gpu_name, r.model_size_bytes, r.model_n_params) == ("cpu", "AMD EPYC", 2783872, 4591904)
        assert r.extra["catalogued"] is False and r.extra["device_from"] == "cpu_info"
        assert (r.extra["runtime"], r.extra["build"]) == ("llama.cpp", "build: 0c1e570 (1)")
        assert "device_given" not in r.extra and "build_given" not in r.extra
    # uncatalogued: no spec bandwidth, so out of the cross-device fit, without an error
    df = summary.records_frame(recs)
    assert crossgpu.tg_rows(df).empty and crossgpu.calibrate(df)["n_rows"] == 0


@pytest.mark.parametrize("fmt", MACHINE_FORMATS)
def test_the_rows_own_device_and_build_are_kept_over_the_given_ones(fmt):
    """llama-bench's own columns are the evidence: a given device or build that disagrees is noted, not used;
    a given runtime is taken (ik_llama.cpp's llama-bench writes the same formats)."""
    meta = {"url": "x", "device": "NVIDIA GeForce RTX 4090", "build": "build: 1234567 (99)", "runtime": "ik_llama.cpp"}
    recs, _, _ = published.import_file(LLAMA_BENCH / f"tiny-q4_k_m.{fmt}", "t", meta)
    assert {(r.gpu_name, r.extra["device_given"], r.extra["build"], r.extra["build_given"], r.extra["runtime"])
            for r in recs} == {("AMD EPYC", "NVIDIA GeForce RTX 4090", "build: 0c1e570 (1)", "build: 1234567 (99)",
                                "ik_llama.cpp")}
    # --device cpu (this machine's CPU) on rows that name their own CPU: the row's name
    recs, _, _ = published.import_file(LLAMA_BENCH / f"tiny-q4_k_m.{fmt}", "t", {"url": "x", "device": "cpu"})
    assert {r.gpu_name for r in recs} == {"AMD EPYC"}


@pytest.mark.parametrize("fmt", MACHINE_FORMATS)
def test_llama_benchs_markdown_table_takes_its_device_from_the_command_line(fmt):
    """llama-bench's markdown table has no cpu_info / gpu_info column: with no --device its rows are skipped
    with the reason (never guessed to be this machine's); --device cpu is this machine's CPU (cpu_model(), as
    the harness's own runs name it). Runtime and build: unknown unless given (the table's build line is not
    read: a pasted comparison prints one build for two columns)."""
    from harness.measure.env import cpu_model

    md = LLAMA_BENCH / f"tiny-q4_k_m.{fmt}.md"
    recs, skipped, _ = published.import_file(md, "t", {"url": "x"})
    assert not recs and len(skipped) == 2
    assert all(s.why.startswith("device: none named") and "--device cpu" in s.why for s in skipped)
    recs, skipped, _ = published.import_file(md, "t", {"url": "x", "device": "cpu"})
    assert not skipped and len(recs) == 2
    here = devices.find(cpu_model())
    for r in recs:
        assert (r.device, r.gpu_name) == ("cpu", here.name if here else cpu_model())
        assert r.extra["catalogued"] is (here is not None) and r.extra["device_from"].startswith("this machine")
        assert (r.extra["runtime"], r.extra["build"]) == (None, None)
    recs, _, _ = published.import_file(md, "t", {"url": "x", "device": "AMD EPYC", "runtime": "llama.cpp",
                                                 "build": "build: 0c1e570 (1)"})
    assert {(r.gpu_name, r.extra["runtime"], r.extra["build"]) for r in recs} == {
        ("AMD EPYC", "llama.cpp", "build: 0c1e570 (1)")}


def test_import_command_on_a_users_own_llama_bench_csv(tmp_path):
    """The real CLI on llama-bench's csv with no --device: exit 0, both rows written, one line naming the
    device the catalog does not know."""
    import json

    r = run_cli("import", str(LLAMA_BENCH / "tiny-q4_k_m.csv"), "--url", "x", "--out", str(tmp_path / "a"),
                timeout=300)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in (tmp_path / "a" / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and {x["gpu_name"] for x in recs} == {"AMD EPYC"}
    unknown = [x for x in r.stdout.splitlines() if "catalog does not know" in x]
    assert unknown == ["2 records are on devices the catalog does not know (AMD EPYC): imported, without a spec "
                       "bandwidth, so they stay out of the cross-device fit"]
    assert "2 records from 1 files on 1 devices" in r.stdout
    # the markdown table: --device cpu
    r = run_cli("import", str(LLAMA_BENCH / "tiny-q4_k_m.csv.md"), "--url", "x", "--device", "cpu",
                "--runtime", "llama.cpp", "--out", str(tmp_path / "b"), timeout=300)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in (tmp_path / "b" / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(x["extra"]["runtime"] == "llama.cpp" and x["device"] == "cpu" for x in recs)


def test_db_and_compare_show_a_cpu_row_under_its_cpus_name(tmp_path):
    """`harness db`'s bench view and `harness compare` show the imported CPU rows, the CPU's name as the machine
    and the runtime with its build."""
    pytest.importorskip("duckdb", reason="DuckDB is an optional extra: pip install -e '.[cluster]'")
    from harness import importer, query

    recs, _ = importer.import_files([LLAMA_BENCH / "tiny-q4_k_m.csv"], "mine", {"url": "x"})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "records.jsonl").write_text("".join(r.to_json() + "\n" for r in recs))
    con = query.connect([tmp_path])
    got = con.execute("SELECT machine, backends, n_prompt, n_gen, runtime FROM bench ORDER BY n_gen").fetchall()
    assert got == [("AMD EPYC", "cpu", 32, 0, "llama.cpp build: 0c1e570 (1)"),
                   ("AMD EPYC", "cpu", 0, 8, "llama.cpp build: 0c1e570 (1)")]
    r = run_cli("compare", "mine", "--results", str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| pp32 |" in r.stdout and "| tg8  |" in r.stdout
    assert "t/s mine: median over 1 repetitions; AMD EPYC; published weights; llama.cpp build: 0c1e570 (1)" \
        in r.stdout


# --- runtime and build per rate column -----------------------------------------------------------------------

PR94 = "ikllama-pr94-rtx4080-cuda-llama1b3b"


def _pr94_runtimes(recs):
    return {(r.extra["column"], r.extra["runtime"], r.extra["build"]) for r in recs}


def test_each_rate_column_carries_its_own_runtime_and_build(tmp_path):
    """A `columns:` entry for a rate column header over the source's top-level runtime / build: ik_llama.cpp's
    PR 94 compares its main branch and the PR ("t/s (main)", "t/s (PR)") and mainline llama.cpp afd9909a (3942)
    ("t/s (mainline)"). Written here with the structure of data/published's yaml."""
    import shutil

    shutil.copy(DATA / f"{PR94}.txt", tmp_path / "pr94.txt")
    (tmp_path / "pr94.yaml").write_text(
        "url: https://github.com/ikawrakow/ik_llama.cpp/pull/94\nruntime: ik_llama.cpp\nbuild: null\n"
        "columns:\n  \"t/s (mainline)\":\n    runtime: llama.cpp\n    build: \"afd9909a (3942)\"\n"
        "device: RTX-4080\nbackend: CUDA\nformat: md\n")
    recs, _, src = published.import_file(tmp_path / "pr94.txt", "t")
    assert src.runtime == "ik_llama.cpp" and src.columns == {"t/s (mainline)": {"runtime": "llama.cpp",
                                                                               "build": "afd9909a (3942)"}}
    assert _pr94_runtimes(recs) == {("t/s (main)", "ik_llama.cpp", None), ("t/s (PR)", "ik_llama.cpp", None),
                                    ("t/s (mainline)", "llama.cpp", "afd9909a (3942)")}
    one_b = [r for r in recs if r.model_desc == "llama 1B Q4_0"]
    assert {(r.extra["column"], r.tokens_per_s, r.extra["runtime"]) for r in one_b} == {
        ("t/s (main)", 519.27, "ik_llama.cpp"), ("t/s (PR)", 538.75, "ik_llama.cpp"),
        ("t/s (mainline)", 505.63, "llama.cpp")}
    # --runtime on the command line is the top level: the column's entry still wins for its column
    recs, _, _ = published.import_file(tmp_path / "pr94.txt", "t", {"runtime": "llama.cpp"})
    assert {r.extra["runtime"] for r in recs if r.extra["column"] == "t/s (main)"} == {"llama.cpp"}
    # "unknown" is None; no runtime given for a markdown table is None too (never guessed)
    (tmp_path / "pr94.yaml").write_text("url: https://x\nruntime: unknown\ndevice: RTX-4080\nbackend: CUDA\n")
    recs, _, _ = published.import_file(tmp_path / "pr94.txt", "t")
    assert {r.extra["runtime"] for r in recs} == {None}
    (tmp_path / "pr94.yaml").write_text("url: https://x\ndevice: RTX-4080\nbackend: CUDA\n")
    recs, _, _ = published.import_file(tmp_path / "pr94.txt", "t")
    assert {r.extra["runtime"] for r in recs} == {None}
    (tmp_path / "pr94.yaml").write_text("url: https://x\ncolumns: [\"t/s (main)\"]\n")
    with pytest.raises(published.ImportError_, match="columns: must map rate column headers"):
        published.import_file(tmp_path / "pr94.txt", "t")


def test_the_real_pr94_yaml_gives_each_column_its_runtime():
    """The same on data/published's own yaml (skipped only while that yaml has no runtime key yet)."""
    import yaml

    meta = yaml.safe_load((DATA / f"{PR94}.yaml").read_text())
    if "runtime" not in meta:
        pytest.skip(f"data/published/{PR94}.yaml has no runtime key yet")
    recs, _, _ = published.import_file(DATA / f"{PR94}.txt", "t")
    got = {(c, rt) for c, rt, _ in _pr94_runtimes(recs)}
    assert got == {("t/s (main)", "ik_llama.cpp"), ("t/s (PR)", "ik_llama.cpp"), ("t/s (mainline)", "llama.cpp")}


def test_every_yaml_columns_entry_names_a_rate_column_of_its_table():
    """A `columns:` key that matches no rate column would leave that column on the top-level runtime silently."""
    import yaml

    for side in sorted(DATA.glob("*.yaml")):
        meta = yaml.safe_load(side.read_text())
        if not isinstance(meta, dict) or not meta.get("columns"):
            continue
        recs, _, _ = published.import_file(side.with_suffix(".txt"), "t")
        assert set(meta["columns"]) <= {r.extra["column"] for r in recs}, side.name


def test_a_load_log_carries_the_sources_runtime_and_build():
    log = REPO / "tests" / "data" / "llama-log" / "llama-3.2-1b-synthetic-q4_k_m-cpu.log"
    recs, _, _ = published.import_file(log, "t", {"url": "x", "format": "log", "device": "cpu",
                                                  "runtime": "llama.cpp", "build": "b1"})
    assert [(r.extra["runtime"], r.extra["build"], r.device) for r in recs] == [("llama.cpp", "b1", "cpu")]
    recs, _, _ = published.import_file(log, "t", {"url": "x", "format": "log", "device": "RTX 4090"})
    assert [(r.extra["runtime"], r.extra["build"], r.gpu_name) for r in recs] == [
        (None, None, "NVIDIA GeForce RTX 4090")]
