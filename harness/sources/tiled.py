"""Write a quantized GGUF whose every block llama.cpp made, without quantizing the whole model.

Speed and memory depend on each tensor's shape, type and bytes, not on the values in it, so a synthetic quant
need not pay for llama.cpp's quantizer over 1.24 B seeded random weights (1-3 min a quant on 2 cores). Given
the types llama.cpp's quantizer chooses (its dry run, :func:`harness.sources.quantize.recipe`), each matrix
here gets its first :data:`TILE_ROWS` rows of seeded values (the F16 file's own, :mod:`harness.sources.synthetic`)
quantized by llama.cpp's ``ggml_quantize_chunk``, the call its quantizer makes for every chunk of rows; its
other rows are tiled from those rows' blocks, drawn at random (:func:`_write_rows` says why not whole rows);
norms and rope factors get their real values. Every block is therefore one llama.cpp wrote (finite scales, no
NaN, grids its IQ kernels know), the first rows are byte for byte what the quantizer writes, and the header
(keys, tensor order, types, offsets) is laid out as the quantizer lays it out, so the file's size is the
quantizer's to the byte (``tests/test_tiled.py``).

The file is written under a temporary name, fsync'd and renamed into place, so a killed build never leaves a
file that looks done.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from harness.sources import synthetic
from harness.sources.base import SourceError, publish
from harness.sources.synthetic import Arch

TILE_ROWS = 32  # rows quantized per matrix: every row of a 1B tensor's ~8k-wide rows in well under a second
_WRITE_CHUNK = 8 << 20  # bytes per write() of a tiled tensor
GGML_QNT_VERSION = 2  # ggml.h's: what llama.cpp's quantizer writes as general.quantization_version
# How a record's weights_ref says its file was built here (files quantized whole by llama.cpp's quantizer, as
# before writer version 3, carry no such word).
WEIGHTS_REF = "blocks=tiled"


class Planned(NamedTuple):
    name: str  # tensor name
    type_name: str  # the ggml type llama.cpp's quantizer chose for it ("Q4_K", "F32", ...)


_lib = None


def ggml():
    """ggml's quantization entry points, resolved through the libllama llama-cpp-python loaded (its symbol
    lookup reaches the libggml-base it links: the same copy that llama.cpp's own quantizer calls)."""
    global _lib
    if _lib is not None:
        return _lib
    import llama_cpp

    lib = llama_cpp.llama_cpp._lib
    i64, vp, sz = ctypes.c_int64, ctypes.c_void_p, ctypes.c_size_t
    for name, res, args in (
        ("ggml_quantize_chunk", sz, [ctypes.c_int, vp, vp, i64, i64, i64, vp]),
        ("ggml_quantize_requires_imatrix", ctypes.c_bool, [ctypes.c_int]),
        ("ggml_row_size", sz, [ctypes.c_int, i64]),
    ):
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    _lib = lib
    return lib


def row_bytes(type_name: str, n_per_row: int) -> int:
    import gguf

    return int(ggml().ggml_row_size(int(gguf.GGMLQuantizationType[type_name]), n_per_row))


