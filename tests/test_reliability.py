"""Reliability: hostile files, crashes and interruptions lose nothing.

- damaged and hostile GGUF files are rejected in Python (:mod:`harness.gguf.validate`) before llama.cpp sees them,
  in the measuring child as well as in a whole sweep;
- a sweep killed with SIGKILL resumes to exactly the full set of cells, torn last line and all;
- an output folder that cannot be written, or a resume folder that is not one: exit 1 and one line;
- bench.memory_limit_mb turns a context too big for it into an error record, and the sweep goes on;
- Ctrl-C: exit 130, a resume hint, records kept, no measuring process left behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import psutil
import pytest
import yaml
from conftest import REPO, run_cli

from harness import config, schema
from harness.gguf import validate
from harness.measure import runner, worker
from harness.sources.base import sha256_file

SMOKE = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())


# --------------------------------------------------------------------------- layout of a good file


class TensorInfo(NamedTuple):
    name: str
    n_dims_pos: int  # file offset of the u32 n_dims
    dims_pos: int  # file offset of ne[0]
    type_pos: int  # file offset of the u32 ggml type
    offset_pos: int  # file offset of the u64 data offset
    dims: tuple[int, ...]  # ne
    ggml_type: int
    offset: int  # data offset, relative to the data section
    n_bytes: int


class Layout(NamedTuple):
    size: int  # file bytes
    kv_start: int  # first key/value pair
    ti_start: int  # first tensor info (= end of the key/value pairs)
    ti_end: int  # end of the last tensor info
    data_start: int  # start of the tensor data section
    data_end: int  # end of the last tensor's data
    kv: dict[str, tuple[int, int]]  # key -> (offset of its u32 value type, offset of its value)
    tensors: list[TensorInfo]


def layout(path: Path) -> Layout:
    """Where everything is in a good file, read with gguf-py's reader (an independent parser)."""
    r = gguf.GGUFReader(path)
    kv = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        type_pos = f.offset + 8 + len(name.encode())
        kv[name] = (type_pos, type_pos + 4)
    tensors = []
    for t in r.tensors:
        fo = t.field.offset
        n_dims_pos = fo + 8 + len(t.name.encode())
        dims = tuple(int(x) for x in t.field.parts[3])
        type_pos = n_dims_pos + 4 + 8 * len(dims)
        tensors.append(TensorInfo(t.name, n_dims_pos, n_dims_pos + 4, type_pos, type_pos + 4, dims,
                                  int(t.tensor_type), int(t.data_offset) - r.data_offset, int(t.n_bytes)))
    last = max(r.tensors, key=lambda t: t.field.offset)
    return Layout(
        size=path.stat().st_size, kv_start=24, ti_start=min(t.field.offset for t in r.tensors),
        ti_end=last.field.offset + sum(p.nbytes for p in last.field.parts), data_start=r.data_offset,
        data_end=max(int(t.data_offset) + int(t.n_bytes) for t in r.tensors), kv=kv, tensors=tensors,
    )


# --------------------------------------------------------------------------- mutations


class Mutation(NamedTuple):
    kind: str  # family, for the counts
    name: str  # this case
    patches: tuple[tuple[int, bytes], ...] = ()  # (file offset, new bytes)
    truncate: int | None = None  # keep this many bytes


def _u32(v: int) -> bytes:
    return struct.pack("<I", v % 2**32)


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v % 2**64)


def apply(data: bytes, m: Mutation) -> bytes:
    b = bytearray(data if m.truncate is None else data[: m.truncate])
    for pos, new in m.patches:
        b[pos:pos + len(new)] = new
    return bytes(b)


