"""Shared fixtures: tiny shape-faithful models built once per session by llama.cpp's own quantizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A synthetic-model cache holding the tiny architecture's F16 file and all 12 page quants."""
    from harness.catalog import quants
    from harness.sources import quantize

    cache = tmp_path_factory.mktemp("harness-cache")
    for q in quants.PAGE_QUANTS:
        quantize.ensure_synthetic(cache, "tiny", 0, q, imatrix=True)
    return cache


@pytest.fixture(scope="session")
def tiny_file(tiny_cache):
    from harness.sources import quantize

    def get(quant: str) -> Path:
        return quantize.synthetic_file(tiny_cache, "tiny", 0, quant, True)

    return get


def run_cli(*args: str, env: dict | None = None, timeout: float = 600):
    """Run `python -m harness ...` in a subprocess, as a user would."""
    import subprocess

    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, capture_output=True, text=True,
                          env=e, timeout=timeout)
