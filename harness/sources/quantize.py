"""llama.cpp's quantizer (the real one, and its dry run for recipes), and the synthetic model files built and cached.

A synthetic quant is built in seconds (:func:`build_tiled`): llama.cpp's quantizer runs dry over a header-only
F16 file to choose every tensor's type, and :mod:`harness.sources.tiled` writes the file with blocks llama.cpp
quantized. The real quantizer over the full F16 file of seeded values (:func:`ensure_reference`, 1-3 min a 1B
quant on 2 cores) stays as the reference they are checked against (``tests/test_tiled.py``,
``benchmarks/tiled_vs_quantizer.py``).

Cache layout (under the config's cache dir)::

    synthetic/<arch>-seed<seed>-w<writer version>/F16.gguf
    synthetic/<arch>-seed<seed>-w<writer version>/llama-cpp-python-<version>/<arch>-<quant>[-imatrix].gguf
    synthetic/<arch>-seed<seed>-w<writer version>/llama-cpp-python-<version>/reference/<same name>

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
from harness.sources import synthetic, tiled
from harness.sources.base import publish

log = logging.getLogger(__name__)

_PROGRESS_RE = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\]")
# a dry run's line per tensor: "[  12/ 147]  blk.0.attn_k.weight - [ 2048,  512, 1, 1], type =    f16, size =
# 2.000 MiB ->  0.562 MiB (q4_K)"; a tensor kept in its type ends at its size, without the parenthesis
_DRY_RE = re.compile(r"\[\s*\d+\s*/\s*\d+\]\s+(?P<name>\S+)\s+-\s+\[[^\]]*\],\s+type\s*=\s*(?P<cur>\w+),"
                     r"\s+size\s*=[^(]*(?:\((?P<new>\w+)\))?\s*$")


class QuantizeError(RuntimeError):
    pass


def llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def imatrix_covers(name: str, n_dims: int, every_matrix: bool) -> bool:
    """Whether the uniform importance matrix has an entry for tensor `name`: every block weight matrix (with
    `every_matrix`, the embedding and output too)."""
    return (every_matrix or name.startswith("blk.")) and n_dims == 2


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
        if imatrix_covers(t.name, len(t.shape), every_matrix):
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


def _params(src: Path, ftype: str, *, embd_type: str | None, pure: bool, imatrix: bool, threads: int | None,
            allow_requantize: bool = False, dry_run: bool = False):
    """llama.cpp's quantize parameters, and the arrays they point into (which must outlive the call)."""
    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = threads or os.cpu_count() or 1
    params.pure = pure
    params.allow_requantize = allow_requantize
    params.dry_run = dry_run
    if embd_type:
        t = int(gguf.GGMLQuantizationType[embd_type])
        params.token_embedding_type = t
        params.output_tensor_type = t
    keep = None
    if imatrix:
        table, keep = _imatrix_entries(src, every_matrix=pure)
        params.imatrix = table
    return params, keep


def _run(src: Path, dst: Path, label: str, params, on_line=None) -> list[str]:
    """llama_model_quantize, its log lines returned; a failure raised as one line with the log's last words."""
    import llama_cpp

    with LogCapture(on_line=on_line) as cap:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        tail = "; ".join(x.strip() for x in cap.lines[-5:] if x.strip())
        raise QuantizeError(f"llama.cpp could not quantize {src.name} to {label} (code {rc}): {tail}")
    return cap.lines


def _quantize(src: str | os.PathLike, dst: str | os.PathLike, label: str, ftype: str, *, embd_type: str | None,
              pure: bool, imatrix: bool, threads: int | None, progress: bool, allow_requantize: bool = False) -> Path:
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    params, keep = _params(src, ftype, embd_type=embd_type, pure=pure, imatrix=imatrix, threads=threads,
                           allow_requantize=allow_requantize)
    bar = tqdm(total=0, unit="tensor", desc=f"quantize {label}", disable=None if progress else True, leave=False)

    def on_line(line: str) -> None:
        m = _PROGRESS_RE.search(line)
        if m:
            bar.total = int(m[2])
            bar.n = int(m[1])
            bar.refresh()

    try:
        _run(src, tmp, label, params, on_line)
        publish(tmp, dst)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
        del keep
    return dst


