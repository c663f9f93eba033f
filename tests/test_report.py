"""The report: verdicts on fixed numbers, the per-quant table, and the whole report rendered from a records
file made here (no llama.cpp)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import re

import matplotlib.image as mpimg
import pandas as pd
import pytest
from test_calibrate import BPW, ENV_CPU, N, frame, make_records

from harness import cli, report, schema
from harness.catalog import page
from harness.report import tables


def write_run(path, records, env=ENV_CPU):
    path.mkdir(parents=True)
    with schema.RecordWriter(path / "records.jsonl") as w:
        for r in records:
            w.write(r)
    if env is not None:
        (path / "env.json").write_text(json.dumps(env))
    return path


@pytest.mark.parametrize("measured,predicted,text,inside", [
    (100, 100, "inside (+0%)", True),
    (120, 100, "inside (+20%)", True),
    (80, 100, "inside (-20%)", True),
    (130, 100, "outside (+30%: 10 points beyond ±20%)", False),
    (50, 100, "outside (-50%: 30 points beyond ±20%)", False),
    (340, 100, "outside (+240%: 220 points beyond ±20%)", False),
    (None, 100, "-", None),
    (100, None, "-", None),
    (100, float("nan"), "-", None),
])
def test_verdict(measured, predicted, text, inside):
    assert tables.verdict(measured, predicted) == text
    assert tables.inside(measured, predicted) is inside


def test_quant_table_on_fixed_records():
    df = frame(make_records(quant_list=["Q4_K_M", "Q8_0"], noise=0.0))
    device = {"name": "Test CPU", "kind": "cpu", "vendor": "cpu", "bandwidth_gb_s": 20.0, "peak_source": "rss"}
    t = tables.quant_table(df, device)
    assert list(t.quant) == ["Q4_K_M", "Q8_0"]
    r = t.set_index("quant").loc["Q4_K_M"]
    size = int(BPW["Q4_K_M"] * N / 8)
    # the page prints no speed for a CPU: no figure, no verdict; its rule extrapolated, as a ratio only
    assert math.isnan(r.page_tok_s) and math.isnan(r.tg_vs_page) and r.tg_verdict == "-" and r.tg_inside is None
    assert r.page_rule_tok_s == pytest.approx(20.0 / 0.82 * 0.55)
    assert r.tg_vs_rule == pytest.approx(r.tg_tok_s / r.page_rule_tok_s)
    assert t.tg_inside.isna().all() and t.page_rule_tok_s.notna().all()
    head = report._headline(t, device)[0][1]
    assert "The page prints no speed for this device" in head and "no speed verdict here" in head
    assert "measured / rule is" in head and "inside ±20% of it" in head
    assert r.pp_tok_s == pytest.approx(40 * r.tg_tok_s)
    assert r.tg_spread == 0
    assert r.weights_bytes == size
    # CPU: what is needed is llama.cpp's allocations (no repacked buffer in these records: weights as they are)
    assert r.weights_needed_bytes == size
    assert r.peak_bytes > r.needed_bytes  # RSS also holds the runtime (150 MiB in these made-up records)
    assert r.needed_bytes == pytest.approx(size + r.kv_bytes + r.compute_bytes + 501 * 1024)
    assert r.mem_vs_page == pytest.approx(r.needed_bytes / page.page_vram_bytes("Q4_K_M"))
    assert r.page_vram_bytes == 0.8e9 and r.page_file_bytes == 0.74e9
    assert r.mem_vs_page == pytest.approx(r.needed_bytes / 0.8e9)
    assert r.true_bits == pytest.approx(BPW["Q4_K_M"], abs=1e-6) and r.page_bits == 4.8
    assert r.file_vs_page == pytest.approx((size + 7_000_000) / 0.74e9)


def test_quant_table_gpu_uses_the_catalog_and_device_memory():
    df = frame(make_records(quant_list=["Q4_K_M"], device="cuda", gpu_name="NVIDIA H100 80GB HBM3", noise=0.0))
    built = report.build(df, {"gpu": {"name": "NVIDIA H100 80GB HBM3"}}, "gpu-run")
    t, cal = built[0], built[1]
    assert cal["device"]["name"] == "NVIDIA H100 SXM"
    assert t.page_tok_s.iloc[0] == 2657  # printed for the H100 SXM at Q4_K_M: a verdict against it
    assert t.page_rule_tok_s.iloc[0] == pytest.approx(page.page_tok_s(3352, "nvidia", "Q4_K_M"))
    assert t.tg_inside.iloc[0] is not None and t.tg_verdict.iloc[0] != "-"
    assert "The page prints a speed for this device at Q4_K_M" in report._headline(t, {"vendor": "nvidia"})[0][1]
    assert "NVML" in built[3]
    # the page-on-GPUs section says a GPU measured this run (it said "No GPU measured" for every run)
    assert "This run measured its files on NVIDIA H100 SXM" in built[3] and "No GPU measured" not in built[3]
    assert "No GPU measured this run's files" in report.measured_where({"kind": "cpu"})
    assert "not a GPU's: no GPU measured them" in report.measured_where({"kind": "rpc"})


def _pngs_in_html(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def test_write_report_end_to_end(tmp_path):
    run = write_run(tmp_path / "results" / "2025-run", make_records(depths=(0, 1024)))
    out = report.write_report(run, tmp_path / "rep")
    assert out == tmp_path / "rep"
    for name in ("report.md", "report.html", "summary.csv", "calibration.json", "speed.png", "memory.png",
                 "roofline.png", "context.png"):
        assert (out / name).is_file(), name
    s = pd.read_csv(out / "summary.csv")
    assert list(s.quant) == list(page.BY_QUANT)  # one row per quant, the page's order
    for col in ("tg_tok_s", "pp_tok_s", "page_tok_s", "tg_verdict", "weights_bytes", "kv_bytes", "compute_bytes",
                "needed_bytes", "peak_bytes", "page_vram_bytes", "mem_verdict", "true_bits", "page_bits",
                "file_bytes", "page_file_bytes", "calibrated_tok_s"):
        assert col in s.columns
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["run"]["run_id"] == "2025-run" and cal["device"]["name"] == "Test CPU"

    md = (out / "report.md").read_text()
    assert "**synthetic**" in md and "quality does not" in md
    assert "Test CPU" in md and "20.0 GB/s" in md
    for q in page.BY_QUANT:
        assert f"| {q} |" in md
    for d in page.DISCREPANCIES:
        assert d in md
    assert "![" in md and "(speed.png)" in md

    html = (out / "report.html").read_text()
    assert "<img" in html and 'src="speed.png"' not in html  # self-contained
    pngs = _pngs_in_html(html)
    assert len(pngs) == 5  # speed, memory, roofline, context, the page on GPUs
    for png in pngs:
        img = mpimg.imread(io.BytesIO(png), format="png")
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    for name in ("speed.png", "memory.png", "roofline.png", "context.png"):
        assert mpimg.imread(out / name).shape[0] > 100


def test_single_depth_has_no_context_figure_and_default_out(tmp_path, monkeypatch):
    # a results folder under the results root: its report goes to the reports root; elsewhere: inside it
    monkeypatch.setenv("HARNESS_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("HARNESS_REPORTS", str(tmp_path / "reports"))
    elsewhere = write_run(tmp_path / "mine" / "run-0", make_records(quant_list=["Q4_K_M", "Q8_0"]))
    assert report.write_report(elsewhere) == elsewhere / "report"
    run = write_run(tmp_path / "results" / "run-1", make_records(quant_list=["Q4_0", "Q4_K_M", "Q8_0"]))
    out = report.write_report(run)
    assert out == tmp_path / "reports" / "run-1"
    assert not (out / "context.png").exists()
    assert len(_pngs_in_html((out / "report.html").read_text())) == 4  # with the page on GPUs


def test_failed_quant_and_missing_env(tmp_path):
    recs = make_records(quant_list=["Q4_K_M", "Q8_0"], pp=False)
    recs.append(schema.make(run_id="r", utc="2025-01-01T00:00:00+00:00", status="error", quant="IQ3_M",
                            weights="synthetic", error="quantize failed: out of disk"))
    run = write_run(tmp_path / "run-2", recs, env=None)
    out = report.write_report(run, tmp_path / "rep")
    md = (out / "report.md").read_text()
    assert "## Failures" in md and "IQ3_M: quantize failed: out of disk" in md
    assert "unknown (env.json has no memory_bandwidth)" in md  # no bandwidth, no page speed, said so
    s = pd.read_csv(out / "summary.csv")
    assert set(s.quant) == {"IQ3_M", "Q4_K_M", "Q8_0"}
    assert s.page_tok_s.isna().all()


def test_hub_weights_statement():
    df = frame(make_records(quant_list=["Q4_0"], weights="hub"))
    assert "real weights" in tables.weights_statement(df)


def test_synthetic_weights_statement_says_how_the_files_were_built():
    df = frame(make_records(quant_list=["Q4_0"]))
    assert "blocks=tiled" not in tables.weights_statement(df)  # quantized whole: runs before the tiled writer
    df["weights_ref"] = "llama-3.2-1b seed=0 imatrix=uniform blocks=tiled"
    s = tables.weights_statement(df)
    assert "Reference: llama-3.2-1b seed=0 imatrix=uniform blocks=tiled. blocks=tiled: each tensor's type is the " \
           "one llama.cpp's quantizer chooses" in s


def test_cli_report(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err
    run = write_run(tmp_path / "run-3", make_records(quant_list=["Q4_0", "Q4_K_M", "Q8_0"]))
    assert cli.main(["report", str(run), "--out", str(tmp_path / "r3")]) == 0
    assert (tmp_path / "r3" / "report.html").is_file()
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "records.jsonl" in capsys.readouterr().err


def _tiny_gguf(path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, arch="llama")
    w.add_token_list(["a", "b", "c"])
    w.add_array("test.ints", [1, 2, 3])
    w.add_string("test.s", "x")
    w.add_tensor("x", np.zeros((4, 256), dtype=np.float32))
    w.add_tensor("y", np.zeros((8, 256), dtype=np.float16))
    q = gguf.quants.quantize(np.ones((2, 256), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("z", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_one_reader_for_tensor_types(tmp_path):
    from harness.gguf import inspect, validate

    p = _tiny_gguf(tmp_path / "t.gguf")
    header = validate.check(p, expect_arch=None)
    assert header.type_weights == {"F32": 1024, "F16": 2048, "Q8_0": 512}
    assert header.type_weights == {k: v["n_elements"] for k, v in inspect.describe(p)["types"].items()}
    # bytes per type: F32 4 per weight, F16 2, Q8_0 34 per block of 32 (ggml's own block sizes)
    assert header.tensor_types() == {"F16": {"n_weights": 2048, "n_bytes": 4096},
                                     "F32": {"n_weights": 1024, "n_bytes": 4096},
                                     "Q8_0": {"n_weights": 512, "n_bytes": 512 // 32 * 34}}
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError):
        validate.check(bad, expect_arch=None)


def with_types(records, types):
    return [dataclasses.replace(r, tensor_types=types.get(r.quant)) for r in records]


def test_tensor_types_come_from_the_records():
    from harness.analysis import points

    types = {"Q4_K_M": {"Q4_K": {"n_weights": 1000, "n_bytes": 562}, "F32": {"n_weights": 10, "n_bytes": 40}}}
    recs = with_types(make_records(quant_list=["Q4_K_M"], pp=False), types)
    assert points.tensor_types_from_records(frame(recs)) == {"Q4_K_M": {"Q4_K": 1000, "F32": 10}}
    # a quant whose records predate the field: no tensor types for anyone (the mix models sit out)
    older = make_records(quant_list=["Q8_0"], pp=False)
    assert points.tensor_types_from_records(frame(recs + older)) is None


def test_report_never_opens_model_files(tmp_path):
    """A report regenerated after the model files (and the whole cache) are gone equals the original."""
    tiny = _tiny_gguf(tmp_path / "model.gguf")
    recs = [dataclasses.replace(r, file_path=str(tiny), file_bytes=tiny.stat().st_size)
            for r in make_records(quant_list=["Q4_K_M", "Q8_0", "IQ3_M"], noise=0.0)]
    types = {q: {"Q4_K": {"n_weights": 900_000_000, "n_bytes": 506_250_000},
                 "Q6_K": {"n_weights": 300_000_000, "n_bytes": 246_093_750}} if q == "Q4_K_M" else
             {"Q8_0": {"n_weights": 1_200_000_000, "n_bytes": 1_275_000_000}} if q == "Q8_0" else
             {"IQ3_S": {"n_weights": 1_000_000_000, "n_bytes": 429_687_500},
              "Q6_K": {"n_weights": 200_000_000, "n_bytes": 164_062_500}} for q in ("Q4_K_M", "Q8_0", "IQ3_M")}
    run = write_run(tmp_path / "run", with_types(recs, types))
    first = report.write_report(run, tmp_path / "r1")
    tiny.unlink()
    second = report.write_report(run, tmp_path / "r2")
    for name in ("summary.csv", "calibration.json", "report.md"):
        a, b = (first / name).read_text(), (second / name).read_text()
        assert a.replace("r1", "rX") == b.replace("r2", "rX"), name
    cal = json.loads((first / "calibration.json").read_text())
    assert any("mix" in c for c in cal["tg"]["candidates"]), "the mix models ran: the tensor types were used"

@pytest.mark.parametrize("bufs, want", [
    ({"CPU_Mapped": 733, "CPU_REPACK": 492}, 733),  # mmap: the repacked weights' file pages counted once
    ({"CPU": 241, "CPU_REPACK": 492}, 733),  # no mmap: llama.cpp keeps no source copy
    ({"CPU_Mapped": 700}, 700),  # nothing repacked
])
def test_weights_needed_counts_repacked_weights_once(bufs, want):
    from harness.analysis import points

    assert points.weights_needed(bufs, None, device_side=False) == want
    assert points.weights_needed({"CUDA0": 600, "CPU_Mapped": 250}, None, device_side=True) == 600


def test_spread_as_the_field_reports_it():
    from harness import stats

    d = stats.describe([10.0, 12.0, 14.0])
    assert (d["n"], d["mean"], d["median"], d["min"], d["max"]) == (3, 12.0, 12.0, 10.0, 14.0)
    assert d["sd"] == pytest.approx(2.0)  # sample standard deviation (n - 1), as llama-bench
    assert 10.0 <= d["ci_lo"] <= 12.0 <= d["ci_hi"] <= 14.0
    assert stats.describe([10.0, 12.0, 14.0]) == d  # seeded: a regenerated report is the same
    assert math.isnan(stats.describe([5.0])["sd"]) and stats.describe([])["n"] == 0
    ties = stats.overlapping({"a": (1.0, 2.0), "b": (1.5, 3.0), "c": (4.0, 5.0)})
    assert ties == {"a": ["b"], "b": ["a"], "c": []}


def test_speed_table_does_not_rank_overlapping_quants():
    df = frame(make_records(quant_list=["Q4_K_M", "Q4_K_S", "Q8_0"], noise=0.05, reps=5))
    t = tables.quant_table(df, {"name": "x", "kind": "cpu", "vendor": "cpu", "bandwidth_gb_s": 20.0,
                                "peak_source": "rss"})
    rows = {r[0]: r for r in tables.speed_rows(t)}
    assert " ± " in rows["Q8_0"][2] and "(5)" in rows["Q8_0"][2] and "[" in rows["Q8_0"][3]
    # the two 4-bit K quants are 5% noise apart at most: their intervals overlap, and the table says so
    assert "Q4_K_S" in rows["Q4_K_M"][4]


def test_kv_arithmetic_from_the_headers_shape():
    ctxp = pd.DataFrame([{"quant": "X", "n_ctx": 1000, "type_k": "f16", "type_v": "q8_0", "flash_attn": "on",
                          "fa": "enabled", "kv_bytes": 1.0, "compute_bytes": 2.0}])
    shape = {"n_layer": 10, "n_head_kv": 2, "head_dim": 64, "v_head_dim": 64}
    row = tables.kv_rows(ctxp, shape)[0]
    cells = 1024  # 1000 rounded up to 256 cells
    assert row[4] == f"{10 * 2 * cells * (64 * 2 + 64 * 34 / 32) / 2**20:,.1f}"  # K f16 + V q8_0, by hand
    assert tables.kv_rows(ctxp, {**shape, "sliding_window": 512})[0][4] == "-"  # a window, not the context


def test_calibration_lines_take_missing_errors_as_dashes():
    """A nested error with holes (a fold with too few quants leaves NaN, written to JSON as null) is shown as '-',
    never a TypeError: CI once failed so on a cluster run's report."""
    from harness.report.tables import calibration_lines

    cal = {"tg": {"chosen": "bandwidth", "formula": "t = b / bw", "overhead_s_per_token": 0.001,
                  "nested": {"median_ape": 0.1, "worst_ape": None, "rms_ape": None, "rms_ci95": [None, None]}}}
    text = "\n".join(calibration_lines(cal))
    assert "median 10.0%, worst -, RMS -" in text
