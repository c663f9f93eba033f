"""The sweep: config -> model files -> one child process per file -> records.jsonl.

Each model file is measured in its own child process (:mod:`harness.measure.worker`) under a time limit, so a crash,
a hang or an out-of-memory in llama.cpp becomes that quant's error record and the sweep goes on. Records are
written by this process as they arrive, flushed and fsynced, so a killed run keeps every finished
measurement, and ``--resume`` measures only the cells that are missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import config as config_mod
from harness import schema
from harness.catalog import page
from harness.config import Config
from harness.gguf import validate
from harness.measure import batched, devices, worker
from harness.measure import env as env_mod
from harness.measure.bench import MemCell, mem_cells, tests_for
from harness.measure.child import Bar, ChildResult, measure_in_child
from harness.sources import probes, quantize
from harness.sources.base import ModelFile, SourceError, sha256_file
from harness.sources.resolve import resolve as resolve_source

log = logging.getLogger(__name__)



def default_results() -> Path:
    return config_mod.output_dir("results")


class RunError(RuntimeError):
    """The run cannot start or go on (unwritable folder, no disk, bad resume folder): one clear line."""


def new_run_dir(base: Path, name: str) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = base / f"{stamp}-{name}"
    n = 1
    while run_dir.exists():  # never overwrite a run
        n += 1
        run_dir = base / f"{stamp}-{name}-{n}"
    return run_dir


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except FileExistsError:  # mkdir's "File exists" for a file where the folder should be reads as nonsense
        raise RunError(f"cannot write to {folder}: it exists and is not a folder") from None
    except OSError as e:
        raise RunError(f"cannot write to {folder}: {e.strerror or e}") from None


def _expected_synthetic_bytes(cfg: Config, todo: list[str]) -> int:
    """Disk needed to build what the synthetic cache lacks (a bound: 8.5 bits/weight for unknown recipes)."""
    from harness.sources import synthetic

    arch = synthetic.ARCHS[cfg.model.architecture]
    n = arch.n_params()
    need = 0
    cache = cfg.resolved_cache_dir
    for q in todo:  # each quant built on its own (tiled: no F16 file first)
        if not quantize.synthetic_file(cache, arch.name, cfg.model.seed, q, cfg.model.imatrix).exists():
            bits = page.BY_QUANT[q].bits if q in page.BY_QUANT else 8.5
            need += int(n * (bits + 1.0) / 8)  # +1 bit: the page's bits run low (its column is not the truth)
    if probes_wanted(cfg) and todo:
        for n_layer in (cfg.probes.n_layer, cfg.probes.base_n_layer):
            if not n_layer:
                continue
            parch = probes.probe_arch(arch, n_layer)
            if not quantize.synthetic_dir(cache, parch.name, probes.SEED).exists():
                # as a bound, 9 types (the page's quants use 9) at Q8_0's 8.5 bits
                need += int(parch.n_params() * 9 * 8.5 / 8)
    return need


def check_disk(cfg: Config, todo: list[str]) -> None:
    if cfg.model.source != "synthetic":
        return
    need = _expected_synthetic_bytes(cfg, todo)
    if not need:
        return
    cache = cfg.resolved_cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if free < need * 1.1:
        raise RunError(
            f"not enough disk in {cache} to build the synthetic models: need about {need / 1e9:.1f} GB, "
            f"{free / 1e9:.1f} GB free (set cache_dir or HARNESS_CACHE to a bigger disk, or run fewer quants)"
        )


def done_cells(records: list[schema.Record]) -> set[tuple[str, str, int, int]]:
    """(quant, test, depth, rep) cells measured ok in earlier records (probe records: quant = ggml type)."""
    return {(r.quant, r.test, r.n_depth, r.rep) for r in records if r.status == "ok"}


def all_cells(cfg: Config, bench: dict[str, Any]) -> list[tuple[str, str, int, int]]:
    return [(q, t.kind, t.n_depth, rep) for q in cfg.quants for t in tests_for(bench)
            for rep in range(bench["repetitions"])]


def _layers(shape) -> tuple[int, int, int, int]:
    """A model's layer shape, what its kernel probes are built of: (n_embd, n_ff, n_head, n_head_kv)."""
    return shape.n_embd, shape.n_ff, shape.n_head, shape.n_head_kv


