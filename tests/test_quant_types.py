"""Each of the page's 12 recipes, applied by llama.cpp's quantizer, yields the expected ggml tensor types."""

from __future__ import annotations

import collections

import gguf
import pytest

from harness.catalog import quants

# Dominant type of the block weight matrices, and the type of token_embd (which is also the output matrix:
# the embeddings are tied, so llama.cpp quantizes it like output.weight).
EXPECTED = {
    "IQ3_M": ("IQ3_S", "Q6_K"),
    "Q4_0": ("Q4_0", "Q6_K"),
    "Q3_K_L": ("Q3_K", "Q6_K"),
    "IQ4_XS": ("IQ4_XS", "Q6_K"),
    "Q4_K_S": ("Q4_K", "Q6_K"),
    "Q4_K_M": ("Q4_K", "Q6_K"),
    "Q4_K_L": ("Q4_K", "Q8_0"),  # the Hub's _L: embedding/output kept in Q8_0
    "Q5_K_S": ("Q5_K", "Q6_K"),
    "Q5_K_M": ("Q5_K", "Q6_K"),
    "Q5_K_L": ("Q5_K", "Q8_0"),
    "Q6_K": ("Q6_K", "Q6_K"),
    "Q8_0": ("Q8_0", "Q8_0"),
}


def types_of(path):
    r = gguf.GGUFReader(path)
    return {t.name: t.tensor_type.name for t in r.tensors}, r


@pytest.mark.parametrize("quant", quants.PAGE_QUANTS)
def test_recipe_types(quant, tiny_file):
    types, reader = types_of(tiny_file(quant))
    body, embd = EXPECTED[quant]
    assert types["token_embd.weight"] == embd
    mats = [t for n, t in types.items() if n.startswith("blk.") and not n.endswith("norm.weight")]
    assert collections.Counter(mats).most_common(1)[0][0] == body
    # norms and rope factors stay F32 in every recipe
    assert all(t == "F32" for n, t in types.items() if n.endswith("norm.weight") or n == "rope_freqs.weight")
    ftype = reader.fields["general.file_type"].contents()
    assert ftype == int(getattr(gguf.LlamaFileType, quants.get(quant).ftype.replace("LLAMA_FTYPE_", "")))


def test_m_and_l_recipes_spend_more_bits(tiny_file):
    size = {q: tiny_file(q).stat().st_size for q in quants.PAGE_QUANTS}
    assert size["Q4_K_S"] < size["Q4_K_M"] < size["Q4_K_L"]
    assert size["Q5_K_S"] < size["Q5_K_M"] < size["Q5_K_L"]
    assert size["IQ3_M"] < size["Q4_K_M"] < size["Q6_K"] < size["Q8_0"]


def test_imatrix_changes_type_choices_like_the_hub(tiny_cache, tmp_path):
    """With an importance matrix llama.cpp picks some types differently, as in the Hub's imatrix quants:
    IQ4_XS keeps the first eighth of ffn_down in IQ4_XS (Q5_K without), Q4_0 moves it to Q4_1."""
    from harness.sources import quantize

    f16 = quantize.synthetic_file(tiny_cache, "tiny", 0, "F16", True)
    for quant, plain_type, imatrix_type in (("IQ4_XS", "Q5_K", "IQ4_XS"), ("Q4_0", "Q4_0", "Q4_1")):
        plain = quantize.quantize(f16, tmp_path / f"{quant}.gguf", quant, imatrix=False)
        with_imatrix = quantize.synthetic_file(tiny_cache, "tiny", 0, quant, True)
        assert types_of(plain)[0]["blk.0.ffn_down.weight"] == plain_type
        assert types_of(with_imatrix)[0]["blk.0.ffn_down.weight"] == imatrix_type
        assert types_of(with_imatrix)[0]["blk.1.ffn_down.weight"] == quant  # only the first eighth
