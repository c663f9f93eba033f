"""Run configuration: YAML in, frozen dataclasses out, validated strictly in this one place.

Precedence is CLI > YAML > defaults (the CLI passes its overrides to :func:`load`). Every user mistake
becomes a :class:`ConfigError` naming the field, with "did you mean ...?" for near misses; the CLI turns
it into one line on stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.catalog import quants
from harness.catalog.quants import suggest

SOURCES = ("synthetic", "hub", "local")
ARCHITECTURES = ("llama-3.2-1b", "tiny")  # kept in step with harness.sources.synthetic.ARCHS
FLASH_ATTN_TYPES = {"auto": -1, "off": 0, "on": 1}  # LLAMA_FLASH_ATTN_TYPE_*
FLASH_ATTN = ("auto", "on", "off")
LLAMA_MAX_SEQ = 256  # src/llama-cparams.h of the pinned llama.cpp: sequences one context holds
# KV cache types llama.cpp takes for type_k / type_v (llama-bench's -ctk / -ctv), as ggml type ids
CACHE_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "iq4_nl": 20, "q5_0": 6, "q5_1": 7}
# The model keys each source takes.
SOURCE_KEYS = {
    "synthetic": ("source", "architecture", "seed", "imatrix"),
    "hub": ("source", "repo", "file", "revision"),
    "local": ("source", "path", "files"),
}


def default_cache_dir() -> Path:
    """The harness's cache: $HARNESS_CACHE, else ~/.cache/harness (models, probes, file hashes, compiled kernels)."""
    env = os.environ.get("HARNESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "harness"


def output_dir(kind: str) -> Path:
    """Where outputs of `kind` ("results", "reports") go unless --out names a folder: $HARNESS_RESULTS /
    $HARNESS_REPORTS, else ./<kind> under the current directory (never inside an installed package)."""
    env = os.environ.get(f"HARNESS_{kind.upper()}")
    return Path(env).expanduser() if env else Path.cwd() / kind


class ConfigError(ValueError):
    """A mistake in the user's config or command line; the message is one line naming the field."""


@dataclass(frozen=True)
class ModelSpec:
    source: str = "synthetic"  # where the GGUF files come from: synthetic | hub | local
    architecture: str = "llama-3.2-1b"  # synthetic only: shape to build
    seed: int = 0  # synthetic only: seed of the random weights
    imatrix: bool = True  # synthetic only: quantize with a uniform importance matrix, as the Hub's files are
    repo: str | None = None  # hub only: "owner/name"
    file: str | None = None  # hub only: file name pattern with {quant}
    revision: str | None = None  # hub only: branch, tag or commit to pin
    path: str | None = None  # local only: path pattern with {quant}
    files: dict[str, str] | None = None  # local only: {label: path} of files of any quant and architecture


@dataclass(frozen=True)
class BatchedSpec:
    # The batched test (harness.measure.batched): llama-batched-bench's protocol and names. Every combination of
    # npp x ntg x npl is a cell: pl users, each with a prompt of pp tokens and tg tokens generated, decoded
    # together; records in batched.jsonl. Empty npl: no batched test.
    npp: tuple[int, ...] = (128,)  # -npp: prompt tokens per user
    ntg: tuple[int, ...] = (128,)  # -ntg: tokens generated per user
    npl: tuple[int, ...] = ()  # -npl: users decoding at once (parallel sequences); () = no batched test
    pps: bool = False  # -pps: one prompt shared by every user (its KV cells copied to the others)
    ctx: int = 0  # -c: one context of this many tokens for every cell, n_seq_max = max(npl), cells that need more
    # skipped (llama-batched-bench's way); 0: each cell its own context of exactly what it needs, n_seq_max = pl
    kv_unified: bool = False  # -kvu: one KV buffer shared by all sequences (else split evenly between them)
    repetitions: int = 3  # timed repetitions of each cell (llama-batched-bench runs each once)
    floor_tg_per_user: float = 0.0  # the report's floor for a user's reading speed (tokens/s): where adding users
    # takes it below this, more users stop paying; 0 = no floor (only the aggregate's gain under 10% counts)


@dataclass(frozen=True)
class BenchSpec:
    n_prompt: int = 512  # tokens in the prompt-processing (pp) test; 0 skips pp
    n_gen: int = 128  # tokens in the generation (tg) test; 0 skips tg
    depths: tuple[int, ...] = (0,)  # KV-cache fill (tokens) before each test, pre-filled untimed
    repetitions: int = 5  # timed repetitions per test
    shuffle: bool = True  # each round visits the quants (and spreads the probes) in a new seeded order
    rounds: int | None = None  # passes of the sweep (null: 3 on a CPU, 1 where the build offloads to a GPU);
    # each visit to a quant measures its share of the repetitions, so a slow spell of a shared machine cannot hit
    # every repetition of one quant (and probes share the passes)
    warmup: int = 1  # untimed warm-up runs per test
    n_gpu_layers: int = -1  # layers to offload; -1 = all, where the build can offload
    flash_attn: str = "auto"  # auto | on | off
    threads: int | None = None  # CPU threads; None = physical cores (llama-bench's default)
    n_batch: int = 512  # logical batch size
    n_ubatch: int = 512  # physical batch size
    seed: int = 42  # seed of the random token ids
    timeout_s: float = 1800.0  # wall-clock limit for one model file in its child process
    memory_limit_mb: int | None = None  # address-space limit on the child process; None = none
    mmap: bool = True  # llama.cpp loads the weights by mmap (its default, and llama-bench's); false: read into
    # anonymous memory, so the process's resident set is what the model really holds
    # The memory test: for each context size, KV type pair and flash-attention setting, a context is created
    # and decoded once (one token; a micro-batch on a device), and llama.cpp's KV and compute buffers and the
    # process's (and device's) memory are recorded (contexts.jsonl). The lists expand like llama-bench's (every
    # combination); pp and tg use the first cache type of each list.
    contexts: tuple[int, ...] = ()  # context sizes in tokens; () = no memory test
    cache_type_k: tuple[str, ...] = ("f16",)  # KV cache K types (f16, q8_0, q4_0, ...)
    cache_type_v: tuple[str, ...] = ("f16",)  # ... V types (quantized V needs flash attention)
    context_flash_attn: tuple[str, ...] = ()  # the memory test's flash-attention axis; () = [bench.flash_attn]
    rpc: str = ""  # llama.cpp's RPC device: "" none; "local" a server the harness starts on loopback (its CPU
    # served as a device: the offload path runs without a GPU; its speed is not a GPU's); "HOST:PORT[,HOST:PORT]"
    # servers the user runs (ggml-rpc-server), as llama-bench's --rpc: layers are split over them
    context_quants: tuple[str, ...] = ()  # the quants that run the memory test; () = all (KV and compute buffers do
    # not depend on the weights' type, so two quants tell them; each quant's own weights are measured anyway)
    batched: BatchedSpec = field(default_factory=BatchedSpec)  # the batched test (serving: pl users at once)


@dataclass(frozen=True)
class QualitySpec:
    # The quality test (harness.measure.quality): every quant's KL divergence and perplexity against a reference
    # model on one text, by llama-perplexity's protocol. Real weights only: refused on synthetic ones.
    enabled: bool = False  # run it after the sweep (records in quality.jsonl)
    text: str | None = None  # the text file (wikitext-2's wiki.test.raw as usual); None = the GPL-3 text Debian
    # ships (/usr/share/common-licenses/GPL-3)
    n_ctx: int = 512  # tokens per chunk; the second half of each is scored
    chunks: int | None = None  # at most this many chunks; None = all the text gives
    reference: str = "auto"  # a label of the run's files, or a path; auto: F16/BF16/F32 where the run has one,
    # else its largest file (named as the reference in every record)


@dataclass(frozen=True)
class ProbeSpec:
    # Kernel probes (harness.sources.probes): for each tensor type in the quants, a few-layer model of the same layer
    # shapes, all in that type, measured with the tg test; calibration uses them as the per-type kernel costs.
    enabled: bool = True  # measure them (needs bench.n_gen > 0)
    n_layer: int = 6  # layers of the probe model (the 1B's layer shapes, a 512-token vocabulary)
    base_n_layer: int = 2  # a second probe of this many layers: the cost per weight is taken from the difference,
    # so the probe's own per-token overhead (the output, sampling-free decode, synchronisation) drops out; 0: one
    # probe, its time over its weights (overhead included)
    n_gen: int = 128  # tokens per repetition (a probe token costs about n_layer / the model's layers of one)
    repetitions: int = 5  # timed repetitions per probe


@dataclass(frozen=True)
class DeviceGroup:
    """One kind of node a cluster sweep measures on: the nodes that advertise Ray's custom resource
    "harness:<name>" (`ray start --resources '{"harness:RTX 4090": 1}'`), each task also asking for `gpus`."""

    name: str
    gpus: float = 0


@dataclass(frozen=True)
class ClusterSpec:
    """`run --cluster`: the device groups to sweep (every quant on one node of each), or "all" (every node once)."""

    devices: tuple[DeviceGroup, ...] | str = "all"
    retries: int = 2  # times a cell of a dead node is given to another node of its kind


@dataclass(frozen=True)
class Config:
    name: str
    model: ModelSpec = field(default_factory=ModelSpec)
    quants: tuple[str, ...] = quants.PAGE_QUANTS
    bench: BenchSpec = field(default_factory=BenchSpec)
    probes: ProbeSpec = field(default_factory=ProbeSpec)
    quality: QualitySpec = field(default_factory=QualitySpec)
    cache_dir: str | None = None  # where synthetic models are built; None = $HARNESS_CACHE or ~/.cache/harness
    cluster: ClusterSpec = field(default_factory=ClusterSpec)  # used by `run --cluster` only

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = {k: v for k, v in d["model"].items() if k in SOURCE_KEYS[self.model.source]}
        d["quants"] = list(self.quants)
        d["bench"]["depths"] = list(self.bench.depths)
        for k in ("contexts", "cache_type_k", "cache_type_v", "context_flash_attn", "context_quants"):
            d["bench"][k] = list(getattr(self.bench, k))
        for k in ("npp", "ntg", "npl"):
            d["bench"]["batched"][k] = list(getattr(self.bench.batched, k))
        devs = self.cluster.devices
        d["cluster"] = {"devices": devs if isinstance(devs, str) else [dataclasses.asdict(g) for g in devs],
                        "retries": self.cluster.retries}
        return d

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _check_keys(where: str, data: dict, allowed: list[str]) -> None:
    for key in data:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise ConfigError(
                f"unknown key {prefix}{key}{suggest(str(key), allowed)}; allowed: {', '.join(allowed)}"
            )


def _typed(where: str, value: Any, kind: type | tuple, *, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a YAML "yes" must not pass for a count.
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds) + (" or null" if allow_none else "")
        raise ConfigError(f"{where} must be {names}, got {type(value).__name__} {value!r}")
    return value


def _positive(where: str, value: int, *, zero_ok: bool = False) -> int:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{where} must be {'>= 0' if zero_ok else '> 0'}, got {value}")
    return value


def _model(data: Any) -> ModelSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"model must be a mapping, got {type(data).__name__}")
    _check_keys("model", data, _field_names(ModelSpec))
    source = _typed("model.source", data.get("source", "synthetic"), str)
    if source not in SOURCES:
        raise ConfigError(f"model.source {source!r} is not one of {', '.join(SOURCES)}{suggest(source, SOURCES)}")
    own = SOURCE_KEYS[source]
    for key in data:
        if key not in own:
            raise ConfigError(f"model.{key} does not apply to source {source!r} (it takes: {', '.join(sorted(own))})")
    spec = ModelSpec(source=source)
    if source == "synthetic":
        arch = _typed("model.architecture", data.get("architecture", spec.architecture), str)
        if arch not in ARCHITECTURES:
            raise ConfigError(
                f"model.architecture {arch!r} is not one of {', '.join(ARCHITECTURES)}{suggest(arch, ARCHITECTURES)}"
            )
        seed = _typed("model.seed", data.get("seed", 0), int)
        imatrix = _typed("model.imatrix", data.get("imatrix", True), bool)
        return ModelSpec(source=source, architecture=arch, seed=seed, imatrix=imatrix)
    if source == "hub":
        repo = data.get("repo")
        if not repo:
            raise ConfigError("model.repo is required for source 'hub' (e.g. bartowski/Llama-3.2-1B-Instruct-GGUF)")
        repo = _typed("model.repo", repo, str)
        if repo.count("/") != 1 or repo.startswith("/") or repo.endswith("/"):
            raise ConfigError(f"model.repo must look like 'owner/name', got {repo!r}")
        file = _typed("model.file", data.get("file"), str, allow_none=True)
        if not file:
            raise ConfigError("model.file is required for source 'hub': a file name pattern with {quant}")
        _need_quant_pattern("model.file", file)
        revision = _typed("model.revision", data.get("revision"), str, allow_none=True)
        return ModelSpec(source=source, architecture="", repo=repo, file=file, revision=revision)
    files = data.get("files")
    path = _typed("model.path", data.get("path"), str, allow_none=True)
    if files is not None:
        if path:
            raise ConfigError("model.path and model.files exclude each other: a {quant} pattern or a list of files")
        if not isinstance(files, dict) or not files:
            raise ConfigError("model.files must be a mapping of labels to GGUF paths, e.g. {Q4_K_M: m/q4km.gguf}")
        out = {}
        for label, f in files.items():
            f = _typed(f"model.files.{label}", f, str)
            if not str(label).strip() or any(c in str(label) for c in "/\\\0"):
                raise ConfigError(f"model.files: label {label!r} must be a plain name (it names log files)")
            out[str(label)] = f
        return ModelSpec(source=source, architecture="", files=out)
    if not path:
        raise ConfigError("model.path (a pattern with {quant}) or model.files is required for source 'local'")
    if "{quant}" not in path and any(c in path for c in "*?["):  # a glob: every file it matches, labelled by
        # their headers when the run starts (harness.measure.runner.label_globbed)
        import glob

        found = sorted(glob.glob(os.path.expanduser(path)))
        if not found:
            raise ConfigError(f"model.path {path!r} matches no file")
        return ModelSpec(source=source, architecture="", files={f"@{i}": f for i, f in enumerate(found)})
    _need_quant_pattern("model.path", path)
    return ModelSpec(source=source, architecture="", path=path)