def quantize_rows(type_name: str, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """`rows` (float32, one row per line) quantized to `type_name` by ggml_quantize_chunk: the bytes, uint8."""
    import gguf

    t = int(gguf.GGMLQuantizationType[type_name])
    lib = ggml()
    if imatrix is None and lib.ggml_quantize_requires_imatrix(t):
        # ggml aborts the process on this; llama.cpp's quantizer refuses it with an error instead
        raise SourceError(f"{type_name} needs an importance matrix: build with imatrix")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = rows.shape
    out = np.empty(n_rows * row_bytes(type_name, n_per_row), dtype=np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    got = lib.ggml_quantize_chunk(t, rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row,
                                  None if im is None else im.ctypes.data)
    if got != out.nbytes:
        raise SourceError(f"ggml_quantize_chunk wrote {got} bytes of {type_name}, not {out.nbytes}")
    return out


def first_rows(arch: Arch, seed: int, name: str, shape: tuple[int, ...], type_name: str,
               imatrix: bool) -> np.ndarray:
    """Tensor `name`'s first rows as llama.cpp's quantizer writes them (uint8, one row of bytes per line): a
    matrix's first TILE_ROWS rows quantized from the F16 file's values (`imatrix`: with the uniform importance
    matrix the quantizer gives this tensor), a norm's or the rope factors' real values whole (one row)."""
    fixed = synthetic.fixed_values(name, shape, arch)
    if fixed is not None:
        if type_name != "F32":
            raise SourceError(f"{name}: llama.cpp chose {type_name}, the writer knows F32 for it")
        return fixed.view(np.uint8).reshape(1, -1)
    n_rows = min(TILE_ROWS, shape[0])
    # through float16 and back: the values llama.cpp's quantizer reads from the F16 file
    values = synthetic.random_weights(name, (n_rows, shape[-1]), seed).astype(np.float16).astype(np.float32)
    rows = quantize_rows(type_name, values, np.ones(shape[-1], dtype=np.float32) if imatrix else None)
    return rows.reshape(n_rows, -1)


def _n_rows(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[:-1], dtype=np.int64))  # 1 for a vector


def _unit_bytes(type_name: str, row_bytes: int) -> int:
    """Bytes of the smallest piece of a row llama.cpp quantizes on its own: a block (K- and IQ-quants: 256
    values, its scales inside), for a float type 32 values (converted one by one)."""
    import gguf

    blck, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    unit = size * (32 if blck == 1 else 1)
    return unit if row_bytes % unit == 0 else size


def _write_rows(f, first: np.ndarray, n_rows: int, type_name: str, rng: np.random.Generator, bar) -> None:
    """`first` (rows of bytes: the quantizer's own first rows), then the tensor's other rows, each made of
    `first`'s blocks drawn at random (seeded), a few MB per write.

    Blocks, not whole rows: rows repeated with a short period would make a degenerate model (a 1B's 128k-token
    embedding with 32 distinct rows, every attention head the same), whose activations, and with them the
    data-dependent parts of a forward pass (the softmax's exponentials, flash attention's running maximum),
    differ from a real quantization's. Each block quantizes its own values with its own scales (the uniform
    importance matrix, or none, is the same at every position), so a block moved to another place in a row is
    what llama.cpp writes for those values there: every block in the file is still one llama.cpp wrote.
    """
    f.write(first.tobytes())
    bar.update(first.nbytes)
    row = first.shape[1]
    unit = _unit_bytes(type_name, row)
    pool = np.ascontiguousarray(first).view(np.dtype((np.void, unit))).reshape(-1)
    step = max(1, _WRITE_CHUNK // row)
    for start in range(len(first), n_rows, step):
        picks = pool[rng.integers(0, len(pool), size=min(step, n_rows - start) * (row // unit))]
        f.write(picks.tobytes())
        bar.update(picks.nbytes)


def write(arch: Arch, seed: int, plan: list[Planned], dst: str | os.PathLike, file_type: int,
          imatrix_names: set[str], *, label: str, progress: bool = False) -> Path:
    """Write the quant of `arch` with llama.cpp's `plan` (tensor order and types) at `dst`, atomically.
    `file_type`: the llama_ftype for ``general.file_type``; `imatrix_names`: the tensors the quantizer gets a
    (uniform) importance matrix for."""
    import gguf
    from tqdm import tqdm

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shapes = {name: shape for name, shape, _ in synthetic.tensor_specs(arch)}
    if sorted(p.name for p in plan) != sorted(shapes):
        raise SourceError(f"llama.cpp's recipe for {label} names other tensors than {arch.name} has")
    sizes = [_n_rows(shapes[p.name]) * row_bytes(p.type_name, shapes[p.name][-1]) for p in plan]
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    w = gguf.GGUFWriter(tmp, arch="llama")
    synthetic.add_metadata(w, arch, seed)
    w.add_quantization_version(GGML_QNT_VERSION)  # appended in this order by llama.cpp's quantizer
    w.add_file_type(file_type)
    for p, nbytes in zip(plan, sizes):
        w.add_tensor_info(p.name, shapes[p.name], np.dtype(np.float32), nbytes,
                          raw_dtype=gguf.GGMLQuantizationType[p.type_name])
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        f = w.fout[0]
        with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"build {label}",
                  disable=None if progress else True, leave=False) as bar:
            for p in plan:
                w.write_padding(f, f.tell())
                shape = shapes[p.name]
                first = first_rows(arch, seed, p.name, shape, p.type_name, p.name in imatrix_names)
                _write_rows(f, first, _n_rows(shape), p.type_name,
                            synthetic.stream(p.name, seed, 1), bar)
            w.write_padding(f, f.tell())
        w.close()
        publish(tmp, dst)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return dst
