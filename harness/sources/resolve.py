"""Model sources: turn (config, quant) into a GGUF file on disk, or one clear reason why not.

- ``synthetic``: built locally, shape-faithful, seeded random weights, llama.cpp's recipe and blocks, tiled
  (:mod:`harness.sources.quantize`);
- ``hub``: downloaded from the Hugging Face Hub, sha256-verified (:mod:`harness.sources.hub`);
- ``local``: a file the user already has (``path`` pattern with ``{quant}``).
"""

from __future__ import annotations

from pathlib import Path

from harness.config import Config
from harness.sources.base import ModelFile, SourceError, sha256_file


def synthetic_ref(cfg: Config) -> str:
    from harness.sources import tiled

    m = cfg.model
    return f"{m.architecture} seed={m.seed} imatrix={'uniform' if m.imatrix else 'none'} {tiled.WEIGHTS_REF}"


def resolve(cfg: Config, quant: str, progress: bool = False) -> ModelFile:
    m = cfg.model
    if m.source == "synthetic":
        from harness.sources import quantize

        path, built = quantize.ensure_synthetic(cfg.resolved_cache_dir, m.architecture, m.seed, quant,
                                                imatrix=m.imatrix, progress=progress)
        return ModelFile(quant, path, "synthetic", synthetic_ref(cfg), sha256_file(path), built)
    if m.source == "local" and m.files:
        if quant not in m.files:
            raise SourceError(f"{quant}: not one of model.files ({', '.join(m.files)})")
        path = Path(m.files[quant]).expanduser()
        if not path.is_file():
            raise SourceError(f"{quant}: local file {str(path)!r} not found")
        return ModelFile(quant, path, "local", str(path), sha256_file(path))
    if m.source == "local":
        path = Path(m.path.format(quant=quant)).expanduser()
        if not path.is_file():
            raise SourceError(f"{quant}: local file {str(path)!r} not found (model.path pattern {m.path!r})")
        return ModelFile(quant, path, "local", str(path), sha256_file(path))
    if m.source == "hub":
        from harness.sources import hub

        return hub.fetch(m, quant, progress=progress)
    raise SourceError(f"unknown source {m.source!r}")
