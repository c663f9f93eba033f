"""`harness inspect`: what the GGUF header says, checked against what llama.cpp itself reports for the same file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from harness.config import ConfigError
from harness.gguf import inspect
from harness.sources import quantize, synthetic

TINY = synthetic.ARCHS["tiny"]
QUANTS = ("Q4_K_M", "Q8_0", "Q4_K_L")


@pytest.fixture(scope="session")
def tiny_quant(tmp_path_factory):
    """Build only the quants these tests need (seconds), not the whole page's set."""
    cache = tmp_path_factory.getbasetemp() / "tiny-few-quants"

    def get(quant: str) -> Path:
        return quantize.ensure_synthetic(cache, "tiny", 0, quant, imatrix=True)[0]

    return get


def llama_cpp_view(path: Path) -> tuple[int, int]:
    """(n_params, size in bytes) as llama.cpp reports them, weights only (vocab_only would report 0)."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"llama.cpp could not load {path}"
    try:
        return int(llama_cpp.llama_model_n_params(model)), int(llama_cpp.llama_model_size(model))
    finally:
        llama_cpp.llama_model_free(model)


@pytest.mark.parametrize("quant", QUANTS)
def test_describe_matches_llama_cpp(tiny_quant, quant):
    path = tiny_quant(quant)
    d = inspect.describe(path)
    n_params, size = llama_cpp_view(path)
    assert d["n_params"] == TINY.n_params() == n_params
    assert d["tensor_bytes"] == size
    assert d["file_bytes"] == path.stat().st_size > d["tensor_bytes"]  # header and vocabulary come on top
    assert d["architecture"] == "llama"
    assert d["quant"] == quant
    assert d["page_bits"] == {"Q4_K_M": 4.8, "Q8_0": 8.0, "Q4_K_L": 4.9}[quant]
    assert d["bits_per_weight"] == pytest.approx(8 * size / n_params)
    assert sum(r["n_elements"] for r in d["types"].values()) == n_params
    assert sum(r["bytes"] for r in d["types"].values()) == size
    assert sum(r["tensors"] for r in d["types"].values()) == d["n_tensors"] == len(synthetic.tensor_specs(TINY))
    e, rest = d["embd"], d["rest"]
    assert e["n_elements"] == TINY.n_vocab * TINY.n_embd
    assert e["n_elements"] + rest["n_elements"] == n_params and e["bytes"] + rest["bytes"] == size
    json.dumps(d)  # --json needs it


def test_known_types(tiny_quant):
    q8 = inspect.describe(tiny_quant("Q8_0"))
    assert set(q8["types"]) == {"Q8_0", "F32"}  # norms and rope factors stay F32
    assert q8["types"]["Q8_0"]["bits_per_weight"] == 8.5  # 34 bytes per block of 32
    q4l = inspect.describe(tiny_quant("Q4_K_L"))
    q4m = inspect.describe(tiny_quant("Q4_K_M"))
    assert q4l["file_type"] == q4m["file_type"] == "MOSTLY_Q4_K_M"  # the same llama.cpp recipe...
    assert q4l["embd"]["type"] == "Q8_0" and q4m["embd"]["type"] != "Q8_0"  # ...but the embedding kept in Q8_0
    assert q4l["embd"]["bits_per_weight"] == 8.5
    assert q4l["rest"] == q4m["rest"]  # and nothing else changes


def test_quant_of_file_name_fallback():
    assert inspect.quant_of(None, None, "Llama-3.2-1B-Instruct-Q4_K_L.gguf") == ("Q4_K_L", "file name")
    assert inspect.quant_of(None, None, "model-iq3_m.gguf") == ("IQ3_M", "file name")
    assert inspect.quant_of(None, None, "model.gguf") == (None, None)
    assert inspect.quant_of("MOSTLY_Q5_K_M", "Q8_0", "x.gguf")[0] == "Q5_K_L"
    assert inspect.quant_of("MOSTLY_Q5_K_M", "Q6_K", "x.gguf")[0] == "Q5_K_M"


def test_format_text(tiny_quant):
    text = inspect.format_text(inspect.describe(tiny_quant("Q4_K_M")))
    assert f"{TINY.n_params():,}" in text
    assert "Q4_K_M" in text and "page's bits     4.80" in text and "token_embd.weight" in text


def test_describe_rejects_missing_and_non_gguf(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        inspect.describe(tmp_path / "absent.gguf")
    (tmp_path / "notes.txt").write_text("hello, not a model\n")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        inspect.describe(tmp_path / "notes.txt")
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\xff")  # right magic, truncated header
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        inspect.describe(tmp_path / "cut.gguf")


def test_cli(tiny_quant, tmp_path):
    r = run_cli("inspect", str(tiny_quant("Q8_0")), "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["quant"] == "Q8_0"
    r = run_cli("inspect", str(tmp_path / "absent.gguf"), timeout=120)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "notes.txt").write_text("hello\n")
    r = run_cli("inspect", str(tmp_path / "notes.txt"), timeout=120)
    assert r.returncode == 2 and "not a GGUF file" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