def label_files(paths: list, label_for) -> dict[str, str]:
    """{label: absolute path}: each file labelled by `label_for(path)` (the quant its header names). Files whose
    quant labels collide (two Q4_1 files of different models) are labelled by their file names instead, so a
    table row says which file it is ("SmolLM2-135M-Instruct.Q4_1", not "Q4_1-2"); "-2" only where those collide
    too."""
    files = [(label_for(p)[0], Path(p).expanduser().resolve()) for p in paths]
    counts: dict[str, int] = {}
    for label, _ in files:
        counts[label] = counts.get(label, 0) + 1
    out: dict[str, str] = {}
    for label, path in files:
        base = label if counts[label] == 1 else path.name.removesuffix(".gguf")
        label, n = base, 1
        while label in out:
            n += 1
            label = f"{base}-{n}"
        out[label] = str(path)
    return out


def _need_quant_pattern(where: str, pattern: str) -> None:
    if "{quant}" not in pattern:
        raise ConfigError(f"{where} {pattern!r} must contain {{quant}}, which each quant name replaces")
    try:
        pattern.format(quant="Q4_K_M")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{where} {pattern!r} has a placeholder other than {{quant}}: {e}") from None


def _quants(data: Any, where: str = "quants") -> tuple[str, ...]:
    if isinstance(data, str):
        data = [q.strip() for q in data.split(",") if q.strip()]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{where} must be a non-empty list of quant names, e.g. [Q4_K_M, Q8_0]")
    out: list[str] = []
    for i, q in enumerate(data):
        if not isinstance(q, str):
            raise ConfigError(f"{where}[{i}] must be a string, got {type(q).__name__} {q!r}")
        try:
            quants.get(q)
        except quants.UnknownQuant as e:
            raise ConfigError(f"{where}[{i}]: {e}") from None
        if q in out:
            raise ConfigError(f"{where}[{i}]: {q} is listed twice")
        out.append(q)
    return tuple(out)


