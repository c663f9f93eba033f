"""Shared fixtures: tiny shape-faithful models built once per session as the harness builds them (llama.cpp's
recipe from its quantizer's dry run, llama.cpp's blocks tiled: harness.sources.quantize.build_tiled)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


LOOPBACK = "127.0.0.1,localhost,::1"


@pytest.fixture(scope="session", autouse=True)
def suite_environment():
    """The suite's environment, whatever the shell that runs it holds: runs and reports go where each test puts
    them, not to the user's $HARNESS_RESULTS / $HARNESS_REPORTS; the tests' servers on loopback (the fake Hub,
    RPC servers, Ray) are never reached through a proxy. $HARNESS_CACHE is kept: the user's cache is where set-up
    put llama-perplexity and the compiled shims. Subprocesses the tests start inherit it."""
    mp = pytest.MonkeyPatch()
    for k in ("HARNESS_RESULTS", "HARNESS_REPORTS"):
        mp.delenv(k, raising=False)
    for k in ("NO_PROXY", "no_proxy"):
        mp.setenv(k, ",".join(x for x in (os.environ.get(k), LOOPBACK) if x))
    yield
    mp.undo()


@pytest.fixture(scope="session", autouse=True)
def bandwidth_once():
    """The CPU's memory bandwidth, measured for real once per session (compiled STREAM, ~1.4 s here) and given
    to every run the tests make in this process, instead of measured again by each of ~20 runs: no test here
    asserts on a run's own measurement (tests/test_devices.py measures it, and replaces it where it needs to)."""
    from harness.measure import bandwidth

    real = bandwidth.measure_cpu_bandwidth_compiled
    memo: list = []

    def once(threads=None, array_mib=None, trials=10):  # the real one's defaults (test_devices checks them)
        if (threads, array_mib, trials) != (None, None, 10):
            return real(threads, array_mib, trials)
        if not memo:
            memo.append(real())
        return memo[0]

    bandwidth.measure_cpu_bandwidth_compiled = once
    yield
    bandwidth.measure_cpu_bandwidth_compiled = real


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A synthetic-model cache holding the tiny architecture's F16 file and all 12 page quants."""
    from harness.catalog import quants
    from harness.sources import quantize

    cache = tmp_path_factory.mktemp("harness-cache")
    for q in ("F16", *quants.PAGE_QUANTS):
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
