"""What every model source hands back: a GGUF file on disk with its provenance, or one clear reason why not.

Each source (:mod:`~harness.sources.quantize` for synthetic files, :mod:`~harness.sources.hub`, and local
paths in :mod:`~harness.sources.resolve`) returns a :class:`ModelFile` or raises :class:`SourceError`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

from harness.config import default_cache_dir


class SourceError(RuntimeError):
    """A model file could not be had; the message is one line with the way out."""


class ModelFile(NamedTuple):
    quant: str  # recipe name
    path: Path  # the GGUF on disk
    weights: str  # synthetic | hub | local
    weights_ref: str  # what exactly: arch+seed, repo@commit:file, or the local path
    sha256: str  # of the file's bytes
    built_now: bool = False  # synthetic: built (not taken from the cache) by this call


def publish(tmp: Path, dst: Path) -> None:
    """Put the finished file `tmp` at `dst`: on disk first, then renamed (a killed build never leaves a file that
    looks done). On disk before it counts as built, and before anything is timed: writing back hundreds of MB
    of dirty pages during the next measurement would slow it.

    Its pages are then dropped from the page cache, so a file built now is read back as a cached one is (by
    readahead, in the kernel's large folios where it has them): mmapped straight from the pages its writes left,
    a freshly written 1B quant ran pp 3-5% slower here than the same bytes read back (Linux 6.18,
    benchmarks/tiled_vs_quantizer.py), which would charge a run's first measurement to the build."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):  # not on macOS
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    os.replace(tmp, dst)


def hash_cache_dir() -> Path:
    """Where file hashes are remembered: the harness's cache ($HARNESS_CACHE or ~/.cache/harness), never beside
    the user's own model files."""
    return default_cache_dir() / "sha256"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, remembered in the harness's cache (:func:`hash_cache_dir`) keyed by its absolute path,
    size and mtime (hashing a GB takes seconds, and every run hashes every file); nothing is written next to the
    file itself."""
    path = Path(path)
    st = path.stat()
    side = hash_cache_dir() / hashlib.sha1(str(path.resolve()).encode()).hexdigest()
    key = f"{path.resolve()} {st.st_size} {st.st_mtime_ns}"
    try:
        cached_key, digest = side.read_text().split("\n")[:2]
        if cached_key == key and len(digest) == 64:
            return digest
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    digest = h.hexdigest()
    try:
        side.parent.mkdir(parents=True, exist_ok=True)
        side.write_text(f"{key}\n{digest}\n")
    except OSError:
        pass  # an unwritable cache: fine, just slower next time
    return digest