def _bench(data: Any) -> BenchSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"bench must be a mapping, got {type(data).__name__}")
    _check_keys("bench", data, _field_names(BenchSpec))
    d = BenchSpec()
    kw: dict[str, Any] = {}
    for name in ("n_prompt", "n_gen", "repetitions", "warmup"):
        kw[name] = _positive(f"bench.{name}", _typed(f"bench.{name}", data.get(name, getattr(d, name)), int),
                             zero_ok=name != "repetitions")
    for name in ("n_batch", "n_ubatch"):
        kw[name] = _positive(f"bench.{name}", _typed(f"bench.{name}", data.get(name, getattr(d, name)), int))
    rounds = _typed("bench.rounds", data.get("rounds", d.rounds), int, allow_none=True)
    kw["rounds"] = None if rounds is None else _positive("bench.rounds", rounds)
    if kw["rounds"] is not None and kw["rounds"] > kw["repetitions"]:
        raise ConfigError(f"bench.rounds ({kw['rounds']}) must not exceed bench.repetitions "
                          f"({kw['repetitions']}): each round measures at least one repetition")
    kw["contexts"] = _int_list("bench.contexts", data.get("contexts", list(d.contexts)), minimum=1)
    if kw["n_ubatch"] > kw["n_batch"]:
        raise ConfigError(f"bench.n_ubatch ({kw['n_ubatch']}) must not exceed bench.n_batch ({kw['n_batch']})")
    depths = data.get("depths", list(d.depths))
    if isinstance(depths, int) and not isinstance(depths, bool):
        depths = [depths]
    if not isinstance(depths, list) or not depths:
        raise ConfigError("bench.depths must be a non-empty list of token counts, e.g. [0, 4096]")
    kw["depths"] = tuple(
        _positive(f"bench.depths[{i}]", _typed(f"bench.depths[{i}]", x, int), zero_ok=True)
        for i, x in enumerate(depths)
    )
    if len(set(kw["depths"])) != len(kw["depths"]):
        raise ConfigError(f"bench.depths lists a depth twice: {list(kw['depths'])}")
    ngl = _typed("bench.n_gpu_layers", data.get("n_gpu_layers", d.n_gpu_layers), int)
    if ngl < -1:
        raise ConfigError(f"bench.n_gpu_layers must be -1 (all) or >= 0, got {ngl}")
    kw["n_gpu_layers"] = ngl
    fa = data.get("flash_attn", d.flash_attn)
    if isinstance(fa, bool):  # YAML reads a bare on/off as a bool
        fa = "on" if fa else "off"
    fa = _typed("bench.flash_attn", fa, str)
    if fa not in FLASH_ATTN:
        raise ConfigError(f"bench.flash_attn {fa!r} is not one of {', '.join(FLASH_ATTN)}{suggest(fa, FLASH_ATTN)}")
    kw["flash_attn"] = fa
    smallest = max(kw["n_prompt"], kw["n_gen"], 1)  # each test's own context (llama-bench: one per test)
    for i, c in enumerate(kw["contexts"]):
        if c < smallest:
            raise ConfigError(f"bench.contexts[{i}] = {c} is below the tests' own tokens (max of n_prompt, "
                              f"n_gen = {smallest}): a context must hold them")
    for name in ("cache_type_k", "cache_type_v"):
        kw[name] = _choice_list(f"bench.{name}", data.get(name, list(getattr(d, name))), list(CACHE_TYPES))
    cfa = data.get("context_flash_attn", list(d.context_flash_attn))
    if isinstance(cfa, list):
        cfa = [("on" if x else "off") if isinstance(x, bool) else x for x in cfa]
    kw["context_flash_attn"] = _choice_list("bench.context_flash_attn", cfa, list(FLASH_ATTN), empty_ok=True)
    cq = data.get("context_quants", list(d.context_quants))
    kw["context_quants"] = _quants(cq, "bench.context_quants") if cq else ()
    threads = _typed("bench.threads", data.get("threads", d.threads), int, allow_none=True)
    kw["threads"] = None if threads is None else _positive("bench.threads", threads)
    kw["seed"] = _typed("bench.seed", data.get("seed", d.seed), int)
    timeout = _typed("bench.timeout_s", data.get("timeout_s", d.timeout_s), float)
    if timeout <= 0:
        raise ConfigError(f"bench.timeout_s must be > 0, got {timeout}")
    kw["timeout_s"] = timeout
    kw["mmap"] = _typed("bench.mmap", data.get("mmap", d.mmap), bool)
    kw["rpc"] = _rpc(_typed("bench.rpc", data.get("rpc", d.rpc) or "", str))
    kw["shuffle"] = _typed("bench.shuffle", data.get("shuffle", d.shuffle), bool)
    mem = _typed("bench.memory_limit_mb", data.get("memory_limit_mb", d.memory_limit_mb), int, allow_none=True)
    kw["memory_limit_mb"] = None if mem is None else _positive("bench.memory_limit_mb", mem)
    kw["batched"] = _batched(data.get("batched", {}), kw["n_batch"])
    if kw["n_prompt"] == 0 and kw["n_gen"] == 0 and not kw["contexts"] and not kw["batched"].npl:
        raise ConfigError("bench.n_prompt and bench.n_gen are both 0, and there is no memory test (bench.contexts) "
                          "and no batched test (bench.batched.npl): nothing to measure")
    return BenchSpec(**kw)


