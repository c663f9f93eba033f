"""Quantize a GGUF with llama.cpp's own quantizer, and build/cache the synthetic model files.

Cache layout (under the config's cache dir)::

    synthetic/<arch>-seed<seed>-w<writer version>/F16.gguf
    synthetic/<arch>-seed<seed>-w<writer version>/llama-cpp-python-<version>/<arch>-<quant>[-imatrix].gguf

so a new llama.cpp (whose recipes may change) or a new writer never reuses a stale file. Every file is
written under a temporary name and renamed into place, so a killed build never leaves a file that looks done.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from pathlib import Path

from harness.catalog import quants
from harness.llamalog import LogCapture
from harness.sources import synthetic

log = logging.getLogger(__name__)

_PROGRESS_RE = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\]")


class QuantizeError(RuntimeError):
    pass


def llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def _imatrix_entries(src: Path, every_matrix: bool = False):
    """A uniform importance matrix (all ones) for every block weight matrix of `src` (`every_matrix`: the
    embedding and output too, which a pure IQ1/IQ2 quantization also needs).

    The Hub's quants (bartowski's among them) are made with an imatrix, and llama.cpp picks some tensor types
    differently when one is given (IQ4_XS, Q4_0 and the IQ3 recipes). Uniform weights keep the values'
    quantization as without one while the recipe's type choices match the Hub's files.
    """
    import llama_cpp
    import numpy as np

    from harness.gguf import validate

    keep = []  # the arrays must outlive the quantize call
    entries = []
    for t in validate.check(src, expect_arch=None).tensors:
        if (every_matrix or t.name.startswith("blk.")) and len(t.shape) == 2:
            ne0 = int(t.shape[0])
            arr = np.ones(ne0, dtype=np.float32)
            keep.append(arr)
            name = t.name.encode()
            keep.append(name)
            entries.append((name, arr))
    table = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
    for i, (name, arr) in enumerate(entries):
        table[i].name = name
        table[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        table[i].size = arr.size
    table[len(entries)].name = None  # terminator
    return table, keep


def quantize(src: str | os.PathLike, dst: str | os.PathLike, quant: str, *, imatrix: bool = False,
             threads: int | None = None, progress: bool = False, allow_requantize: bool = False) -> Path:
    """Quantize `src` (F16/F32 GGUF) to recipe `quant` at `dst`, atomically. `allow_requantize`: `src` may itself
    be quantized (llama.cpp dequantizes it first)."""
    recipe = quants.get(quant)
    return _quantize(src, dst, quant, recipe.ftype, embd_type=recipe.embd_type, pure=False, imatrix=imatrix,
                     threads=threads, progress=progress, allow_requantize=allow_requantize)


def dequantize(src: str | os.PathLike, dst: str | os.PathLike, *, threads: int | None = None) -> Path:
    """A quantized GGUF written back as F16 by llama.cpp's quantizer (allow_requantize): a reference of the same
    architecture and vocabulary for the quality test, holding the source's values (not the original model's)."""
    return _quantize(src, dst, "F16", "LLAMA_FTYPE_MOSTLY_F16", embd_type=None, pure=False, imatrix=False,
                     threads=threads, progress=False, allow_requantize=True)


def quantize_pure(src: str | os.PathLike, dst: str | os.PathLike, ftype: str, *, label: str, imatrix: bool = False,
                  threads: int | None = None, progress: bool = False) -> Path:
    """Quantize every matrix of `src` to the base type of llama.cpp file type `ftype` (no per-tensor recipe
    rules: llama.cpp's ``pure``), at `dst`, atomically. `label` names the job in messages."""
    return _quantize(src, dst, label, ftype, embd_type=None, pure=True, imatrix=imatrix, threads=threads,
                     progress=progress)


def _quantize(src: str | os.PathLike, dst: str | os.PathLike, label: str, ftype: str, *, embd_type: str | None,
              pure: bool, imatrix: bool, threads: int | None, progress: bool, allow_requantize: bool = False) -> Path:
    import gguf
    import llama_cpp
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = threads or os.cpu_count() or 1
    params.pure = pure
    params.allow_requantize = allow_requantize
    if embd_type:
        t = int(gguf.GGMLQuantizationType[embd_type])
        params.token_embedding_type = t
        params.output_tensor_type = t
    keep = None
    if imatrix:
        table, keep = _imatrix_entries(src, every_matrix=pure)
        params.imatrix = table

    bar = tqdm(total=0, unit="tensor", desc=f"quantize {label}", disable=None if progress else True, leave=False)

    def on_line(line: str) -> None:
        m = _PROGRESS_RE.search(line)
        if m:
            bar.total = int(m[2])
            bar.n = int(m[1])
            bar.refresh()

    try:
        with LogCapture(on_line=on_line) as cap:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            tail = "; ".join(x.strip() for x in cap.lines[-5:] if x.strip())
            raise QuantizeError(f"llama.cpp could not quantize {src.name} to {label} (code {rc}): {tail}")
        # On disk before it counts as built, and before anything is timed: writing back hundreds of MB of
        # dirty pages during the next measurement would slow it.
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dst)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
        del keep
    return dst


def synthetic_dir(cache_dir: Path, arch: str, seed: int) -> Path:
    return Path(cache_dir) / "synthetic" / f"{arch}-seed{seed}-w{synthetic.WRITER_VERSION}"


def synthetic_file(cache_dir: Path, arch: str, seed: int, quant: str, imatrix: bool) -> Path:
    """Path of the cached synthetic model for `quant` (built by :func:`ensure_synthetic` if missing)."""
    d = synthetic_dir(cache_dir, arch, seed)
    if quant == "F16":
        return d / "F16.gguf"
    suffix = "-imatrix" if imatrix else ""
    return d / f"llama-cpp-python-{llama_cpp_version()}" / f"{arch}-{quant}{suffix}.gguf"


def ensure_synthetic(cache_dir: Path, arch: str, seed: int, quant: str, imatrix: bool = True,
                     progress: bool = False) -> tuple[Path, bool]:
    """The synthetic `quant` file, built (F16 first) if not cached. Returns (path, built_now)."""
    target = synthetic_file(cache_dir, arch, seed, quant, imatrix)
    if target.exists():
        return target, False
    f16 = synthetic_file(cache_dir, arch, seed, "F16", imatrix)
    if not f16.exists():
        synthetic.write_f16(synthetic.ARCHS[arch], f16, seed=seed, progress=progress)
    if quant != "F16":
        quantize(f16, target, quant, imatrix=imatrix, progress=progress)
    return target, True
