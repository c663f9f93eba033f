"""Model sources: turn (config, quant) into a GGUF file on disk, or one clear reason why not.

- ``synthetic``: built locally, shape-faithful, seeded random weights (:mod:`harness.quantize`);
- ``hub``: downloaded from the Hugging Face Hub, sha256-verified (:mod:`harness.hub`);
- ``local``: a file the user already has (``path`` pattern with ``{quant}``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

from harness.config import Config


class SourceError(RuntimeError):
    """A model file could not be had; the message is one line with the way out."""


class ModelFile(NamedTuple):
    quant: str  # recipe name
    path: Path  # the GGUF on disk
    weights: str  # synthetic | hub | local
    weights_ref: str  # what exactly: arch+seed, repo@commit:file, or the local path
    sha256: str  # of the file's bytes
    built_now: bool = False  # synthetic: built (not taken from the cache) by this call


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, cached beside it in '<file>.sha256' keyed by size and mtime (hashing a GB takes
    seconds, and every run hashes every file)."""
    path = Path(path)
    st = path.stat()
    side = path.with_name(path.name + ".sha256")
    key = f"{st.st_size} {st.st_mtime_ns}"
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
        side.write_text(f"{key}\n{digest}\n")
    except OSError:
        pass  # read-only location: fine, just slower next time
    return digest


def synthetic_ref(cfg: Config) -> str:
    m = cfg.model
    return f"{m.architecture} seed={m.seed} imatrix={'uniform' if m.imatrix else 'none'}"


def resolve(cfg: Config, quant: str, progress: bool = False) -> ModelFile:
    m = cfg.model
    if m.source == "synthetic":
        from harness import quantize

        path, built = quantize.ensure_synthetic(cfg.resolved_cache_dir, m.architecture, m.seed, quant,
                                                imatrix=m.imatrix, progress=progress)
        return ModelFile(quant, path, "synthetic", synthetic_ref(cfg), sha256_file(path), built)
    if m.source == "local":
        path = Path(m.path.format(quant=quant)).expanduser()
        if not path.is_file():
            raise SourceError(f"{quant}: local file {str(path)!r} not found (model.path pattern {m.path!r})")
        return ModelFile(quant, path, "local", str(path), sha256_file(path))
    if m.source == "hub":
        from harness import hub

        return hub.fetch(m, quant, progress=progress)
    raise SourceError(f"unknown source {m.source!r}")
