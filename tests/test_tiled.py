"""The tiled synthetic quants against what llama.cpp's quantizer writes for the same model: for each of the page's
12 recipes and each kernel probe's pure type, the same header to the byte (keys, tensor order, types, offsets),
the same size, the quantizer's own bytes in every matrix's first rows, and the rest made of those rows' blocks.

The reference files are llama.cpp's real quantizer over the full F16 file of seeded values (fast on the tiny
shape); ``benchmarks/tiled_vs_quantizer.py`` compares the full 1B and their speed.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from harness.catalog import quants
from harness.sources import probes, quantize, synthetic, tiled
from harness.sources.base import SourceError

TINY = synthetic.ARCHS["tiny"]


def header(path) -> bytes:
    """Everything before the tensor data: the keys and values, and every tensor's name, shape, type, offset."""
    with open(path, "rb") as f:
        return f.read(gguf.GGUFReader(path).data_offset)


def tensors(path) -> dict[str, np.ndarray]:
    """Each tensor's bytes, one row per line (a 1-D tensor is one row)."""
    return {t.name: np.asarray(t.data).view(np.uint8).reshape(t.data.shape[0] if t.data.ndim > 1 else 1, -1)
            for t in gguf.GGUFReader(path).tensors}


def blocks(rows: np.ndarray, type_name: str) -> set[bytes]:
    """The distinct blocks of `rows` (the pieces llama.cpp quantizes on their own: a block of a quantized type,
    32 values of a float type)."""
    unit = tiled._unit_bytes(type_name, rows.shape[1])
    flat = rows.tobytes()
    return {flat[i:i + unit] for i in range(0, len(flat), unit)}


def assert_same_as_quantizer(built, reference) -> None:
    assert built.stat().st_size == reference.stat().st_size
    assert header(built) == header(reference)
    ours, theirs = tensors(built), tensors(reference)
    assert list(ours) == list(theirs)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(built).tensors}
    for name, rows in ours.items():
        k = min(tiled.TILE_ROWS, len(rows))
        assert np.array_equal(rows[:k], theirs[name][:k]), f"{name}: the first rows are not the quantizer's"
        if len(rows) > k:
            assert blocks(rows[k:], types[name]) <= blocks(rows[:k], types[name]), f"{name}: a block not llama.cpp's"
            assert not np.array_equal(rows, theirs[name])  # the rest is tiled, not quantized (the test can tell)
            if rows.shape[1] > tiled._unit_bytes(types[name], rows.shape[1]):  # blocks drawn, not the rows repeated
                assert len(np.unique(rows, axis=0)) > k


def loads_with_every_block_checked(path) -> bool:
    """llama.cpp loads the file with check_tensors: every block's scales validated (finite, no NaN)."""
    import llama_cpp

    from harness.llamalog import silence

    silence()
    params = llama_cpp.llama_model_default_params()
    params.check_tensors = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        return False
    llama_cpp.llama_model_free(model)
    return True


@pytest.mark.parametrize("quant", quants.PAGE_QUANTS)
def test_each_page_quant_is_the_quantizers_file_tiled(tiny_cache, tiny_file, quant):
    reference, _ = quantize.ensure_reference(tiny_cache, "tiny", 0, quant, imatrix=True)
    assert_same_as_quantizer(tiny_file(quant), reference)
    assert loads_with_every_block_checked(tiny_file(quant))


@pytest.mark.parametrize("quant", ["IQ4_XS", "Q4_0"])  # the recipes whose types an imatrix changes
def test_without_an_imatrix_too(tiny_cache, tmp_path, quant):
    built, _ = quantize.ensure_synthetic(tmp_path, "tiny", 0, quant, imatrix=False)
    reference, _ = quantize.ensure_reference(tiny_cache, "tiny", 0, quant, imatrix=False)
    assert_same_as_quantizer(built, reference)


@pytest.fixture(scope="module")
def probe_shapes(tmp_path_factory):
    """The probes' shape (2 layers of tiny's) with its full F16 file, for llama.cpp's pure quantizer."""
    parch = probes.probe_arch(TINY, 2)
    f16 = synthetic.write_f16(parch, tmp_path_factory.mktemp("probe-f16") / "F16.gguf", seed=probes.SEED)
    return parch, f16


@pytest.mark.parametrize("type_name", sorted(probes.PURE_FTYPES))
def test_each_probe_is_the_pure_quantizers_file_tiled(probe_shapes, tmp_path, type_name):
    parch, f16 = probe_shapes
    built, _ = probes.ensure_probe(tmp_path, parch, type_name)
    reference = quantize.quantize_pure(f16, tmp_path / "reference.gguf", probes.PURE_FTYPES[type_name],
                                       label=type_name, imatrix=True)
    assert_same_as_quantizer(built, reference)


def test_the_dry_run_reads_a_header_only_file(tiny_cache, tmp_path):
    """The cheapest source of the recipe: a header with a hole for its data gives the types the full F16 file
    gives, and is the full file's size with the same header."""
    full = quantize.synthetic_file(tiny_cache, "tiny", 0, "F16", True)
    sparse = synthetic.write_f16(TINY, tmp_path / "header-only.gguf", seed=0, data=False)
    assert sparse.stat().st_size == full.stat().st_size and header(sparse) == header(full)
    for quant in ("IQ3_M", "Q4_K_L", "Q4_0"):
        r = quants.get(quant)
        plans = [quantize.recipe(src, r.ftype, embd_type=r.embd_type, imatrix=True) for src in (sparse, full)]
        assert plans[0] == plans[1]
        assert len(plans[0]) == len(synthetic.tensor_specs(TINY))
    assert not list(tmp_path.glob("*.dry-run"))  # a dry run writes nothing


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, _ = quantize.ensure_synthetic(tmp_path / "a", "tiny", 1, "Q4_K_M")
    b, _ = quantize.ensure_synthetic(tmp_path / "b", "tiny", 1, "Q4_K_M")
    c, _ = quantize.ensure_synthetic(tmp_path / "c", "tiny", 2, "Q4_K_M")
    assert a.read_bytes() == b.read_bytes()
    assert header(a) != header(c) and tensors(a)["blk.0.attn_q.weight"].tobytes() != \
        tensors(c)["blk.0.attn_q.weight"].tobytes()
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name or ".header" in p.name]  # nothing left behind


def test_a_type_that_needs_an_imatrix_is_refused_not_aborted():
    rows = synthetic.random_weights("blk.0.attn_q.weight", (2, 256), 0)
    with pytest.raises(SourceError, match="importance matrix"):
        tiled.quantize_rows("IQ2_XXS", rows, None)
    assert tiled.quantize_rows("IQ2_XXS", rows, np.ones(256, np.float32)).nbytes == 2 * tiled.row_bytes("IQ2_XXS", 256)