def probe_bench(cfg: Config, bench: dict[str, Any]) -> dict[str, Any]:
    """The probes' test: the run's settings, tg only, at depth 0."""
    p = cfg.probes
    return {**bench, "n_prompt": 0, "n_gen": p.n_gen, "depths": [0], "repetitions": p.repetitions, "contexts": []}


def visit_reps(repetitions: int, rounds: int, visit: int) -> list[int]:
    """The repetition indices measured at visit `visit` (0-based) of `rounds`: consecutive shares, the first
    visits taking one more where they do not divide evenly (5 over 2: [0, 1, 2], [3, 4])."""
    base, extra = divmod(repetitions, rounds)
    start = visit * base + min(visit, extra)
    return list(range(start, start + base + (visit < extra)))


def visit_order(quants: tuple[str, ...] | list[str], seed: int, rnd: int, shuffle: bool = True) -> list[str]:
    """The order in which round `rnd` (0-based) visits the quants: a new seeded shuffle each round (a slow spell
    of a shared machine, or a drift through the run, then falls on different quants each round instead of
    always on the same end of the list); the config's order where shuffling is off. Deterministic, so a resumed
    run visits in the same order."""
    order = list(quants)
    if shuffle:
        random.Random(f"quants-{seed}-{rnd}").shuffle(order)
    return order


def probes_wanted(cfg: Config) -> bool:
    return cfg.probes.enabled and cfg.bench.n_gen > 0


def resolved_bench(cfg: Config) -> dict[str, Any]:
    b = dict(config_mod.dataclasses.asdict(cfg.bench))
    b["depths"] = list(b["depths"])
    if b["threads"] is None:
        b["threads"] = env_mod.default_threads()
    if b["rounds"] is None:
        b["rounds"] = default_rounds(b["repetitions"], b["n_gpu_layers"])
    return b


def default_rounds(repetitions: int, n_gpu_layers: int) -> int:
    """3 passes on a CPU (a shared machine's slow spells and drift then fall on several quants), 1 where the
    weights go to a GPU (the build has a GPU back end with a device: not a driver alone, not RPC, which every
    build has); never more than the repetitions."""
    gpu = False
    if n_gpu_layers != 0:
        try:
            gpu = bool(devices.gpu_backends())
        except (ImportError, devices.DeviceError):
            gpu = False
    return 1 if gpu else min(3, repetitions)


