"""Measurement through the real llama.cpp on tiny shape-faithful models, in child processes."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml
from conftest import REPO, run_cli

from harness import config, schema
from harness.measure import memory, runner
from harness.sources import synthetic
from harness.sources.base import sha256_file

SMOKE = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())


def smoke_cfg(cache, **bench):
    d = json.loads(json.dumps(SMOKE))
    d["cache_dir"] = str(cache)
    d["quants"] = ["IQ3_M", "Q4_K_M", "Q8_0"]
    d["bench"].update(bench)
    return config.from_dict(d)


@pytest.fixture(scope="module")
def measured(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "run"
    cfg = smoke_cfg(tiny_cache, depths=[0, 32])
    run_dir, errors = runner.run(cfg, out=out, progress=False, echo=lambda s: None)
    return cfg, run_dir, errors, schema.read_records(run_dir / "records.jsonl")


def test_every_cell_measured_ok(measured):
    cfg, run_dir, errors, recs = measured
    assert errors == {}
    cells = sorted((r.quant, r.test, r.n_depth, r.rep) for r in recs)
    want = sorted((q, t, d, rep) for q in cfg.quants for t in ("pp", "tg") for d in (0, 32)
                  for rep in range(cfg.bench.repetitions))
    assert cells == want
    assert all(r.status == "ok" for r in recs)


def test_records_carry_measurements_and_memory(measured, tiny_file):
    cfg, run_dir, errors, recs = measured
    tiny = synthetic.ARCHS["tiny"]
    for r in recs:
        assert r.tokens_per_s > 0 and r.wall_ns > 0
        assert r.tokens_per_s == pytest.approx((r.n_prompt + r.n_gen) * 1e9 / r.wall_ns)
        assert r.weights == "synthetic" and r.weights_ref == "tiny seed=0 imatrix=uniform blocks=tiled"
        assert r.model_n_params == tiny.n_params()
        assert r.file_sha256 == sha256_file(tiny_file(r.quant))
        assert r.file_bytes == tiny_file(r.quant).stat().st_size
        assert r.device == "cpu" and r.gpu_name is None and r.gpu_used_peak_bytes is None
        assert r.weights_bytes > 0 and r.weights_bytes == sum(r.model_buffers.values())
        assert r.kv_bytes > 0 and r.compute_bytes > 0
        assert r.output_bytes == 0  # 512 logits x 4 bytes: 0.00 MiB at the log's 2-decimal resolution
        assert r.rss_peak_bytes >= r.rss_after_load_bytes > r.rss_before_load_bytes > 0
        assert r.n_ctx == r.n_prompt + r.n_gen + r.n_depth
        assert r.n_threads >= 1 and r.load_ns > 0
    # the KV cache of a deeper context is bigger: the buffer fields follow the context, not the model
    kv = {(r.test, r.n_depth): r.kv_bytes for r in recs if r.quant == "Q8_0"}
    assert kv[("tg", 32)] >= kv[("tg", 0)]
    # llama.cpp's weight buffers are at least the tensors' bytes
    for r in recs:
        assert r.weights_bytes >= r.model_size_bytes * 0.99


def test_kv_cache_matches_shapes(measured):
    """KV bytes = 2 (K,V) x layers x kv heads x head dim x 2 bytes (f16) x context, padded by llama.cpp."""
    cfg, run_dir, errors, recs = measured
    t = synthetic.ARCHS["tiny"]
    per_token = 2 * t.n_layer * t.n_head_kv * t.head_dim * 2
    for r in recs:
        assert r.kv_bytes >= per_token * r.n_ctx
        assert r.kv_bytes <= per_token * (r.n_ctx + 512)  # padding stays small


def test_run_folder_has_provenance(measured):
    cfg, run_dir, errors, recs = measured
    env = json.loads((run_dir / "env.json").read_text())
    assert env["llama"]["llama_cpp_python"] == "0.3.36"
    assert "AVX" in env["llama"]["system_info"] or "NEON" in env["llama"]["system_info"]
    assert env["cpu"]["logical_cores"] >= 1 and env["ram_bytes"] > 0
    # the host's GPU as NVML names it (None without a driver): provenance, never this CPU run's device
    nv = memory.nvml_probe()
    assert env["gpu"] == (nv.info() if nv else None)
    assert env["harness"]["commit"] is None or len(env["harness"]["commit"]) == 40
    resolved = config.load(run_dir / "config.resolved.yaml")
    assert resolved == cfg
    assert (run_dir / "logs" / "Q8_0.llama.log").read_text().count("model buffer size") >= 1


def test_failing_files_become_error_records(tiny_file, tmp_path):
    """A truncated file, a file that is not there: error records; the good quants are still measured."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_file("Q4_K_M"), models / "Q4_K_M.gguf")
    data = tiny_file("Q8_0").read_bytes()
    (models / "Q8_0.gguf").write_bytes(data[: len(data) // 2])  # tensor data runs past the end
    d = json.loads(json.dumps(SMOKE))
    d["model"] = {"source": "local", "path": str(models / "{quant}.gguf")}
    d["quants"] = ["Q8_0", "Q6_K", "Q4_K_M"]
    cfg_path = tmp_path / "local.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    out = tmp_path / "out"
    r = run_cli("run", str(cfg_path), "--out", str(out), "--no-progress", "--no-report")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    recs = schema.read_records(out / "records.jsonl")
    by = {}
    for rec in recs:
        by.setdefault(rec.quant, []).append(rec)
    assert [x.status for x in by["Q8_0"]] == ["error"]
    assert "load" in by["Q8_0"][0].error
    assert [x.status for x in by["Q6_K"]] == ["error"] and "not found" in by["Q6_K"][0].error
    assert {x.status for x in by["Q4_K_M"]} == {"ok"} and len(by["Q4_K_M"]) == 2 * SMOKE["bench"]["repetitions"]
    assert str(out) in r.stdout.strip().splitlines()[-1]  # last line: the results folder


def test_hang_becomes_timeout_error(tiny_cache, tmp_path):
    # a 64K-token pre-fill takes far longer than the limit: the child is killed, the sweep goes on
    cfg = smoke_cfg(tiny_cache, timeout_s=3, depths=[65536])
    cfg = config.from_dict({**cfg.to_dict(), "quants": ["Q4_K_M"]})
    run_dir, errors = runner.run(cfg, out=tmp_path / "out", progress=False, echo=lambda s: None)
    assert "timed out after 3 s" in errors["Q4_K_M"]
    recs = schema.read_records(run_dir / "records.jsonl")
    assert recs[-1].status == "error" and "timed out" in recs[-1].error


def test_results_are_never_overwritten(measured):
    cfg, run_dir, errors, recs = measured
    with pytest.raises(runner.RunError, match="never overwritten"):
        runner.run(cfg, out=run_dir, progress=False)


def test_memory_test_kv_buffers_match_the_arithmetic(tiny_cache, tmp_path):
    """bench.contexts: llama.cpp's own KV buffer, for every cache type and size, equals
    2 (K and V) x layers x KV heads x head size x bytes per element x cells (the context rounded up to 256
    cells), with ggml's block sizes: f16 2 bytes, q8_0 34 per 32, q4_0 18 per 32. V quantized without flash
    attention is an error cell, and the sweep goes on."""
    arch = synthetic.ARCHS["tiny"]
    cfg = smoke_cfg(tiny_cache, n_prompt=0, n_gen=16, repetitions=1, contexts=[16, 300, 4096],
                    cache_type_k=["f16", "q8_0", "q4_0"], cache_type_v=["f16", "q4_0"],
                    context_flash_attn=["on", "off"])
    cfg = config.from_dict({**cfg.to_dict(), "quants": ["Q4_K_M"], "probes": False})
    run_dir, errors = runner.run(cfg, out=tmp_path / "run", progress=False, echo=lambda s: None)
    assert errors == {}
    mem = schema.read_records(run_dir / "contexts.jsonl")
    assert len(mem) == 3 * 3 * 2 * 2 and all(r.test == "mem" for r in mem)
    per_elem = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
    for r in mem:
        if r.cache_type_v != "f16" and r.flash_attn == "off":
            assert r.status == "error" and "failed to create a context" in r.error, r
            continue
        assert r.status == "ok", r.error
        cells = -(-r.n_ctx // 256) * 256
        half = arch.n_layer * arch.n_head_kv * arch.head_dim * cells
        want = half * (per_elem[r.cache_type_k] + per_elem[r.cache_type_v])
        assert abs(r.kv_bytes - want) <= 2 * 5 * 1024, (r.n_ctx, r.cache_type_k, r.cache_type_v, r.kv_bytes, want)
        assert r.compute_bytes > 0 and r.rss_bytes > 0
    # the pp/tg records ran with the first KV types and say so
    recs = schema.read_records(run_dir / "records.jsonl")
    assert {(r.cache_type_k, r.cache_type_v) for r in recs} == {("f16", "f16")}


def test_kv_bytes_per_token_of_the_1b():
    from harness.analysis import points

    assert points.kv_bytes_per_token() == 32 * 1024  # 2 x 16 layers x 8 KV heads x 64 x 2 bytes (f16)


def test_a_run_whose_every_file_failed_ends_with_its_table_not_a_traceback(tmp_path):
    for q in ("Q4_K_M", "Q8_0"):
        (tmp_path / f"{q}.gguf").write_bytes(b"GGUF" + b"\0" * 60)  # a header cut short: refused by validation
    cfg = tmp_path / "broken.yaml"
    model = {"source": "local", "path": str(tmp_path / "{quant}.gguf")}
    cfg.write_text(yaml.safe_dump({"name": "broken", "model": model,
                                   "quants": ["Q4_K_M", "Q8_0"], "probes": False,
                                   "bench": {"n_prompt": 16, "n_gen": 4, "repetitions": 1}}))
    r = run_cli("run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", timeout=300)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stdout.count("invalid GGUF, not loaded") >= 2 and "Q8_0" in r.stdout
    assert (tmp_path / "run" / "records.jsonl").is_file()


def test_each_round_visits_in_a_new_seeded_order_and_a_resume_keeps_it(tiny_cache, tmp_path):
    cfg = smoke_cfg(tiny_cache, repetitions=4, rounds=2, n_prompt=16, n_gen=4)
    cfg = config.from_dict({**cfg.to_dict(), "quants": ["IQ3_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q8_0"],
                            "probes": False})
    orders = [runner.visit_order(cfg.quants, 42, r) for r in range(2)]
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(cfg.quants)
    assert runner.visit_order(cfg.quants, 42, 0) == orders[0]  # seeded: the same on every call
    assert runner.visit_order(cfg.quants, 42, 0, shuffle=False) == list(cfg.quants)
    run_dir, errors = runner.run(cfg, out=tmp_path / "run", progress=False, echo=lambda s: None)
    assert errors == {}
    recs = schema.read_records(run_dir / "records.jsonl")
    for rnd in (1, 2):
        seen = [r.quant for r in recs if r.extra["visit"]["round"] == rnd]
        assert list(dict.fromkeys(seen)) == orders[rnd - 1]  # measured in that round's order, recorded
        assert all(r.extra["visit"]["order"] == orders[rnd - 1] for r in recs if r.extra["visit"]["round"] == rnd)
    # cut the run in the middle of round 2 and resume: the rest is measured in the same order, nothing twice
    lines = (run_dir / "records.jsonl").read_text().splitlines()
    keep = len(lines) * 3 // 4
    (run_dir / "records.jsonl").write_text("\n".join(lines[:keep]) + "\n")
    runner.run(cfg, resume=run_dir, progress=False, echo=lambda s: None)
    again = schema.read_records(run_dir / "records.jsonl")
    assert sorted((r.quant, r.test, r.rep) for r in again) == sorted((r.quant, r.test, r.rep) for r in recs)
    resumed = [r.quant for r in again[keep:]]
    assert list(dict.fromkeys(resumed)) == [q for q in orders[1] if q in set(resumed)]


def test_nothing_is_written_beside_the_users_files_and_results_go_under_the_current_directory(tmp_path,
                                                                                               monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    f = models / "m.gguf"
    f.write_bytes(b"x" * 1000)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    first = sha256_file(f)
    assert sha256_file(f) == first and sorted(p.name for p in models.iterdir()) == ["m.gguf"]
    assert any((tmp_path / "cache" / "sha256").iterdir())  # remembered in the cache instead
    f.write_bytes(b"y" * 1000)  # changed: hashed again
    assert sha256_file(f) != first
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HARNESS_RESULTS", raising=False)
    assert runner.default_results() == tmp_path / "results"
    monkeypatch.setenv("HARNESS_RESULTS", str(tmp_path / "elsewhere"))
    assert runner.default_results() == tmp_path / "elsewhere"


def test_run_a_single_file_by_model_any_label(tiny_cache, tmp_path):
    """`run --model FILE` measures a file the user has, labelled by the quant its header names; nothing is
    written beside it, the results go under the current directory, the page's verdicts stay out (not the 1B)."""
    src = tiny_cache / "synthetic"
    f = next(p for p in src.rglob("tiny-Q4_K_M-imatrix.gguf"))
    mine = tmp_path / "my models"
    mine.mkdir()
    (mine / "some-name.gguf").write_bytes(f.read_bytes())
    r = run_cli("run", "--model", str(mine / "some-name.gguf"), "--repetitions", "1", "--no-progress",
                "--out", str(tmp_path / "res" / "run"), timeout=600,
                env={"HARNESS_CACHE": str(tmp_path / "cache"), "HARNESS_REPORTS": str(tmp_path / "reports")})
    assert r.returncode == 0, r.stderr
    assert "some-name.gguf: Q4_K_M (from general.file_type)" in r.stderr
    recs = schema.read_records(tmp_path / "res" / "run" / "records.jsonl")
    assert {x.quant for x in recs} == {"Q4_K_M"} and all(x.weights == "local" for x in recs)
    assert sorted(p.name for p in mine.iterdir()) == ["some-name.gguf"]  # no .sha256 beside it
    md = (tmp_path / "res" / "run" / "report" / "report.md").read_text()
    assert "The page covers Llama 3.2 1B only" in md and "inside (" not in md


def test_local_files_config():
    cfg = config.from_dict({"name": "x", "model": {"source": "local", "files": {"Q4_1": "a.gguf", "mine": "b.gguf"}}})
    assert cfg.quants == ("Q4_1", "mine") and cfg.model.files == {"Q4_1": "a.gguf", "mine": "b.gguf"}
    with pytest.raises(config.ConfigError, match="exclude each other"):
        config.from_dict({"name": "x", "model": {"source": "local", "files": {"a": "a"}, "path": "{quant}.gguf"}})
    with pytest.raises(config.ConfigError, match="not labels of model.files"):
        config.from_dict({"name": "x", "quants": ["Q8_0"], "model": {"source": "local", "files": {"a": "a"}}})


def test_a_glob_of_files_each_labelled_by_its_header(tiny_file, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    for q in ("Q8_0", "Q4_K_M"):
        (d / f"model-{q.lower()}.gguf").write_bytes(tiny_file(q).read_bytes())
    cfg = config.from_dict({"name": "g", "model": {"source": "local", "path": str(d / "*.gguf")}, "probes": False,
                            "bench": {"n_prompt": 16, "n_gen": 4, "repetitions": 1}})
    labelled = runner.label_globbed(cfg)
    assert set(labelled.quants) == {"Q8_0", "Q4_K_M"}
    assert labelled.model.files["Q8_0"].endswith("model-q8_0.gguf")
    with pytest.raises(config.ConfigError, match="matches no file"):
        config.from_dict({"name": "g", "model": {"source": "local", "path": str(d / "*.none")}})


@pytest.mark.slow
def test_a_non_editable_install_writes_under_the_current_directory(tiny_file, tmp_path):
    """`pip install .` (not editable) run from another folder: results and reports land under that folder,
    never inside the installed package."""
    import subprocess
    import sys

    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(site), str(REPO)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HARNESS_CACHE": str(tmp_path / "cache")}
    env.pop("HARNESS_RESULTS", None)
    env.pop("HARNESS_REPORTS", None)
    probe = subprocess.run([sys.executable, "-c", "import harness; print(harness.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True)
    assert probe.stdout.startswith(str(site)), probe.stdout + probe.stderr  # the installed copy, not the checkout
    r = subprocess.run([sys.executable, "-m", "harness", "run", "--model", str(tiny_file("Q8_0")), "--repetitions",
                        "1", "--no-progress"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list((work / "results").iterdir())
    assert len(runs) == 1 and (runs[0] / "records.jsonl").is_file()
    assert (work / "reports" / runs[0].name / "report.md").is_file()
    assert not list(site.rglob("records.jsonl")) and not (site / "results").exists()


def test_a_resume_makes_only_the_memory_test_cells_that_are_missing(tiny_cache, tmp_path):
    cfg = smoke_cfg(tiny_cache, repetitions=1, n_prompt=16, n_gen=4, contexts=[512, 1024], cache_type_k=["f16", "q8_0"])
    cfg = config.from_dict({**cfg.to_dict(), "quants": ["Q4_K_M"], "probes": False})
    run_dir, _ = runner.run(cfg, out=tmp_path / "run", progress=False, echo=lambda s: None)
    path = run_dir / "contexts.jsonl"
    full = path.read_text().splitlines()
    assert len(full) == 4
    path.write_text("\n".join(full[:1]) + "\n")
    runner.run(cfg, resume=run_dir, progress=False, echo=lambda s: None)
    again = schema.read_records(path)
    key = sorted((r.n_ctx, r.cache_type_k) for r in again)
    assert key == [(512, "f16"), (512, "q8_0"), (1024, "f16"), (1024, "q8_0")]  # each once, none twice


def test_two_models_of_one_quant_are_probed_and_costed_apart(tiny_file, tmp_path):
    """Two files of one quant but different layer shapes (a run of two models): each gets its own Q8_0 probe
    in the same round, each keeps its file name as label, and the probe costs stay apart, so the probe models
    (which need one shape) are left out with the reason, never costed with the other model's probe."""
    import pandas as pd

    from harness.analysis import kernels
    from harness.sources import quantize, synthetic

    wide = synthetic.ARCHS["tiny"]._replace(name="tiny-wide", n_embd=512, n_ff=1024)
    f16 = tmp_path / "wide-f16.gguf"
    synthetic.write_f16(wide, f16, seed=1)
    other = tmp_path / "wide-q8_0.gguf"
    quantize.quantize_pure(f16, other, "LLAMA_FTYPE_MOSTLY_Q8_0", label="wide")
    mine = tmp_path / "narrow-q8_0.gguf"
    mine.write_bytes(tiny_file("Q8_0").read_bytes())
    out = tmp_path / "res" / "run"
    r = run_cli("run", "--model", str(mine), "--model", str(other), "--repetitions", "1", "--no-progress",
                "--out", str(out), timeout=600,
                env={"HARNESS_CACHE": str(tmp_path / "cache"), "HARNESS_REPORTS": str(tmp_path / "reports")})
    assert r.returncode == 0, r.stderr
    recs = schema.read_records(out / "records.jsonl")
    assert {x.quant for x in recs} == {"narrow-q8_0", "wide-q8_0"}
    probes = pd.read_json(out / "probes.jsonl", lines=True)
    main = probes[probes.quant == "Q8_0"]
    assert len({kernels.shape_key(e) for e in main.extra}) == 2  # one probe per shape, not one for both
    costs = kernels.costs(probes)
    assert set(costs) == {"Q8_0 (llama 256/4/1)", "Q8_0 (llama 512/4/1)"}
    wide_probe = costs["Q8_0 (llama 512/4/1)"]["n_weights"]
    assert wide_probe > costs["Q8_0 (llama 256/4/1)"]["n_weights"]
    md = (out / "report" / "report.md").read_text()
    assert "several layer shapes" in md