def _batched(data: Any, n_batch: int) -> BatchedSpec:
    """bench.batched, llama-batched-bench's flags: each cell must fit a fixed context, -pps needs users to share."""
    if not isinstance(data, dict):
        raise ConfigError(f"bench.batched must be a mapping (npp, ntg, npl, ...), got {type(data).__name__}")
    _check_keys("bench.batched", data, _field_names(BatchedSpec))
    d = BatchedSpec()
    kw: dict[str, Any] = {}
    for name, minimum in (("npp", 1), ("ntg", 1), ("npl", 1)):
        kw[name] = _int_list(f"bench.batched.{name}", data.get(name, list(getattr(d, name))), minimum)
    for name in ("npp", "ntg"):
        if not kw[name]:
            raise ConfigError(f"bench.batched.{name} (-{name}) must list at least one token count")
    kw["pps"] = _typed("bench.batched.pps", data.get("pps", d.pps), bool)
    kw["kv_unified"] = _typed("bench.batched.kv_unified", data.get("kv_unified", d.kv_unified), bool)
    kw["ctx"] = _positive("bench.batched.ctx", _typed("bench.batched.ctx", data.get("ctx", d.ctx), int), zero_ok=True)
    kw["repetitions"] = _positive("bench.batched.repetitions",
                                  _typed("bench.batched.repetitions", data.get("repetitions", d.repetitions), int))
    floor = _typed("bench.batched.floor_tg_per_user", data.get("floor_tg_per_user", d.floor_tg_per_user), float)
    if floor < 0:
        raise ConfigError(f"bench.batched.floor_tg_per_user must be >= 0 tokens/s, got {floor:g}")
    kw["floor_tg_per_user"] = floor
    if kw["npl"] and max(kw["npl"]) > LLAMA_MAX_SEQ:
        raise ConfigError(f"bench.batched.npl (-npl) {max(kw['npl'])}: llama.cpp holds at most {LLAMA_MAX_SEQ} "
                          "sequences in one context (LLAMA_MAX_SEQ)")
    return _batched_fits(BatchedSpec(**kw), n_batch)