class Runner:
    def __init__(self, cfg: Config, run_dir: Path, progress: bool = True, echo: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.progress = progress
        self.echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
        self.bench = resolved_bench(cfg)
        self.run_id = run_dir.name
        self.errors: dict[str, str] = {}
        self.probed: set[tuple[str, str, int]] = set()  # (probe shape, ggml type, round) measured or tried
        self.probe_errors: set[tuple[str, str]] = set()  # (probe shape, ggml type) that failed: not tried again
        self.side_writers: dict[str, schema.RecordWriter] = {}  # mem: contexts.jsonl; batched: batched.jsonl
        self.visit: dict | None = None  # the visit being measured (round, position, order), into each record
        self.no_probe_archs: set[str | None] = set()  # architectures already said to have no probes
        self.side_done: set[tuple] = set()  # (quant, *key) of memory-test contexts and batched cells recorded
        self.resolved: dict[str, ModelFile] = {}  # the files got so far, by label (the quality test reuses them)

    def _error_record(self, quant: str, error: str, mf: ModelFile | None) -> schema.Record:
        return schema.make(
            run_id=self.run_id, utc=_utc(), status="error", error=error, quant=quant,
            weights=mf.weights if mf else self.cfg.model.source, weights_ref=mf.weights_ref if mf else None,
            file_path=str(mf.path) if mf else None,
            file_bytes=mf.path.stat().st_size if mf and mf.path.exists() else None,
            file_sha256=mf.sha256 if mf else None, llama_cpp_version=quantize.llama_cpp_version(),
            n_threads=self.bench["threads"], n_gpu_layers=self.bench["n_gpu_layers"],
            flash_attn=self.bench["flash_attn"],
        )

    def run(self, writer: schema.RecordWriter, done: set[tuple[str, str, int, int]],
            probe_writer: schema.RecordWriter | None = None, probes_done: set | None = None,
            known_files: dict[str, str] | None = None) -> None:
        """Measure every quant; after each, the kernel probes of its tensor types not probed yet in this
        round (so probes and quants share the machine's conditions through the run). With bench.rounds > 1
        the sweep is made that many times, each visit measuring its share of the repetitions. `known_files`
        ({quant: path} from a resumed run's records) lets the probes read a measured file's tensor types
        without getting the file again."""
        cfg = self.cfg
        (self.run_dir / "logs").mkdir(exist_ok=True)
        n_q, rounds = len(cfg.quants), self.bench["rounds"]
        resolved: dict[str, ModelFile] = self.resolved
        paths: dict[str, Path] = {q: Path(p) for q, p in (known_files or {}).items()}  # for the probes
        for v in range(rounds):
            mine = set(visit_reps(self.bench["repetitions"], rounds, v))
            order = visit_order(cfg.quants, self.bench["seed"], v, cfg.bench.shuffle)
            rng = random.Random(f"probes-{self.bench['seed']}-{v}")
            pending: list[tuple[str, Any]] = []  # (ggml type, layer shape) to probe in this round
            queued: set[tuple[str, tuple]] = set()  # (ggml type, probe shape): two models' Q4_1 are two probes
            for i, quant in enumerate(order, 1):
                head = f"[{i:>2}/{n_q}] {quant:<7}" + (f" round {v + 1}/{rounds}" if rounds > 1 else "")
                self.visit = {"round": v + 1, "position": i, "order": order}
                if quant not in self.errors:
                    self._visit_quant(writer, head, quant, mine, done, resolved, paths, v)
                path = paths.get(quant)
                if probe_writer is not None and path is not None and path.is_file():
                    new = [x for x in self._probe_types(head, path) if (x[0], _layers(x[1])) not in queued]
                    queued.update((t, _layers(shape)) for t, shape in new)
                    pending += new
                    rng.shuffle(pending)  # probes are not tied to the quant that revealed their type
                # spread this round's probes over its remaining visits
                for _ in range(math.ceil(len(pending) / (len(order) - i + 1))):
                    t, shape = pending.pop()
                    self.visit = {"round": v + 1, "position": i, "order": order, "probe_after": quant}
                    self._probe(probe_writer, head, t, shape, probes_done or set(), v)
            self.visit = None

    def _visit_quant(self, writer, head: str, quant: str, mine: set, done: set, resolved: dict, paths: dict,
                     v: int) -> None:
        cfg = self.cfg
        cells = [c for c in all_cells(cfg, self.bench) if c[0] == quant]
        todo = [c for c in cells if c[3] in mine and c not in done]
        side = self._side_keys(quant, v)
        side_todo = [k for k in side if (quant, *k) not in self.side_done]
        if todo or side_todo:
            mf = resolved.get(quant) or self._resolve(writer, head, quant)
            if mf is None:
                return  # its error record is written; later rounds skip it
            resolved[quant] = mf._replace(built_now=False)  # a later round's visit says nothing was built
            paths[quant] = mf.path
            skip = [[t, d, r] for (_, t, d, r) in cells if (quant, t, d, r) not in todo]
            every = [m.key for m in mem_cells(self.bench)] + [c.key for c in batched.cells(self.bench)]
            skip_side = [list(k) for k in every if k not in side_todo]  # other quants', visits' and rounds' too
            self._measure(writer, head, quant, mf, skip, len(todo), skip_side, side_todo)
            self.side_done.update((quant, *k) for k in side_todo)  # tried: errors are not retried
        elif v == 0:
            self.echo(f"{head} already measured (resume): skipped")

    def _side_keys(self, quant: str, v: int) -> list[tuple]:
        """The keys of `quant`'s memory-test contexts (bench.context_quants) and of its batched cells whose
        repetitions fall on visit `v`, less those that cannot fit a fixed context (said when the run starts)."""
        cq = self.bench.get("context_quants") or self.cfg.quants
        reps = set(visit_reps(self.bench["batched"]["repetitions"], self.bench["rounds"], v))
        big = {(c.pp, c.tg, c.pl) for c in batched.too_big(self.bench)}
        return ([m.key for m in mem_cells(self.bench)] if quant in cq else []) + [
            c.key for c in batched.cells(self.bench) if c.rep in reps and (c.pp, c.tg, c.pl) not in big]

    def quality(self, writer: schema.RecordWriter, done: set[str]) -> None:
        """The quality test after the sweep: every quant not yet scored (`done`) against the reference, in one
        measuring process (harness.measure.quality: both loaded, the text walked chunk by chunk)."""
        q = self.cfg.quality
        files: dict[str, ModelFile] = {}
        for label in self.cfg.quants:
            mf = self.resolved.get(label) or self._resolve(writer, f"[quality] {label}", label)
            if mf is not None:
                files[label] = mf
        ref_label, ref_path = pick_reference(q.reference, {k: v.path for k, v in files.items()})
        todo = {k: v for k, v in files.items() if k != ref_label and k not in done}
        if not todo:
            self.echo("[quality] nothing to score" + (" (resume: all done)" if done else ""))
            return
        from harness.measure import quality as quality_mod

        text = Path(q.text).expanduser() if q.text else quality_mod.DEFAULT_TEXT
        if not text.is_file():
            raise RunError(f"quality: no text: {text} does not exist on this machine; give one with --text FILE "
                           "(wikitext-2's wiki.test.raw, as llama-perplexity users do)")
        info = quality_mod.text_info(text)
        ref_sha = sha256_file(ref_path)
        extra = {**info, "reference_label": ref_label, "reference_file": str(ref_path), "reference_sha256": ref_sha,
                 "protocol": "llama-perplexity --kl-divergence (second half of each chunk scored; 16-bit reference "
                             "log-probabilities)"}
        bases = {k: {"run_id": self.run_id, "quant": k, "weights": mf.weights, "weights_ref": mf.weights_ref,
                     "file_path": str(mf.path), "file_bytes": mf.path.stat().st_size, "file_sha256": mf.sha256,
                     "llama_cpp_version": quantize.llama_cpp_version()} for k, mf in todo.items()}
        job = {"kind": "quality", "reference": str(ref_path), "quants": {k: str(v.path) for k, v in todo.items()},
               "text_path": str(text), "n_ctx": q.n_ctx, "chunks": q.chunks, "threads": self.bench["threads"],
               "n_gpu_layers": self.bench["n_gpu_layers"], "bases": bases, "extra": extra,
               "log_path": str(self.run_dir / "logs" / "quality.llama.log")}
        self.echo(f"[quality] {len(todo)} quants against {ref_label} ({ref_path.name}) on {info['text_name']}, "
                  f"n_ctx {q.n_ctx}" + (f", at most {q.chunks} chunks" if q.chunks else ""))
        res = self._child(job, writer, "quality", len(todo), self.run_dir / "logs" / "quality.stderr")
        if res.error:
            self.errors["quality"] = res.error
            self.echo(f"[quality] ERROR: {res.error}")

    def _resolve(self, writer, head: str, quant: str) -> ModelFile | None:
        try:
            self.echo(f"{head} getting the model file ({self.cfg.model.source})")
            return resolve_source(self.cfg, quant, progress=self.progress)
        except Exception as e:  # noqa: BLE001 - SourceError, QuantizeError, OSError: all end this quant only
            msg = str(e) if isinstance(e, SourceError) else f"{type(e).__name__}: {e}"
            self._fail(writer, head, quant, msg, None)
            return None

    def _measure(self, writer, head: str, quant: str, mf: ModelFile, skip: list, n_todo: int,
                 skip_side: list | None = None, side_todo: list | None = None) -> None:
        t0 = time.monotonic()
        size = mf.path.stat().st_size
        built = " (built now)" if mf.built_now else ""
        n_mem = sum(k[0] == "mem" for k in side_todo or ())
        n_side = len(side_todo or ())
        what = [f"{n} {name}" for n, name in ((n_todo, "repetitions"), (n_mem, "contexts (memory test)"),
                                              (n_side - n_mem, "batched cells")) if n]
        self.echo(f"{head} {mf.path.name} {size / 1e6:,.0f} MB{built}; measuring {' and '.join(what)}")
        logs = self.run_dir / "logs"
        base = {"run_id": self.run_id, "quant": quant, "weights": mf.weights, "weights_ref": mf.weights_ref,
                "file_path": str(mf.path), "file_bytes": size, "file_sha256": mf.sha256,
                "llama_cpp_version": quantize.llama_cpp_version()}
        # the synthetic and Hub files are Llama 3.2 1B: their header must say llama; a local file may be of any
        # architecture llama.cpp loads (its structure is still validated before llama.cpp sees it)
        expect = None if self.cfg.model.source == "local" else "llama"
        job = worker.make_job(mf.path, self.bench, base, logs / f"{quant}.llama.log", skip_cells=skip,
                              skip_mem=skip_side, expect_arch=expect)
        res = self._child(job, writer, quant, n_todo + n_side, logs / f"{quant}.stderr")
        if res.error:
            self._fail(writer, head, quant, res.error, mf, after=res.n_records)
        else:
            self.echo(f"{head} done: {res.n_records} records in {time.monotonic() - t0:,.0f} s")

    def _child(self, job: dict, writer, label: str, n_todo: int, stderr_path: Path) -> ChildResult:
        bar = Bar(n_todo, label, enabled=self.progress)

        def on_record(d: dict) -> None:
            rec = schema.from_dict(d)
            if self.visit is not None:  # where in the sweep it was measured: the round and the visiting order
                rec = dataclasses.replace(rec, extra={**rec.extra, "visit": self.visit})
            self.side_writers.get(rec.test, writer).write(rec)
            bar.update(1)

        try:
            return measure_in_child(job, self.cfg.bench.timeout_s, on_record, bar.status, stderr_path)
        finally:
            bar.close()

    def _probe_types(self, head: str, model_path: Path) -> list[tuple[str, Any]]:
        """(ggml type, layer shape) of the file's tensor types worth a probe; none (said once) where the
        header gives no shape to build a probe of."""
        try:
            summary = validate.check(model_path, expect_arch=None)
            if summary.architecture != "llama":
                if summary.architecture not in self.no_probe_archs:
                    self.no_probe_archs.add(summary.architecture)
                    self.echo(f"{head} no kernel probes: they are built for llama-architecture files, this one is "
                              f"{summary.architecture!r} (the calibration goes on without them)")
                return []
            shape = probes.shape_of(summary.hparams)
        except (validate.InvalidGGUF, probes.ProbeError, OSError) as e:
            self.echo(f"{head} no kernel probes: {e}")
            return []
        return [(t, shape) for t in probes.types_to_probe(summary.type_weights)]

    def _probe(self, writer, head: str, t: str, shape, done: set, visit: int = 0) -> None:
        """The kernel probes of type `t`: one of probes.n_layer layers and, where probes.base_n_layer > 0, one of
        that many (its records' quant is "<type>@<n>L"), so that the cost per weight comes from their
        difference."""
        layers = [self.cfg.probes.n_layer] + ([self.cfg.probes.base_n_layer] if self.cfg.probes.base_n_layer else [])
        for i, n_layer in enumerate(layers):
            label = t if i == 0 else probes.base_label(t, n_layer)
            self._probe_one(writer, head, probes.probe_arch(shape, n_layer), t, label, done, visit)

    def _probe_one(self, writer, head: str, parch, t: str, label: str, done: set, visit: int) -> None:
        if (parch.name, t, visit) in self.probed or (parch.name, t) in self.probe_errors:
            return
        self.probed.add((parch.name, t, visit))
        bench = probe_bench(self.cfg, self.bench)
        logs = self.run_dir / "logs"
        mine = set(visit_reps(bench["repetitions"], self.bench["rounds"], visit))
        ref = probes.weights_ref(parch, t)  # a probe's identity: shape, layers and type (resume keys on it)
        skip = [["tg", 0, r] for r in range(bench["repetitions"]) if r not in mine or (ref, "tg", 0, r) in done]
        n_todo = bench["repetitions"] - len(skip)
        if n_todo <= 0:
            return
        base = {"run_id": self.run_id, "quant": label, "weights": "synthetic",
                "weights_ref": ref, "llama_cpp_version": quantize.llama_cpp_version()}
        try:
            path, built = probes.ensure_probe(self.cfg.resolved_cache_dir, parch, t, progress=self.progress)
            base.update(file_path=str(path), file_bytes=path.stat().st_size, file_sha256=sha256_file(path))
        except Exception as e:  # noqa: BLE001 - ProbeError, QuantizeError, OSError: this probe only
            self._probe_fail(writer, head, (parch.name, t), base, f"{type(e).__name__}: {e}")
            return
        self.echo(f"{head} probe {label} ({parch.n_layer} layers): {base['file_bytes'] / 1e6:,.0f} MB"
                  f"{' (built now)' if built else ''}; measuring {n_todo} repetitions of tg{bench['n_gen']}")
        log = f"{parch.name}-{t}"  # probe-e2048-f8192-h32-kv8-l6-Q4_K: one per shape, layers and type
        job = worker.make_job(path, bench, base, logs / f"{log}.llama.log", skip_cells=skip)
        res = self._child(job, writer, f"probe {label}", n_todo, logs / f"{log}.stderr")
        if res.error:
            self._probe_fail(writer, head, (parch.name, t), base, res.error)

    def _probe_fail(self, writer, head: str, key: tuple[str, str], base: dict, error: str) -> None:
        """An error record for probe `key` (shape, type), which is then not tried again in this run."""
        self.probe_errors.add(key)
        writer.write(schema.make(**base, utc=_utc(), status="error", error=error))
        self.echo(f"{head} probe {key[1]} ERROR: {error} (calibration goes on without it)")

    def _fail(self, writer, head: str, quant: str, error: str, mf, after: int = 0) -> None:
        self.errors[quant] = error
        writer.write(self._error_record(quant, error, mf))
        kept = f" ({after} repetitions measured before it are kept)" if after else ""
        self.echo(f"{head} ERROR: {error}{kept}")


def _state_after(env_path: Path) -> None:
    """Add the machine's state at the end of the sweep to env.json (load, frequency, steal since the start)."""
    from harness.measure import machine

    try:
        env = json.loads(env_path.read_text())
        env["machine_state_after"] = machine.host_state()
        env_path.write_text(json.dumps(env, indent=2))
    except (OSError, ValueError) as e:
        log.warning("could not record the machine's state after the run: %s", e)


def _utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def prepare(cfg: Config, out: Path | None, resume: Path | None) -> tuple[Path, list[schema.Record]]:
    """Create (or reopen, for --resume) the run folder; check it can be written and that disk suffices."""
    if resume is not None:
        run_dir = resume
        rec_path = run_dir / "records.jsonl"
        if not rec_path.is_file():
            raise RunError(f"--resume {run_dir}: no records.jsonl there (not a results folder of this harness)")
        old_cfg = run_dir / "config.resolved.yaml"
        if old_cfg.is_file():
            prev = config_mod.from_dict(config_mod.yaml.safe_load(old_cfg.read_text()))
            if prev.bench != cfg.bench or prev.model != cfg.model or prev.probes != cfg.probes:
                raise RunError(f"--resume {run_dir}: its config differs from this one in model, bench or probes "
                               "settings; resume with the same config")
        check_writable(run_dir)
        try:
            previous = schema.read_records(rec_path)
        except schema.SchemaError as e:
            raise RunError(f"--resume: {e}") from None
        return run_dir, previous
    base = out.parent if out is not None else default_results()
    check_writable(base)
    if out is not None:
        if out.exists() and any(out.iterdir()):
            raise RunError(f"--out {out} exists and is not empty; results are never overwritten "
                           "(choose a new folder, or --resume it)")
        run_dir = out
    else:
        run_dir = new_run_dir(base, cfg.name)
    check_writable(run_dir)
    return run_dir, []


CUDA_INSTALL = ('CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
                '--no-deps llama-cpp-python==0.3.36')


def offload_warning(environment: dict[str, Any], cfg: Config) -> str | None:
    """The loud line for a GPU that llama.cpp cannot use: a CPU number must never pass for a GPU one."""
    gpu = environment.get("gpu")
    if gpu and cfg.bench.n_gpu_layers != 0 and not environment["llama"]["gpu_offload_supported"]:
        return (f"NVML sees {gpu['name']} but this llama-cpp-python build cannot offload to it: every "
                f"measurement runs on the CPU and is recorded as device=cpu. For a CUDA build: {CUDA_INSTALL}")
    return None


def label_globbed(cfg: Config) -> Config:
    """A config whose model.path was a glob (files labelled "@0", "@1", ...) with each file labelled by the quant
    its header names instead."""
    files = cfg.model.files or {}
    if not files or not all(k.startswith("@") for k in files):
        return cfg
    from harness.gguf import inspect

    labelled = config_mod.label_files(list(files.values()), inspect.label_for)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, files=labelled), quants=tuple(labelled))