def invalid_mutations(lay: Layout) -> list[Mutation]:
    """Damage that makes the file invalid whatever else it holds; check() must reject every one."""
    out: list[Mutation] = []
    # Truncated anywhere before the end of the last tensor's data: the header, or some tensor, is cut.
    cuts = set(range(0, 25))
    for lo, hi, k in ((lay.kv_start, lay.ti_start, 16), (lay.ti_start, lay.ti_end, 16),
                      (lay.ti_end, lay.data_end, 12)):
        cuts.update(lo + (hi - lo) * i // k for i in range(k))
    cuts.update({lay.data_start, lay.data_end - 1})
    for n in sorted(cuts):
        region = ("header" if n < 24 else "kv" if n < lay.ti_start else "tensor-info" if n < lay.ti_end
                  else "tensor-data")
        out.append(Mutation(f"truncated in {region}", f"truncated at {n}", truncate=n))
    for magic in (b"GGUG", b"\0\0\0\0", b"FUGG", b"gguf"):
        out.append(Mutation("wrong magic", f"magic {magic!r}", ((0, magic),)))
    for v in (0, 1, 4, 0x03000000, 2**32 - 1):
        out.append(Mutation("wrong version", f"version {v}", ((4, _u32(v)),)))
    for v in (2**63, 2**64 - 1, 2**40, 10**6):
        out.append(Mutation("absurd count", f"n_tensors {v}", ((8, _u64(v)),)))
        out.append(Mutation("absurd count", f"n_kv {v}", ((16, _u64(v)),)))
    for v in (2**62, 2**64 - 1, lay.size):
        out.append(Mutation("huge string length", f"first key length {v}", ((lay.kv_start, _u64(v)),)))
    arch_type, arch_val = lay.kv["general.architecture"]
    out.append(Mutation("huge string length", "architecture length 2**40", ((arch_val, _u64(2**40)),)))
    out.append(Mutation("wrong architecture", "architecture 'llamb'", ((arch_val + 8 + 4, b"b"),)))
    out.append(Mutation("wrong architecture", "architecture as uint32", ((arch_type, _u32(4)),)))
    tok_type, tok_val = lay.kv["tokenizer.ggml.tokens"]  # an array of strings
    out.append(Mutation("huge array length", "tokens array length 2**60", ((tok_val + 4, _u64(2**60)),)))
    out.append(Mutation("bad value type", "tokens array of arrays", ((tok_val, _u32(9)),)))
    first_other = next(k for k in lay.kv if k != "general.architecture")
    for v in (13, 99, 2**32 - 1):
        out.append(Mutation("bad value type", f"{first_other} value type {v}", ((lay.kv[first_other][0], _u32(v)),)))
    quantized = next(t for t in lay.tensors if gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.ggml_type)][0] > 1
                     and len(t.dims) == 2)
    first = lay.tensors[0]
    for t in (first, quantized):
        for v in (0, 5, 9, 2**32 - 1):
            out.append(Mutation("bad n_dims", f"{t.name} n_dims {v}", ((t.n_dims_pos, _u32(v)),)))
        for v in (2**32 - 1, 4, 31, 200):  # 4 and 31: types removed from ggml
            out.append(Mutation("unknown tensor type", f"{t.name} type {v}", ((t.type_pos, _u32(v)),)))
        for v in (0, -1, -(2**63)):
            out.append(Mutation("bad dimension", f"{t.name} ne[0] = {v}", ((t.dims_pos, _u64(v)),)))
        out.append(Mutation("absurd dimension", f"{t.name} ne[0] = 2**40", ((t.dims_pos, _u64(2**40)),)))
        past = -(-(lay.size - lay.data_start) // 32) * 32
        out.append(Mutation("offset past the end", f"{t.name} offset {past}", ((t.offset_pos, _u64(past)),)))
        out.append(Mutation("offset past the end", f"{t.name} offset 2**64-32", ((t.offset_pos, _u64(2**64 - 32)),)))
        out.append(Mutation("misaligned offset", f"{t.name} offset +1", ((t.offset_pos, _u64(t.offset + 1)),)))
    q = quantized
    out.append(Mutation("absurd dimension", f"{q.name} ne[1] = 2**40", ((q.dims_pos + 8, _u64(2**40)),)))
    out.append(Mutation("bad dimension", f"{q.name} ne[0] not a multiple of the block",
                        ((q.dims_pos, _u64(q.dims[0] + 1)),)))
    other = next(t for t in lay.tensors if t.name != q.name and t.n_bytes)
    out.append(Mutation("overlapping tensors", f"{other.name} at {q.name}'s offset",
                        ((other.offset_pos, _u64(q.offset)),)))
    out.append(Mutation("huge string length", f"{q.name} name length 2**50",
                        ((q.n_dims_pos - 8 - len(q.name.encode()), _u64(2**50)),)))
    # two tensors of the same name (llama.cpp rejects it): rename one to a same-length neighbour
    same = [(a, b) for a in lay.tensors for b in lay.tensors if a.name != b.name and len(a.name) == len(b.name)]
    if same:
        a, b = same[0]
        out.append(Mutation("duplicate tensor", f"{b.name} renamed {a.name}",
                            ((b.n_dims_pos - len(b.name.encode()), a.name.encode()),)))
    return out


def random_flips(lay: Layout, n: int, seed: int = 1) -> list[Mutation]:
    """1 to 4 random bytes XORed with random values in the header and tensor infos: may leave a valid file."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        patches = []
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(0, lay.ti_end)
            patches.append((pos, bytes([rng.randrange(256)])))  # a new value (may equal the old one)
        out.append(Mutation("random flip", f"flip #{i}", tuple(patches)))
    return out


# --------------------------------------------------------------------------- the checker alone


def test_good_files_pass(tiny_file):
    for q in ("IQ3_M", "Q4_0", "Q4_K_M", "Q6_K", "Q8_0"):
        path = tiny_file(q)
        s = validate.check(path)
        r = gguf.GGUFReader(path)
        assert s.version == 3 and s.architecture == "llama" and s.file_bytes == path.stat().st_size
        assert s.n_tensors == len(r.tensors)
        assert s.n_kv == len([f for f in r.fields if not f.startswith("GGUF.")])
        assert s.tensor_bytes == sum(int(t.n_bytes) for t in r.tensors)
    assert validate.check(tiny_file("F16"), expect_arch=None).architecture == "llama"
    with pytest.raises(validate.InvalidGGUF, match="expected 'qwen2'"):
        validate.check(tiny_file("Q4_K_M"), expect_arch="qwen2")


def _mini(path: Path, arch: str | None = "llama", alignment: int | None = None, **kv) -> Path:
    """A two-tensor GGUF written by gguf-py, for the rules the tiny model's header does not exercise."""
    w = gguf.GGUFWriter(path, arch or "llama")
    if arch is None:
        del w.kv_data[0][gguf.Keys.General.ARCHITECTURE]
    if alignment:
        w.add_custom_alignment(alignment)
    for key, value in kv.items():
        w.add_uint64(key.replace("_", "."), value)
    w.add_tensor("a", np.ones((4, 64), np.float32))
    w.add_tensor("b", np.ones(32, np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_alignment_and_architecture_rules(tmp_path):
    s = validate.check(_mini(tmp_path / "a64.gguf", alignment=64))
    assert (s.n_tensors, s.n_kv, s.tensor_bytes) == (2, 2, 4 * 64 * 4 + 32 * 2)
    data = (tmp_path / "a64.gguf").read_bytes()
    _, value = layout(tmp_path / "a64.gguf").kv["general.alignment"]
    for bad in (0, 48):
        (tmp_path / "bad.gguf").write_bytes(apply(data, Mutation("", "", ((value, _u32(bad)),))))
        with pytest.raises(validate.InvalidGGUF, match=f"alignment {bad} is not a power of two"):
            validate.check(tmp_path / "bad.gguf")
    # llama.cpp reads general.alignment as uint32 and aborts on any other type
    with pytest.raises(validate.InvalidGGUF, match="general.alignment has value type 10"):
        validate.check(_mini(tmp_path / "u64.gguf", general_alignment=64))
    no_arch = _mini(tmp_path / "noarch.gguf", arch=None)
    with pytest.raises(validate.InvalidGGUF, match="general.architecture is none, expected 'llama'"):
        validate.check(no_arch)
    assert validate.check(no_arch, expect_arch=None).architecture is None
    with pytest.raises(validate.InvalidGGUF, match="not a GGUF file"):
        validate.check(_text_file(tmp_path))


def _text_file(tmp_path: Path) -> Path:
    p = tmp_path / "model.gguf"
    p.write_text("<!DOCTYPE html> a download that went wrong: an HTML error page saved as the model\n" * 4)
    return p


def header_heavy_gguf(path: Path) -> Path:
    """A GGUF with Llama 3.2 1B's full header weight (its 128,256-token vocabulary and as many merges) and one
    small tensor: what the header parser faces on the real file, in a few MB written in a second or two."""
    import gguf
    import numpy as np

    from harness.sources import synthetic

    arch = synthetic.ARCHS["llama-3.2-1b"]
    tok = synthetic.build_tokenizer(arch)
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_block_count(arch.n_layer)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.types)
    w.add_token_merges(tok.merges)
    w.add_array("tokenizer.ggml.extra_merges", tok.merges + tok.merges)  # as the real file's 280k merges
    w.add_tensor("output_norm.weight", np.ones(arch.n_embd, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_big_vocabulary_header_parses_in_little_memory(tmp_path):
    """The 1B file's header (128k tokens and as many merges; the real download has 280k) is read through a
    bounded window: the parser's memory stays small whatever the header's size. Its speed (milliseconds) is
    measured in benchmarks/timings.py, not asserted here."""
    path = header_heavy_gguf(tmp_path / "vocab.gguf")
    size = path.stat().st_size
    assert size > 6 << 20  # the header alone is several times the read window
    s = validate.check(path)
    assert s.n_tensors == 1 and s.architecture == "llama" and s.type_weights == {"F32": 2048}
    tracemalloc.start()
    validate.check(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < min(size // 2, 4 << 20), (peak, size)  # the 1 MiB read window plus small change


def test_fuzz_damaged_files(tiny_file, tmp_path, capsys):
    good = tiny_file("Q4_K_M")
    data = good.read_bytes()
    lay = layout(good)
    patched = tmp_path / "patched.gguf"  # a copy patched in place and restored, not 3 MB written per case
    patched.write_bytes(data)
    cut = tmp_path / "truncated.gguf"
    tried: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    slowest = 0.0

    def run(m: Mutation) -> str:
        nonlocal slowest
        if m.truncate is not None:
            cut.write_bytes(apply(data, m))
            path = cut
        else:
            path = patched
        fd = os.open(patched, os.O_WRONLY)
        try:
            for pos, new in m.patches:
                os.pwrite(fd, new, pos)
            t0 = time.perf_counter()
            try:
                validate.check(path)
                result = "accepted"
            except validate.InvalidGGUF as e:
                assert "\n" not in str(e) and str(e), m.name
                result = "rejected"
            slowest = max(slowest, time.perf_counter() - t0)
        finally:
            for pos, new in reversed(m.patches):
                os.pwrite(fd, data[pos:pos + len(new)], pos)
            os.close(fd)
        tried[m.kind] += 1
        outcomes[result] += 1
        return result

    must_fail = invalid_mutations(lay)
    for m in must_fail:
        assert run(m) == "rejected", f"{m.name}: accepted"
    # memory stays small on the worst of them (absurd counts and lengths allocate nothing)
    path = tmp_path / "damaged.gguf"
    for m in must_fail[-12:] + [x for x in must_fail if x.kind in ("absurd count", "huge string length")]:
        path.write_bytes(apply(data, m))
        tracemalloc.start()
        with pytest.raises(validate.InvalidGGUF):
            validate.check(path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 4 << 20, (m.name, peak)
    flips = Counter()
    for m in random_flips(lay, 400):
        flips[run(m)] += 1  # any exception other than InvalidGGUF fails the test here
    assert slowest < 1.0, f"slowest check took {slowest:.2f} s"
    with capsys.disabled():
        print(f"\nfuzz: {sum(tried.values())} damaged files checked; {outcomes['rejected']} rejected, "
              f"{outcomes['accepted']} accepted (random flips only: {dict(flips)}); slowest {slowest * 1e3:.1f} ms")
        print("  kinds: " + ", ".join(f"{k} {n}" for k, n in sorted(tried.items())))


# --------------------------------------------------------------------------- through the measuring child


def _smoke(cache: Path, **over) -> dict:
    d = json.loads(json.dumps(SMOKE))
    d["cache_dir"] = str(cache)
    d.update({k: v for k, v in over.items() if k != "bench"})
    d["bench"].update(over.get("bench", {}))
    return d


def _same_length_tokens(data: bytes, lay: Layout) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    """Two neighbouring vocabulary entries of equal length, as (file offset of the text, text)."""
    _, val = lay.kv["tokenizer.ggml.tokens"]
    (n,) = struct.unpack_from("<Q", data, val + 4)
    pos, toks = val + 12, []
    for _ in range(n):
        (length,) = struct.unpack_from("<Q", data, pos)
        toks.append((pos + 8, data[pos + 8:pos + 8 + length]))
        pos += 8 + length
    return next((x, y) for x, y in zip(toks[300:], toks[301:], strict=False) if len(x[1]) == len(y[1]) != 0
                and x[1] != y[1])


def child_job(cfg: config.Config, path: Path, logs: Path, quant: str = "Q4_K_M") -> dict:
    """The job Runner.run sends to harness.measure.worker for one file."""
    base = {"run_id": "test", "quant": quant, "weights": "local", "weights_ref": str(path), "file_path": str(path),
            "file_bytes": path.stat().st_size, "file_sha256": sha256_file(path), "llama_cpp_version": "0.3.36"}
    return worker.make_job(path, runner.resolved_bench(cfg), base, logs / f"{path.stem}.llama.log")


def test_damaged_files_never_reach_llama_cpp(tiny_cache, tiny_file, tmp_path, capsys):
    good = tiny_file("Q4_K_M")
    data = good.read_bytes()
    lay = layout(good)
    by_kind: dict[str, list[Mutation]] = {}
    for m in invalid_mutations(lay):
        by_kind.setdefault(m.kind, []).append(m)
    # one of each kind, and a second truncation of each region: 20+ files in all
    chosen = [ms[0] for ms in by_kind.values()] + [ms[-1] for k, ms in by_kind.items() if k.startswith("trunc")]
    assert len(chosen) >= 20
    files = tmp_path / "files"
    logs = tmp_path / "logs"
    files.mkdir()
    logs.mkdir()
    paths = []
    for i, m in enumerate(chosen):
        p = files / f"damaged{i:02d}.gguf"
        p.write_bytes(apply(data, m))
        paths.append((m, p))
    # Valid GGUF that llama.cpp cannot take: a token renamed to its neighbour's text. The vocabulary loader
    # asserts (SIGABRT); the child dies alone and the reason is its assertion line.
    a, b = _same_length_tokens(data, lay)
    dup = files / "duplicate-token.gguf"
    dup.write_bytes(apply(data, Mutation("semantic", "duplicate token", ((b[0], a[1]),))))
    assert validate.check(dup).architecture == "llama"
    cfg = config.from_dict(_smoke(tiny_cache, bench={"threads": 1}))

    def measure(p: Path) -> tuple[runner.ChildResult, list[dict], float]:
        recs: list[dict] = []
        t0 = time.monotonic()
        res = runner.measure_in_child(child_job(cfg, p, logs), 60, recs.append, lambda s: None,
                                      logs / f"{p.stem}.stderr")
        return res, recs, time.monotonic() - t0

    with ThreadPoolExecutor(max_workers=2) as pool:
        good_future = pool.submit(measure, good)
        dup_future = pool.submit(measure, dup)
        results = list(pool.map(measure, [p for _, p in paths]))
        good_res, good_recs, _ = good_future.result()
    outcomes = Counter()
    for (m, p), (res, recs, took) in zip(paths, results, strict=True):
        assert res.error and res.error.startswith("invalid GGUF, not loaded: "), (m.name, res.error)
        assert res.n_records == 0 and recs == [], m.name
        assert took < 30, (m.name, took)
        assert not (logs / f"{p.stem}.llama.log").exists() or "llama_model_load" not in \
            (logs / f"{p.stem}.llama.log").read_text()
        outcomes["invalid GGUF"] += 1
    assert good_res.error is None and good_res.n_records == 4
    dup_res = dup_future.result()[0]
    assert dup_res.error.startswith("measuring process died of SIGABRT (llama.cpp aborted); last stderr line: ")
    assert dup_res.error.endswith("GGML_ASSERT(id_to_token.size() == token_to_id.size()) failed")
    assert {r["status"] for r in good_recs} == {"ok"}
    with capsys.disabled():
        print(f"\nchild: {len(paths)} damaged files + 1 good file + 1 llama.cpp-aborting file in child processes; "
              f"{outcomes['invalid GGUF']} rejected as invalid GGUF, good file: {good_res.n_records} ok records, "
              f"aborting file: {dup_res.error[:60]}...")


def test_sweep_with_one_damaged_quant(tiny_cache, tiny_file, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for q in ("Q4_K_M", "Q6_K"):
        (models / f"{q}.gguf").write_bytes(tiny_file(q).read_bytes())
    q8 = tiny_file("Q8_0")
    lay = layout(q8)
    t = lay.tensors[len(lay.tensors) // 2]
    damage = Mutation("bad n_dims", "n_dims 9", ((t.n_dims_pos, _u32(9)),))
    (models / "Q8_0.gguf").write_bytes(apply(q8.read_bytes(), damage))
    d = _smoke(tiny_cache, model={"source": "local", "path": str(models / "{quant}.gguf")},
               quants=["Q4_K_M", "Q8_0", "Q6_K"])
    cfg_path = tmp_path / "local.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    out = tmp_path / "out"
    r = run_cli("run", str(cfg_path), "--out", str(out), "--no-progress", "--no-report", timeout=300)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    by = {}
    for rec in schema.read_records(out / "records.jsonl"):
        by.setdefault(rec.quant, []).append(rec)
    assert [x.status for x in by["Q8_0"]] == ["error"]
    assert by["Q8_0"][0].error == f"invalid GGUF, not loaded: tensor {t.name!r} has 9 dimensions (1 to 4 allowed)"
    n = 2 * SMOKE["bench"]["repetitions"]
    for q in ("Q4_K_M", "Q6_K"):
        assert [x.status for x in by[q]] == ["ok"] * n
    assert "Q8_0: invalid GGUF, not loaded" in r.stdout


# --------------------------------------------------------------------------- kill -9, Ctrl-C


def _start_run(cfg_path: Path, out: Path, log_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "harness", "run", str(cfg_path), "--out", str(out), "--no-progress", "--no-report"],
        cwd=REPO, start_new_session=True, stdout=open(log_dir / "stdout", "wb"),  # noqa: SIM115
        stderr=open(log_dir / "stderr", "wb"),  # noqa: SIM115
    )


def _ok_lines(path: Path) -> int:
    try:
        return sum('"status": "ok"' in line for line in path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def _workers(pid: int) -> set[int]:
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return set()
    out = set()
    for k in kids:
        try:
            if "harness.measure.worker" in " ".join(k.cmdline()):
                out.add(k.pid)
        except psutil.Error:
            pass
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_records(proc: subprocess.Popen, rec_path: Path, at_least: int, below: int, timeout: float = 120):
    """Poll until records.jsonl holds at_least..below-1 ok records; return the workers seen meanwhile."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen |= _workers(proc.pid)
        n = _ok_lines(rec_path)
        if n >= at_least:
            assert n < below, f"the run finished ({n} records) before it could be interrupted"
            return seen
        assert proc.poll() is None, "the run ended early"
        time.sleep(0.02)
    raise AssertionError("no records appeared in time")


FOUR = ["IQ3_M", "Q4_0", "Q4_K_M", "Q8_0"]


@pytest.mark.slow
def test_kill9_then_resume(tiny_cache, tmp_path):
    d = _smoke(tiny_cache, quants=FOUR, bench={"repetitions": 2})
    cfg_path = tmp_path / "smoke4.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    out = tmp_path / "out"
    rec_path = out / "records.jsonl"
    want = {(q, t, 0, rep) for q in FOUR for t in ("pp", "tg") for rep in range(2)}
    proc = _start_run(cfg_path, out, tmp_path)
    try:
        workers = _wait_records(proc, rec_path, 1, len(want))
        workers |= _workers(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    before = rec_path.read_text()
    n_killed = _ok_lines(rec_path)
    assert 1 <= n_killed < len(want)
    print(f"\nkill -9 after {n_killed} of {len(want)} records")
    # a torn last record, as a kill in the middle of a write would leave
    last = before.splitlines()[-1]
    with open(rec_path, "a") as f:
        f.write(last[: len(last) // 2])
    # the measuring child does not outlive its parent (it would compete with the resumed run for the CPU)
    deadline = time.monotonic() + 10
    while _alive(workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(workers)

    r = run_cli("run", str(cfg_path), "--resume", str(out), "--no-progress", "--no-report", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    after = rec_path.read_text()
    assert after.startswith(before)  # nothing measured before the kill was lost or rewritten
    recs = schema.read_records(rec_path)
    cells = [(x.quant, x.test, x.n_depth, x.rep) for x in recs if x.status == "ok"]
    assert len(cells) == len(set(cells)), "a cell was measured twice"
    assert set(cells) == want
    assert all(x.status == "ok" for x in recs)


_PARENT = """
import json, sys
from pathlib import Path
from harness.measure import runner
runner.measure_in_child(json.loads(sys.argv[1]), 600, lambda r: None, lambda m: print(m, flush=True),
                        Path(sys.argv[2]))
"""


def test_worker_dies_with_its_parent(tiny_cache, tiny_file, tmp_path):
    """SIGKILL of the sweep while its child is deep in llama_decode (a long untimed depth pre-fill, during
    which it sends nothing): the child is killed at once, not left measuring beside a resumed run."""
    cfg = config.from_dict(_smoke(tiny_cache, bench={"depths": [32768], "n_gen": 0, "repetitions": 1,
                                                     "threads": 1}))
    job = child_job(cfg, tiny_file("Q4_K_M"), tmp_path)
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, json.dumps(job), str(tmp_path / "stderr")], cwd=REPO,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    workers: set[int] = set()
    try:
        assert parent.stdout is not None
        for line in parent.stdout:  # "pp64@d32768 warm-up": the pre-fill of 32k tokens comes next
            if "warm-up" in line:
                break
        workers = _workers(parent.pid)
        assert len(workers) == 1
        time.sleep(0.5)
        assert _alive(workers), "the pre-fill ended too soon for this test"
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
        t0 = time.monotonic()
        while _alive(workers) and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        assert not _alive(workers), "the measuring process outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in _alive(workers):
            os.kill(pid, signal.SIGKILL)


def test_ctrl_c_exits_130_and_leaves_nothing_running(tiny_cache, tmp_path):
    d = _smoke(tiny_cache, quants=FOUR, bench={"repetitions": 2})
    cfg_path = tmp_path / "smoke4.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    out = tmp_path / "out"
    proc = _start_run(cfg_path, out, tmp_path)
    try:
        workers = _wait_records(proc, out / "records.jsonl", 1, 16)
        workers |= _workers(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert rc == 130, stderr
    assert "Traceback" not in stderr
    assert "--resume" in stderr and "interrupted" in stderr
    recs = schema.read_records(out / "records.jsonl")
    assert recs and all(x.status == "ok" for x in recs)
    assert workers, "no measuring process was seen"
    assert not _alive(workers)
    orphans = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
        if p.info["ppid"] == proc.pid and "harness.measure.worker" in " ".join(p.info["cmdline"] or []):
            orphans.append(p.info["pid"])
    assert orphans == []


# --------------------------------------------------------------------------- folders


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_unwritable_output_folder(tiny_cache, tmp_path):
    cfg_path = tmp_path / "smoke.yaml"
    cfg_path.write_text(yaml.safe_dump(_smoke(tiny_cache, quants=["Q4_K_M"])))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = _one_error_line(run_cli("run", str(cfg_path), "--out", str(blocker / "run"), "--no-progress"))
    assert str(blocker) in line and "not a folder" in line
    line = _one_error_line(run_cli("run", str(cfg_path), "--out", str(blocker / "deeper" / "run"), "--no-progress"))
    assert str(blocker) in line and "Not a directory" in line


def test_resume_of_a_folder_without_records(tiny_cache, tmp_path):
    cfg_path = tmp_path / "smoke.yaml"
    cfg_path.write_text(yaml.safe_dump(_smoke(tiny_cache, quants=["Q4_K_M"])))
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "missing"):
        line = _one_error_line(run_cli("run", str(cfg_path), "--resume", str(folder), "--no-progress"))
        assert str(folder) in line and "no records.jsonl" in line


# --------------------------------------------------------------------------- memory limit

# Calibrated on 2 threads: the child (Python, numpy, llama.cpp, the tiny model, 2 OpenMP threads and their
# malloc arenas) peaks at ~340 MB of address space; below ~220 MB libgomp cannot even start its threads.
# 1 GB leaves room for other libraries and machines, and a 1.5 GB KV cache cannot fit under it.
LIMIT_MB = 1024
BIG_DEPTH = 786_432  # tokens: the tiny model's KV cache is 2 KiB/token (8 layers x 1 KV head x 64 x f16 x K,V)

_CONTEXT_ONLY = """
import json, sys
from harness.measure import bench
from harness.measure import worker
from harness.llamalog import LogCapture
path, limit, n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
worker._limit_memory(limit or None)
b = {"n_gpu_layers": 0, "seed": 0, "n_batch": 64, "n_ubatch": 64, "threads": 2, "flash_attn": "auto"}
with LogCapture() as cap:
    s = bench.Session(path, b, cap)
    try:
        ctx, log = s.context(bench.Test("pp", n_ctx, 0, 0))
        print(json.dumps({"ok": True, "kv_bytes": sum(bench.parse_buffers(log).kv.values())}))
        s.lib.llama_free(ctx)
    except bench.BenchError as e:
        print(json.dumps({"ok": False, "error": str(e)}))
    s.free()
"""


def test_memory_limit_is_an_error_record_and_the_sweep_goes_on(tiny_cache, tiny_file, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")  # numpy's thread pool would grow with the machine's cores
    # The same context, created alone: fits without the limit, not under it. So the error below is the limit's.
    n_ctx = 64 + BIG_DEPTH
    got = {}
    for limit in (0, LIMIT_MB):
        r = subprocess.run([sys.executable, "-c", _CONTEXT_ONLY, str(tiny_file("Q4_K_M")), str(limit), str(n_ctx)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        got[limit] = json.loads(r.stdout.strip().splitlines()[-1])
    assert got[0]["ok"] and got[0]["kv_bytes"] >= 2048 * n_ctx > LIMIT_MB << 20, got[0]
    assert not got[LIMIT_MB]["ok"] and "kv cache" in got[LIMIT_MB]["error"], got[LIMIT_MB]

    d = _smoke(tiny_cache, quants=["Q4_K_M", "Q8_0"],
               bench={"depths": [0, BIG_DEPTH], "repetitions": 1, "threads": 2, "memory_limit_mb": LIMIT_MB})
    lines: list[str] = []
    run_dir, errors = runner.run(config.from_dict(d), out=tmp_path / "out", progress=False, echo=lines.append)
    recs = schema.read_records(run_dir / "records.jsonl")
    for q in ("Q4_K_M", "Q8_0"):  # both quants measured: the first one's failure did not end the sweep
        mine = [x for x in recs if x.quant == q]
        assert [(x.status, x.test, x.n_depth) for x in mine] == [("ok", "pp", 0), ("ok", "tg", 0),
                                                                  ("error", None, None)]
        err = mine[-1].error
        assert err == errors[q]
        assert f"failed to create a context of {n_ctx} tokens" in err
        assert f"bench.memory_limit_mb = {LIMIT_MB} MB" in err
        assert "\n" not in err
    assert any("Q8_0" in x and "done" not in x and "ERROR" in x for x in lines)
