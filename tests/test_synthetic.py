"""The shape-faithful writer: Llama 3.2 1B's shapes and parameter count; llama.cpp accepts the files."""

from __future__ import annotations

import ctypes
import os

import gguf
import numpy as np
import pytest

from harness.sources import quantize, synthetic

ONE_B = synthetic.ARCHS["llama-3.2-1b"]


def test_1b_architecture_is_llama_3_2_1b():
    a = ONE_B
    assert (a.n_embd, a.n_layer, a.n_head, a.n_head_kv, a.head_dim, a.n_ff, a.n_vocab) == \
        (2048, 16, 32, 8, 64, 8192, 128256)
    assert (a.n_ctx_train, a.rope_theta, a.rms_eps, a.rope_scaling) == (131072, 500000.0, 1e-5, (32.0, 1.0, 4.0, 8192))
    # the real model's count (tied embeddings) plus the 32 rope factors
    assert a.n_params() == 1_235_814_400 + 32
    names = [n for n, _, _ in synthetic.tensor_specs(a)]
    assert "output.weight" not in names  # tied embeddings
    assert len(names) == 2 + 9 * 16 + 1


def test_tiny_dims_allow_k_and_iq_quants():
    t = synthetic.ARCHS["tiny"]
    for _, shape, _typ in synthetic.tensor_specs(t):
        if len(shape) == 2:
            assert shape[-1] % 256 == 0  # row length: K/IQ super-blocks are 256 wide
    assert t.n_head // t.n_head_kv == ONE_B.n_head // ONE_B.n_head_kv  # same GQA ratio


def test_rope_factors_follow_llama3_scaling():
    f = synthetic.rope_factors(ONE_B)
    assert f.shape == (32,) and f.dtype == np.float32
    assert f[0] == 1.0 and f[-1] == 32.0  # high frequencies untouched, low ones scaled by the factor
    assert np.all(np.diff(f) >= 0) and ((f > 1) & (f < 32)).sum() == 3  # smooth band in between


def test_tokenizer_has_llama3_layout():
    tok = synthetic.build_tokenizer(ONE_B)
    assert len(tok.tokens) == 128256 and len(set(tok.tokens)) == 128256
    assert tok.tokens[128000] == "<|begin_of_text|>" and tok.bos == 128000
    assert tok.tokens[128009] == "<|eot_id|>"
    assert tok.types[127999] == 1 and tok.types[128000] == 3


def test_f16_file_reads_back(tiny_file):
    arch = synthetic.ARCHS["tiny"]
    r = gguf.GGUFReader(tiny_file("F16"))
    got = {t.name: (tuple(int(x) for x in reversed(t.shape)), t.tensor_type.name) for t in r.tensors}
    want = {n: (s, "F32" if t == synthetic.F32 else "F16") for n, s, t in synthetic.tensor_specs(arch)}
    assert got == want
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["llama.attention.head_count_kv"].contents() == arch.n_head_kv


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    t = synthetic.ARCHS["tiny"]
    a = synthetic.write_f16(t, tmp_path / "a.gguf", seed=1)
    b = synthetic.write_f16(t, tmp_path / "b.gguf", seed=1)
    c = synthetic.write_f16(t, tmp_path / "c.gguf", seed=2)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no partial files


def _load(path):
    import llama_cpp

    from harness.llamalog import silence

    silence()
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
    assert model, f"llama.cpp refused {path}"
    return llama_cpp, model


def test_llama_cpp_loads_and_counts_params(tiny_file):
    lib, model = _load(tiny_file("Q4_K_M"))
    try:
        assert lib.llama_model_n_params(model) == synthetic.ARCHS["tiny"].n_params()
        buf = ctypes.create_string_buffer(128)
        lib.llama_model_desc(model, buf, 128)
        assert b"Q4_K - Medium" in buf.value
    finally:
        lib.llama_model_free(model)


def test_llama_cpp_accepts_the_tokenizer(tiny_file):
    lib, model = _load(tiny_file("Q8_0"))
    try:
        vocab = lib.llama_model_get_vocab(model)
        assert lib.llama_vocab_n_tokens(vocab) == 512
        assert lib.llama_vocab_bos(vocab) == 496
        text = "!!Hello world, ça va?\n".encode()  # "!!" is one of the tiny vocabulary's merged pairs
        toks = (lib.llama_token * 64)()
        n = lib.llama_tokenize(vocab, text, len(text), toks, 64, True, False)
        assert n == len(text)  # BOS, one token for "!!", one per remaining byte
        assert toks[0] == 496 and toks[1] == 256
        out = b""
        piece = ctypes.create_string_buffer(32)
        for i in range(1, n):
            k = lib.llama_token_to_piece(vocab, toks[i], piece, 32, 0, False)
            out += piece.raw[:k]
        assert out == text  # byte-level BPE round trip
    finally:
        lib.llama_model_free(model)


@pytest.mark.large
@pytest.mark.skipif(not os.environ.get("HARNESS_LARGE"), reason="set HARNESS_LARGE=1: builds the 1B's Q8_0 (1.3 GB)")
def test_llama_cpp_counts_1b_params():
    from harness.config import Config

    cache = Config(name="x").resolved_cache_dir
    path, _ = quantize.ensure_synthetic(cache, "llama-3.2-1b", 0, "Q8_0", imatrix=True, progress=True)
    lib, model = _load(path)
    try:
        assert lib.llama_model_n_params(model) == 1_235_814_432
    finally:
        lib.llama_model_free(model)