def _batched_fits(spec: BatchedSpec, n_batch: int) -> BatchedSpec:
    """What llama.cpp would abort on or skip, refused in one line: more users than a batch outputs, -pps for one
    user, a fixed context that holds no cell."""
    if spec.npl and max(spec.npl) > n_batch:
        raise ConfigError(f"bench.batched.npl (-npl) {max(spec.npl)}: more users than the batch holds (-b {n_batch}; "
                          "llama.cpp outputs at most n_batch tokens a decode, one per user): raise -b")
    if spec.pps and spec.npl and max(spec.npl) < 2:
        raise ConfigError("bench.batched.pps (-pps) shares one prompt among users, but -npl has only 1 user: "
                          "give -npl more than 1 (e.g. 1,4,16) or drop -pps")
    if spec.ctx and spec.npl:
        need = {(pp, tg, pl): _batched_kv(spec, pp, tg, pl) for pp in spec.npp for tg in spec.ntg for pl in spec.npl}
        if min(need.values()) > spec.ctx:
            (pp, tg, pl), n = min(need.items(), key=lambda kv: kv[1])
            raise ConfigError(f"bench.batched.ctx (-c) {spec.ctx} holds no cell: the smallest (pp {pp}, tg {tg}, "
                              f"pl {pl}) needs {n} KV cells; raise -c, or 0 for a context per cell")
    return spec