def recipe(src: str | os.PathLike, ftype: str, *, embd_type: str | None = None, pure: bool = False,
           imatrix: bool = False, label: str = "") -> list[tiled.Planned]:
    """The type llama.cpp's quantizer gives each tensor of `src` for file type `ftype` (with the same parameters
    as :func:`quantize` / :func:`quantize_pure`), in the order it writes them: its dry run, which reads the
    header only (`src` may be a header-only F16 file, :func:`synthetic.write_f16` with ``data=False``)."""
    import gguf

    src = Path(src)
    params, keep = _params(src, ftype, embd_type=embd_type, pure=pure, imatrix=imatrix, threads=1, dry_run=True)
    try:
        lines = _run(src, src.with_name(src.name + ".dry-run"), label or ftype, params)  # nothing is written
    finally:
        del keep
    plan = []
    for line in lines:
        m = _DRY_RE.search(line)
        if m:
            plan.append(tiled.Planned(m["name"], gguf.GGMLQuantizationType[(m["new"] or m["cur"]).upper()].name))
    if not plan:
        raise QuantizeError(f"llama.cpp's dry run of {label or ftype} listed no tensors")
    return plan


def build_tiled(arch: synthetic.Arch, seed: int, dst: str | os.PathLike, ftype: str, *, label: str,
                embd_type: str | None = None, pure: bool = False, imatrix: bool = False,
                progress: bool = False) -> Path:
    """The synthetic quant of `arch` at `dst` in seconds: llama.cpp's recipe (:func:`recipe` over a header-only
    F16 file, deleted after) written with llama.cpp's blocks, tiled (:func:`tiled.write`). Same parameters as
    :func:`quantize` / :func:`quantize_pure`, same types and size as the file they would write."""
    import llama_cpp

    dst = Path(dst)
    src = dst.with_name(dst.name + f".header{os.getpid()}")
    try:
        synthetic.write_f16(arch, src, seed=seed, data=False)
        plan = recipe(src, ftype, embd_type=embd_type, pure=pure, imatrix=imatrix, label=label)
    finally:
        src.unlink(missing_ok=True)
    n_dims = {name: len(shape) for name, shape, _ in synthetic.tensor_specs(arch)}
    covered = {p.name for p in plan if imatrix and imatrix_covers(p.name, n_dims[p.name], pure)}
    return tiled.write(arch, seed, plan, dst, getattr(llama_cpp, ftype), covered, label=label, progress=progress)


def synthetic_dir(cache_dir: Path, arch: str, seed: int) -> Path:
    return Path(cache_dir) / "synthetic" / f"{arch}-seed{seed}-w{synthetic.WRITER_VERSION}"


def synthetic_file(cache_dir: Path, arch: str, seed: int, quant: str, imatrix: bool) -> Path:
    """Path of the cached synthetic model for `quant` (built by :func:`ensure_synthetic` if missing)."""
    d = synthetic_dir(cache_dir, arch, seed)
    if quant == "F16":
        return d / "F16.gguf"
    suffix = "-imatrix" if imatrix else ""
    return d / f"llama-cpp-python-{llama_cpp_version()}" / f"{arch}-{quant}{suffix}.gguf"


def reference_file(cache_dir: Path, arch: str, seed: int, quant: str, imatrix: bool) -> Path:
    """Path of `quant` as llama.cpp's quantizer makes it from the full F16 file (:func:`ensure_reference`)."""
    tiled_path = synthetic_file(cache_dir, arch, seed, quant, imatrix)
    return tiled_path.parent / "reference" / tiled_path.name


def ensure_synthetic(cache_dir: Path, arch: str, seed: int, quant: str, imatrix: bool = True,
                     progress: bool = False) -> tuple[Path, bool]:
    """The synthetic `quant` file, built if not cached (tiled, :func:`build_tiled`; F16: the seeded values
    themselves). Returns (path, built_now)."""
    target = synthetic_file(cache_dir, arch, seed, quant, imatrix)
    if target.exists():
        return target, False
    a = synthetic.ARCHS[arch]
    if quant == "F16":
        synthetic.write_f16(a, target, seed=seed, progress=progress)
    else:
        r = quants.get(quant)
        build_tiled(a, seed, target, r.ftype, label=f"{arch} {quant}", embd_type=r.embd_type, imatrix=imatrix,
                    progress=progress)
    return target, True


def ensure_reference(cache_dir: Path, arch: str, seed: int, quant: str, imatrix: bool = True,
                     progress: bool = False) -> tuple[Path, bool]:
    """`quant` the slow way, the reference for the tiled file: llama.cpp's quantizer over the full F16 file of
    seeded values (written first if missing). Returns (path, built_now)."""
    target = reference_file(cache_dir, arch, seed, quant, imatrix)
    if target.exists():
        return target, False
    f16, _ = ensure_synthetic(cache_dir, arch, seed, "F16", imatrix, progress=progress)
    quantize(f16, target, quant, imatrix=imatrix, progress=progress)
    return target, True
