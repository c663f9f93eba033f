"""This machine's kernel costs: the kernel probes of a few ggml types, measured here, cached per machine.

``harness estimate --device cpu`` prices a file's kernels with the probes' seconds per weight
(:func:`harness.analysis.points.kernel_seconds`). A calibration carries the costs of the CPU it was made on, and
one CPU's kernels are not another's, so this module measures the costs on the CPU it runs on. Measuring is the
sweep's own: the probe models of :mod:`harness.sources.probes` (both layer counts of the config defaults'
``probes:`` block), each measured in a child process by the runner's probe protocol
(:meth:`harness.measure.runner.Runner._probe`), the records turned into costs by
:func:`harness.analysis.kernels.costs`.

The result is cached in ``<cache dir>/kernel-costs.json``, one entry per key: the machine's fingerprint
(:mod:`harness.measure.fingerprint`), llama-cpp-python version, threads, layer shape and the probe test's
settings. A type already in the entry is returned from it; only the missing types are measured. The records
themselves are appended to ``<cache dir>/kernel-costs/records.jsonl`` (the JSON file is a view of them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from harness import config as config_mod
from harness.measure import env as env_mod
from harness.measure import fingerprint
from harness.sources import probes, synthetic
from harness.sources.synthetic import Arch

log = logging.getLogger(__name__)

CACHE_NAME = "kernel-costs.json"  # under the cache dir: {key: {"key": {...}, "types": {type: {...}}}}
RECORDS_DIR = "kernel-costs"  # under the cache dir: the probe records (records.jsonl) and the children's logs
CACHE_VERSION = 2  # bumped when an entry's content changes meaning: older entries are then not used

# A file's kernel seconds from these costs is the calibration's own sum, harness.analysis.points.kernel_seconds
# (weights in each type x its cost), which takes kernel_costs' result as it is.


class ProbeHereError(probes.ProbeError):
    """A type or shape that has no probe, or a probe that failed to build or measure: one line."""


def _one_line(msg: str) -> str:
    return "; ".join(x.strip() for x in str(msg).splitlines() if x.strip())


def _probe_types(types: Iterable[str]) -> list[str]:
    """`types` upper-cased, deduplicated, in order, without the unprobed F32; an unknown type raises."""
    out: list[str] = []
    for t in types:
        name = str(t).strip().upper()
        if name in probes.UNPROBED or name in out:
            continue
        if name not in probes.PURE_FTYPES:
            near = difflib.get_close_matches(name, probes.PURE_FTYPES, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise ProbeHereError(f"no kernel probe for ggml type {t!r}: {hint}probes exist for "
                                 f"{', '.join(probes.PURE_FTYPES)}")
        out.append(name)
    return out


def _shape(shape: Arch | str | None) -> Arch:
    if shape is None:
        return synthetic.ARCHS[config_mod.ModelSpec().architecture]
    if isinstance(shape, str):
        if shape not in synthetic.ARCHS:
            raise ProbeHereError(f"unknown shape {shape!r}: known are {', '.join(synthetic.ARCHS)} "
                                 "(or pass a harness.sources.synthetic.Arch)")
        return synthetic.ARCHS[shape]
    return shape


def _config(threads: int, cache_dir: Path) -> config_mod.Config:
    """The sweep's defaults, measured on the CPU (n_gpu_layers 0: a GPU build still prices the CPU's kernels),
    in one pass of every repetition."""
    bench = dataclasses.replace(config_mod.BenchSpec(), threads=threads, rounds=1, n_gpu_layers=0)
    return config_mod.Config(name="kernel-costs", bench=bench, cache_dir=str(cache_dir))


def _llama_cpp_python_version() -> str:
    """llama-cpp-python's version without loading its library where it is not loaded yet (a cached answer
    stays in milliseconds)."""
    mod = sys.modules.get("llama_cpp")
    if mod is not None:
        return mod.__version__
    from importlib import metadata

    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        from harness.sources import quantize

        return quantize.llama_cpp_version()


def cache_key(shape: Arch, cfg: config_mod.Config) -> dict[str, Any]:
    """What makes two probe measurements comparable: this machine (its fingerprint's identity, not the CPU's name,
    which hypervisors share among many processors), the llama.cpp build, the threads, the layer shape and the
    probe test's settings."""
    b, p = cfg.bench, cfg.probes
    fp = fingerprint.collect(build="")  # the build is keyed by its version below, without loading the library
    return {
        "cpu": fp["model_name"], "machine": fp["id"], "llama_cpp_python": _llama_cpp_python_version(),
        "threads": b.threads,
        "shape": f"e{shape.n_embd}-f{shape.n_ff}-h{shape.n_head}-kv{shape.n_head_kv}",
        "probe_layers": f"{p.n_layer}/{p.base_n_layer}", "n_gen": p.n_gen, "repetitions": p.repetitions,
        "warmup": b.warmup, "flash_attn": b.flash_attn, "n_batch": b.n_batch, "n_ubatch": b.n_ubatch,
        "seed": b.seed, "n_gpu_layers": b.n_gpu_layers, "mmap": b.mmap, "version": CACHE_VERSION,
    }


def _key_text(key: dict[str, Any]) -> str:
    return "; ".join(f"{k}={v}" for k, v in key.items())


def cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache file: ``kernel-costs.json`` in `cache_dir`, else in the harness's cache ($HARNESS_CACHE)."""
    return (Path(cache_dir).expanduser() if cache_dir else config_mod.default_cache_dir()) / CACHE_NAME


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # a damaged cache is measured again, not trusted
        log.warning("ignoring the kernel-cost cache %s: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold `path`'s lock file: two processes adding types at once must not drop each other's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _store(path: Path, key: dict[str, Any], found: dict[str, dict]) -> None:
    """Add `found` ({type: {"costs": ..., "utc": [...]}}) to the entry of `key`, atomically."""
    with _locked(path):
        data = _read(path)
        entry = data.setdefault(_key_text(key), {"key": key, "types": {}})
        entry["types"].update(found)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)


class _Records:
    """The writer the runner's probe code writes to: each record kept here and appended to the JSONL."""

    def __init__(self, writer):
        self.records: list = []
        self._writer = writer

    def write(self, rec) -> None:
        self.records.append(rec)
        self._writer.write(rec)


def probe_records(t: str, shape: Arch, cfg: config_mod.Config, progress: bool = True) -> list:
    """The kernel probes of ggml type `t` in `shape`'s layers, built if not cached and measured now, as a sweep
    measures them (:meth:`Runner._probe`: both layer counts, every repetition, each in a child process); their
    records (schema.Record; error records where a probe failed)."""
    from harness import schema
    from harness.measure import runner

    folder = cfg.resolved_cache_dir / RECORDS_DIR
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    echo = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    r = runner.Runner(cfg, folder, progress=progress, echo=echo)
    with schema.RecordWriter(folder / "records.jsonl") as writer:
        out = _Records(writer)
        r._probe(out, "[kernel costs]", t, shape, set())
    return out.records


def kernel_costs(types: Iterable[str], shape: Arch | str | None = None, threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None, progress: bool = True, fresh: bool = False
                 ) -> dict[str, dict]:
    """This machine's probe cost per weight for each ggml type in `types` (e.g. ["Q4_K", "Q6_K"]), for the layer
    shape `shape` (an Arch or a name of synthetic.ARCHS; default Llama 3.2 1B's), in kernels.costs' format:
    {type: {"s_per_weight", "tok_s", "n", "n_weights", "spread", "method", ...}}.

    `threads`: llama.cpp's threads (default: the physical cores, as a run's). `cache_dir`: where the probe models
    and the cache file are (default: $HARNESS_CACHE, else ~/.cache/harness). Types already in the cache for this
    machine, build, threads, shape and probe settings are returned from it without measuring; the others are
    built and measured (about 40 s a type for the 1B's shape on 2 cores), each added to the cache as it is
    done; `fresh`: every type measured now, cached or not (the cache then holds the new figure). F32 (norms,
    never probed) is left out. A progress line per probe on stderr with `progress`; nothing on
    stdout. ProbeHereError: a type with no probe, or a probe that failed."""
    wanted = _probe_types(types)
    arch = _shape(shape)
    if threads is None:
        threads = env_mod.default_threads()
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ProbeHereError(f"threads must be a positive integer, not {threads!r}")
    cfg = _config(threads, cache_path(cache_dir).parent)
    key = cache_key(arch, cfg)
    path = cache_path(cache_dir)
    cached = (_read(path).get(_key_text(key)) or {}).get("types", {})
    todo = list(wanted) if fresh else [t for t in wanted if t not in cached]
    if todo and progress:
        print(f"kernel probes of {', '.join(todo)} on this CPU ({key['cpu']}, machine {key['machine']}, "
              f"threads {threads}, {key['shape']}): building and measuring; cached in {path}", file=sys.stderr,
              flush=True)
    for t in todo:
        found = {t: _measure(t, arch, cfg, progress)}
        _store(path, key, found)  # each type as it is done: an interrupted call keeps the finished ones
        cached = {**cached, **found}
    return {t: cached[t]["costs"] for t in wanted}


def _measure(t: str, arch: Arch, cfg: config_mod.Config, progress: bool) -> dict[str, Any]:
    """Type `t`'s cache item: {"costs": its kernels.costs row, "utc": its records' times}."""
    from harness.analysis import kernels, summary

    recs = probe_records(t, arch, cfg, progress=progress)
    failed = next((r for r in recs if r.status != "ok"), None)
    if failed is not None:
        raise ProbeHereError(_one_line(f"kernel probe {failed.quant}: {failed.error}"))
    row = kernels.costs(summary.records_frame(recs)).get(t)
    if row is None or not (math.isfinite(row["s_per_weight"]) and row["s_per_weight"] > 0):
        raise ProbeHereError(f"kernel probe {t}: its {len(recs)} records give no positive cost per weight")
    return {"costs": row, "utc": sorted(r.utc for r in recs if r.utc)}


def measured_at(types: Iterable[str], shape: Arch | str | None = None, threads: int | None = None,
                cache_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """The UTC times of the cached records of `types` ({type: [utc, ...]}; a type not cached is left out)."""
    arch = _shape(shape)
    threads = env_mod.default_threads() if threads is None else threads
    path = cache_path(cache_dir)
    key = cache_key(arch, _config(threads, path.parent))
    cached = (_read(path).get(_key_text(key)) or {}).get("types", {})
    return {t: cached[t]["utc"] for t in _probe_types(types) if t in cached}