def _batched_kv(spec: BatchedSpec, pp: int, tg: int, pl: int) -> int:
    """KV cells a batched cell needs (llama-batched-bench's n_ctx_req)."""
    if spec.pps:
        return (pp if spec.kv_unified else pl * pp) + pl * tg
    return pl * (pp + tg)


def _rpc(value: str) -> str:
    value = value.strip()
    if value in ("", "local"):
        return value
    for ep in value.split(","):
        host, _, port = ep.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"bench.rpc {value!r}: {ep.strip()!r} is not HOST:PORT (e.g. 127.0.0.1:50052); "
                              "or 'local' for a server the harness starts on loopback")
    return ",".join(ep.strip() for ep in value.split(","))


def _int_list(where: str, value: Any, minimum: int) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of token counts, e.g. [2048, 8192], got {type(value).__name__}")
    out = tuple(_typed(f"{where}[{i}]", x, int) for i, x in enumerate(value))
    for i, x in enumerate(out):
        if x < minimum:
            raise ConfigError(f"{where}[{i}] must be >= {minimum}, got {x}")
    if len(set(out)) != len(out):
        raise ConfigError(f"{where} lists a value twice: {list(out)}")
    return out


def _choice_list(where: str, value: Any, allowed: list[str], empty_ok: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or (not value and not empty_ok):
        raise ConfigError(f"{where} must be a non-empty list, one or more of {', '.join(allowed)}")
    out = []
    for i, x in enumerate(value):
        x = _typed(f"{where}[{i}]", x, str)
        if x not in allowed:
            raise ConfigError(f"{where}[{i}] {x!r} is not one of {', '.join(allowed)}{suggest(x, allowed)}")
        if x in out:
            raise ConfigError(f"{where} lists {x} twice")
        out.append(x)
    return tuple(out)


def _switch(name: str, data: Any, spec: type) -> tuple[Any, Any, dict[str, Any]]:
    """A block that may be given as true/false for short (`probes: false`): (its spec, None, {}) then; for a
    mapping, its keys checked: (None, the defaults, {"enabled": ...}) for the caller to read the other fields."""
    if isinstance(data, bool):
        return spec(enabled=data), None, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must be a mapping (or true/false), got {type(data).__name__}")
    _check_keys(name, data, _field_names(spec))
    d = spec()
    return None, d, {"enabled": _typed(f"{name}.enabled", data.get("enabled", d.enabled), bool)}


def _probes(data: Any) -> ProbeSpec:
    short, d, kw = _switch("probes", data, ProbeSpec)
    if short is not None:
        return short
    for name in ("n_layer", "n_gen", "repetitions"):
        kw[name] = _positive(f"probes.{name}", _typed(f"probes.{name}", data.get(name, getattr(d, name)), int))
    kw["base_n_layer"] = _positive("probes.base_n_layer", _typed("probes.base_n_layer",
                                                                 data.get("base_n_layer", d.base_n_layer), int),
                                   zero_ok=True)
    if kw["base_n_layer"] >= kw["n_layer"]:
        raise ConfigError(f"probes.base_n_layer ({kw['base_n_layer']}) must be below probes.n_layer "
                          f"({kw['n_layer']}): the cost per weight is the difference of the two probes")
    return ProbeSpec(**kw)


def _quality(data: Any) -> QualitySpec:
    short, d, kw = _switch("quality", data, QualitySpec)
    if short is not None:
        return short
    kw["text"] = _typed("quality.text", data.get("text", d.text), str, allow_none=True)
    if kw["text"] is not None and not Path(kw["text"]).expanduser().is_file():
        raise ConfigError(f"quality.text {kw['text']!r}: no such file")
    n = _positive("quality.n_ctx", _typed("quality.n_ctx", data.get("n_ctx", d.n_ctx), int))
    if n < 16 or n % 2:
        raise ConfigError(f"quality.n_ctx must be an even number >= 16, got {n}")
    kw["n_ctx"] = n
    ch = _typed("quality.chunks", data.get("chunks", d.chunks), int, allow_none=True)
    kw["chunks"] = None if ch is None else _positive("quality.chunks", ch)
    kw["reference"] = _typed("quality.reference", data.get("reference", d.reference), str)
    return QualitySpec(**kw)


def _cluster(data: Any) -> ClusterSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"cluster must be a mapping, got {type(data).__name__}")
    _check_keys("cluster", data, ["devices", "retries"])
    retries = _positive("cluster.retries", _typed("cluster.retries", data.get("retries", 2), int), zero_ok=True)
    devs = data.get("devices", "all")
    if devs == "all":
        return ClusterSpec("all", retries)
    if not isinstance(devs, list) or not devs:
        raise ConfigError('cluster.devices must be "all" or a list like [{name: "RTX 4090", gpus: 1}, {name: H100}]')
    groups: list[DeviceGroup] = []
    for i, g in enumerate(devs):
        where = f"cluster.devices[{i}]"
        if isinstance(g, str):
            g = {"name": g}
        if not isinstance(g, dict):
            raise ConfigError(f"{where} must be a mapping with a name (and gpus), got {type(g).__name__}")
        _check_keys(where, g, ["name", "gpus"])
        name = _typed(f"{where}.name", g.get("name"), str)
        if not name.strip() or any(c in name for c in "/\\\0"):
            raise ConfigError(f"{where}.name {name!r} must be a non-empty name without '/' (it names files)")
        gpus = _typed(f"{where}.gpus", g.get("gpus", 0), (int, float))
        if gpus < 0:
            raise ConfigError(f"{where}.gpus must be >= 0, got {gpus}")
        if any(x.name == name for x in groups):
            raise ConfigError(f"cluster.devices lists {name!r} twice")
        groups.append(DeviceGroup(name, float(gpus)))
    return ClusterSpec(tuple(groups), retries)