REFERENCE_TYPES = ("F32", "BF16", "F16")  # preferred references, best first


def pick_reference(choice: str, files: dict[str, Path]) -> tuple[str, Path]:
    """The quality test's reference: a label of the run's files or a path; "auto": an F32/BF16/F16 file of the
    run (by label), else its largest file."""
    if choice != "auto":
        if choice in files:
            return choice, files[choice]
        p = Path(choice).expanduser()
        if p.is_file():
            return p.stem, p
        raise RunError(f"quality.reference {choice!r} is neither a label of this run's files "
                       f"({', '.join(files)}) nor a file")
    if not files:
        raise RunError("quality: no model files to score")
    for t in REFERENCE_TYPES:
        for label, p in files.items():
            if label.upper() == t or label.upper().endswith("-" + t):
                return label, p
    label = max(files, key=lambda k: files[k].stat().st_size)
    return label, files[label]


def start_rpc(runner: Runner) -> dict[str, Any] | None:
    """bench.rpc: the servers every measuring process registers ("local": each measuring process starts its own
    on loopback, for its one file). User servers must answer before the sweep starts. Returns env.json's "rpc"."""
    rpc = runner.bench.get("rpc") or ""
    if not rpc:
        return None
    from harness.measure import devices

    if rpc == "local":
        runner.echo("RPC device: each measuring process starts llama.cpp's RPC server on loopback (this machine's CPU "
                    "served as a device: the offload path runs, but its speed is not a GPU's)")
        return {"endpoints": [], "local_server": True}
    for ep in rpc.split(","):
        host, port = devices.split_endpoint(ep)
        if not devices.reachable(host, port):
            raise RunError(f"bench.rpc: nothing answers at {ep} (start the server there: ggml-rpc-server "
                           f"-H {host} -p {port}; or --rpc local)")
    runner.bench["rpc_endpoints"] = rpc.split(",")
    return {"endpoints": runner.bench["rpc_endpoints"], "local_server": False}


def run(cfg: Config, out: Path | None = None, resume: Path | None = None, progress: bool = True,
        echo: Callable[[str], None] | None = None) -> tuple[Path, dict[str, str]]:
    """Run the sweep. Returns (results folder, {quant: error} for quants that failed)."""
    cfg = label_globbed(cfg)
    if cfg.model.source == "hub":
        from harness.sources import hub

        problems = hub.preflight(cfg.model, list(cfg.quants))
        if problems:
            raise RunError("\n".join(problems))
    run_dir, previous = prepare(cfg, out, resume)
    done = done_cells(previous)
    cells = all_cells(cfg, resolved_bench(cfg))
    check_disk(cfg, [q for q in cfg.quants if any(c[0] == q and c not in done for c in cells)])
    (run_dir / "config.resolved.yaml").write_text(config_mod.dump_yaml(cfg))
    env_path = run_dir / "env.json"
    environment = env_mod.collect()
    if env_path.exists():  # a resumed run keeps the first environment and adds the new one
        old = json.loads(env_path.read_text())
        old.setdefault("resumed", []).append(environment)
        environment = old
    warning = offload_warning(environment, cfg)
    if warning:
        environment.setdefault("warnings", []).append(warning)
        (echo or (lambda s: print(s, file=sys.stderr)))("WARNING: " + warning)
    runner = Runner(cfg, run_dir, progress=progress, echo=echo)
    rpc = start_rpc(runner)
    if rpc is not None:
        environment["rpc"] = rpc
    env_path.write_text(json.dumps(environment, indent=2))
    runner.echo(f"results folder: {run_dir}" + (f" (resuming: {len(done)} cells already measured)" if resume else ""))
    probe_path = run_dir / "probes.jsonl"
    probes_done: set = set()
    if resume and probe_path.is_file():
        try:
            probes_done = {(r.weights_ref, r.test, r.n_depth, r.rep) for r in schema.read_records(probe_path)
                           if r.status == "ok"}
        except schema.SchemaError as e:
            raise RunError(f"--resume: {e}") from None
    known = {r.quant: r.file_path for r in previous if r.status == "ok" and r.file_path}
    side = {"mem": (run_dir / "contexts.jsonl", MemCell), "batched": (run_dir / "batched.jsonl", batched.BatchedCell)}
    for test, (path, cell) in side.items():
        if resume and path.is_file():
            try:
                runner.side_done |= {(r.quant, *cell.of_record(r).key) for r in schema.read_records(path)
                                     if test == "mem" or r.status == "ok"}
            except schema.SchemaError as e:
                raise RunError(f"--resume: {e}") from None
    for c in batched.too_big(runner.bench):
        runner.echo(f"batched pp {c.pp} tg {c.tg} pl {c.pl}: needs {c.n_kv(runner.bench['batched']['kv_unified'])} "
                    f"KV cells, more than -c {runner.bench['batched']['ctx']}: skipped, as llama-batched-bench does")
    with contextlib.ExitStack() as stack:
        stack.callback(_state_after, env_path)  # the machine's state when the sweep ends (or is interrupted)
        writer = stack.enter_context(schema.RecordWriter(run_dir / "records.jsonl"))
        for test, (path, _) in side.items():
            if runner.bench.get("contexts") if test == "mem" else runner.bench["batched"]["npl"]:
                runner.side_writers[test] = stack.enter_context(schema.RecordWriter(path))
        if probes_wanted(cfg):
            probe_writer = stack.enter_context(schema.RecordWriter(probe_path))
            runner.run(writer, done, probe_writer, probes_done, known)
        else:
            runner.run(writer, done)
        if cfg.quality.enabled:
            qpath = run_dir / "quality.jsonl"
            qdone = ({r.quant for r in schema.read_records(qpath) if r.status == "ok"}
                     if resume and qpath.is_file() else set())
            runner.quality(stack.enter_context(schema.RecordWriter(qpath)), qdone)
    return run_dir, runner.errors