def from_dict(data: Any, overrides: dict[str, Any] | None = None) -> Config:
    """Validate a parsed YAML document (plus CLI overrides, dotted keys like 'bench.repetitions')."""
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping at the top level, got {type(data).__name__}")
    data = json.loads(json.dumps(data))  # deep copy; also rejects YAML-only types like dates
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    _check_keys("", data, _field_names(Config))
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("name is required: a short name for the run, e.g. llama-3.2-1b-synthetic")
    if any(c in name for c in "/\\\0") or name.startswith("."):
        raise ConfigError(f"name {name!r} must not contain '/', '\\' or start with '.' (it names folders)")
    model = _model(data.get("model", {}))
    if model.files:  # files of any quant: the labels are the quants, in the given order
        qs = tuple(model.files)
        extra = [q for q in (data.get("quants") or []) if q not in model.files]
        if extra:
            raise ConfigError(f"quants {extra} are not labels of model.files ({', '.join(model.files)})")
        if data.get("quants"):
            qs = tuple(q for q in data["quants"] if q in model.files)
    else:
        qs = _quants(data.get("quants", list(quants.PAGE_QUANTS)))
    bench = _bench(data.get("bench", {}))
    probes = _probes(data.get("probes", {}))
    quality = _quality(data.get("quality", {}))
    if quality.enabled and model.source == "synthetic":
        raise ConfigError("quality: refused on shape-faithful synthetic weights (seeded random values: their KL "
                          "divergence says nothing of the real model's); run it on real files: model.source hub "
                          "or local, or run --model FILE.gguf ...")
    cache_dir = _typed("cache_dir", data.get("cache_dir"), str, allow_none=True)
    cluster = _cluster(data.get("cluster", {}))
    return Config(name=name, model=model, quants=qs, bench=bench, probes=probes, quality=quality,
                  cache_dir=cache_dir, cluster=cluster)


def load(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Config:
    p = Path(path)
    if not p.is_file():
        hint = ""
        folder = p.parent if str(p.parent) else Path(".")
        if folder.is_dir():
            names = [x.name for x in folder.glob("*.y*ml")]
            hint = suggest(p.name, names)
        raise ConfigError(f"config file {str(path)!r} not found{hint}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    try:
        return from_dict(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
