"""Kernel probes: built by llama.cpp's own quantizer in the measured model's layer shapes, one tensor type each,
and measured by the runner between the quants."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from conftest import REPO

from harness import config, schema
from harness.gguf import validate
from harness.measure import runner
from harness.sources import probes, quantize, synthetic

TINY = synthetic.ARCHS["tiny"]


def test_shape_from_the_header_is_the_architecture(tiny_file):
    shape = probes.shape_of(validate.check(tiny_file("Q4_K_M")).hparams)
    for field in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_vocab", "n_ctx_train"):
        assert getattr(shape, field) == getattr(TINY, field), field
    assert shape.rope_theta == TINY.rope_theta
    p = probes.probe_arch(shape, 3)
    assert (p.n_layer, p.n_vocab, p.n_embd, p.n_ff, p.n_head, p.n_head_kv) == (3, 512, 256, 512, 4, 1)
    assert p.name == "probe-e256-f512-h4-kv1-l3"


def test_the_1b_probe_has_the_1b_layers():
    one_b = synthetic.ARCHS["llama-3.2-1b"]
    p = probes.probe_arch(one_b, 4)
    layer = [(n.split(".", 2)[2], s) for n, s, _ in synthetic.tensor_specs(p) if n.startswith("blk.0.")]
    assert layer == [(n.split(".", 2)[2], s) for n, s, _ in synthetic.tensor_specs(one_b) if n.startswith("blk.0.")]
    matrices = sum(s[0] * s[1] for n, s, _ in synthetic.tensor_specs(p) if len(s) == 2)
    assert 240e6 < matrices < 245e6  # 4 x 60.8M per layer + the 512-token embedding


def test_shape_needs_the_hyperparameters():
    with pytest.raises(probes.ProbeError, match="embedding_length"):
        probes.shape_of({"llama.block_count": 2})
    with pytest.raises(probes.ProbeError, match="attention shape"):
        probes.shape_of({"llama.embedding_length": 256, "llama.attention.head_count": 3, "llama.block_count": 1,
                         "llama.feed_forward_length": 512})


def test_types_to_probe_most_weights_first_without_norms():
    assert probes.types_to_probe({"F32": 10, "Q6_K": 5, "IQ3_S": 50, "Q4_K": 7}) == ["IQ3_S", "Q4_K", "Q6_K"]


@pytest.fixture(scope="module")
def probe_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("probe-cache")


@pytest.mark.parametrize("type_name", sorted(probes.PURE_FTYPES))
def test_every_probe_is_pure(probe_cache, type_name):
    """llama.cpp's pure quantization gives every matrix exactly the probed type (the table is right)."""
    parch = probes.probe_arch(TINY, 2)
    path, built = probes.ensure_probe(probe_cache, parch, type_name)
    types = validate.check(path).type_weights
    assert set(types) == {type_name, "F32"}
    assert types[type_name] == sum(s[0] * s[1] for _, s, _ in synthetic.tensor_specs(parch) if len(s) == 2)
    assert built and probes.ensure_probe(probe_cache, parch, type_name) == (path, False)  # cached
    assert quantize.llama_cpp_version() in str(path)


def test_unknown_type_has_no_probe(probe_cache):
    with pytest.raises(probes.ProbeError, match="no probe for ggml type TQ3"):
        probes.ensure_probe(probe_cache, probes.probe_arch(TINY, 2), "TQ3")


SMOKE = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())


def _cfg(cache, **over):
    d = json.loads(json.dumps(SMOKE))
    d["cache_dir"] = str(cache)
    d["quants"] = ["IQ3_M", "Q4_K_M", "Q6_K"]
    d.update(over)
    return config.from_dict(d)


@pytest.fixture(scope="module")
def probed_run(tiny_cache, tmp_path_factory):
    cfg = _cfg(tiny_cache)
    lines: list[str] = []
    run_dir, errors = runner.run(cfg, out=tmp_path_factory.mktemp("probed") / "run", progress=False,
                                 echo=lines.append)
    return cfg, run_dir, errors, lines


def test_run_probes_each_type_once_between_the_quants(probed_run, tiny_file):
    cfg, run_dir, errors, lines = probed_run
    assert errors == {}
    recs = schema.read_records(run_dir / "probes.jsonl")
    want = set()
    for q in cfg.quants:
        want |= set(probes.types_to_probe(validate.check(tiny_file(q)).type_weights))
    assert want == {"IQ3_S", "Q4_K", "Q6_K"}  # tiny IQ3_M: IQ3_S + Q4_K + Q6_K; Q4_K_M and Q6_K add none
    # each type twice: at probes.n_layer (4) and probes.base_n_layer (2) layers, the cost from the difference
    assert cfg.probes.n_layer == 4 and cfg.probes.base_n_layer == 2
    assert sorted((r.quant, r.rep) for r in recs) == sorted((label, i) for t in want for label in (t, f"{t}@2L")
                                                            for i in range(2))
    for r in recs:
        t, base = probes.split_label(r.quant)
        assert r.status == "ok" and r.test == "tg" and r.n_gen == cfg.probes.n_gen and r.n_prompt == 0
        assert r.weights == "synthetic" and r.weights_ref.startswith(f"kernel probe: {base or 4} layers of 256x512")
        assert f"all {t}" in r.weights_ref and r.tokens_per_s > 0
        assert validate.check(r.file_path).type_weights.keys() == {t, "F32"}
    # measured in between the quants, spread over the round (not each right after the quant that revealed it)
    order = ["probe" if " probe " in x else x.split("]", 1)[1].split()[0] for x in lines if "measuring" in x]
    assert [x for x in order if x != "probe"] == runner.visit_order(cfg.quants, cfg.bench.seed, 0)
    assert order.count("probe") == 6 and order[0] != "probe"
    assert any(order[i] != "probe" for i in range(order.index("probe"), len(order)))  # a quant after a probe
    assert not (run_dir / "records.jsonl").read_text().count("kernel probe")  # quant records stay apart


def test_resume_does_not_measure_probes_again(probed_run, tiny_cache):
    cfg, run_dir, errors, lines = probed_run
    before = (run_dir / "probes.jsonl").read_text()
    lines2: list[str] = []
    runner.run(cfg, resume=run_dir, progress=False, echo=lines2.append)
    assert (run_dir / "probes.jsonl").read_text() == before
    assert not any("probe" in x and "measuring" in x for x in lines2)


def test_probes_off(tiny_cache, tmp_path):
    cfg = _cfg(tiny_cache, quants=["Q8_0"], probes=False)
    run_dir, errors = runner.run(cfg, out=tmp_path / "run", progress=False, echo=lambda s: None)
    assert errors == {} and not (run_dir / "probes.jsonl").exists()


def test_report_has_a_kernel_probe_section(probed_run, tmp_path):
    from harness import report

    cfg, run_dir, errors, lines = probed_run
    out = report.write_report(run_dir, tmp_path / "rep")
    md = (out / "report.md").read_text()
    assert "## Kernel probes" in md
    for t in ("IQ3_S", "Q4_K", "Q6_K"):
        assert f"| {t} |" in md
    cal = json.loads((out / "calibration.json").read_text())
    assert set(cal["probes"]) == {"IQ3_S", "Q4_K", "Q6_K"}
    assert any(n.startswith("probe-kernels") for n in cal["tg"]["candidates"])


def test_rounds_spread_each_quants_repetitions_over_passes(tiny_cache, tmp_path):
    """bench.rounds = 2: the sweep runs twice, each visit measuring its share of the repetitions; the probes
    are measured once per round too. A resume of the finished run measures nothing."""
    d = json.loads(json.dumps(SMOKE))
    d.update(cache_dir=str(tiny_cache), quants=["Q4_K_M", "Q6_K"])
    d["bench"].update(repetitions=3, rounds=2, n_prompt=0)
    cfg = config.from_dict(d)
    lines: list[str] = []
    run_dir, errors = runner.run(cfg, out=tmp_path / "run", progress=False, echo=lines.append)
    assert errors == {}
    recs = schema.read_records(run_dir / "records.jsonl")
    assert [(r.quant, r.rep) for r in recs] == [("Q4_K_M", 0), ("Q4_K_M", 1), ("Q6_K", 0), ("Q6_K", 1),
                                                ("Q4_K_M", 2), ("Q6_K", 2)]
    prs = schema.read_records(run_dir / "probes.jsonl")
    first = [r.quant for r in prs if r.rep == 0]
    assert [(r.quant, r.rep) for r in prs] == [(t, 0) for t in first] + [(t, 1) for t in first]
    assert sum("round 2/2" in x and "measuring" in x for x in lines) == 2 + len(first)
    again: list[str] = []
    runner.run(cfg, resume=run_dir, progress=False, echo=again.append)
    assert not any("measuring" in x for x in again)
    assert len(schema.read_records(run_dir / "records.jsonl")) == 6


def test_rounds_cannot_exceed_repetitions():
    with pytest.raises(config.ConfigError, match="bench.rounds"):
        config.from_dict({"name": "x", "bench": {"repetitions": 2, "rounds": 3}})


def test_a_failed_probe_is_recorded_and_reported_and_the_run_goes_on(tiny_cache, tmp_path, tiny_file):
    """A damaged cached probe file: its measurement fails in the child, an error record lands in probes.jsonl,
    the quants and the other probes are measured, and the report and the calibration say what is missing."""
    import shutil

    from harness import report
    from harness.analysis import summary

    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    shape = probes.shape_of(validate.check(tiny_file("Q6_K")).hparams)
    bad = probes.probe_file(cache, probes.probe_arch(shape, SMOKE["probes"]["n_layer"]), "Q6_K")
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    cfg = _cfg(cache, quants=["Q4_K_M", "Q6_K"])
    lines: list[str] = []
    run_dir, errors = runner.run(cfg, out=tmp_path / "run", progress=False, echo=lines.append)
    assert errors == {}  # a probe is not a quant: the run's measurements are complete
    prs = schema.read_records(run_dir / "probes.jsonl")
    failed = [r for r in prs if r.status == "error"]
    assert [r.quant for r in failed] == ["Q6_K"] and "invalid GGUF" in failed[0].error
    assert {r.quant for r in prs if r.status == "ok"} == {"Q4_K", "Q4_K@2L", "Q6_K@2L"}  # the base probes ran
    assert any("probe Q6_K ERROR" in x for x in lines)
    assert {r.quant for r in schema.read_records(run_dir / "records.jsonl")} == {"Q4_K_M", "Q6_K"}
    line = summary.probe_line(summary.records_frame(prs))
    assert "FAILED: Q6_K" in line and "Q4_K" in line
    out = report.write_report(run_dir, tmp_path / "rep")
    md = (out / "report.md").read_text()
    assert "| Q6_K | failed |" in md and "probe models not fitted: no probe measured for Q6_K" in md
    cal = json.loads((out / "calibration.json").read_text())
    assert not any(n.startswith("probe") for n in cal["tg"]["candidates"])


def test_resume_records_a_quant_whose_file_is_gone_in_a_later_round(tiny_file, tmp_path):
    """A 2-round run killed after round 1, resumed after the file of one quant disappeared: that quant gets an
    error record (it is not silently dropped), the other quant's round 2 is measured."""
    import shutil

    models = tmp_path / "models"
    models.mkdir()
    for q in ("Q4_K_M", "Q8_0"):
        shutil.copy(tiny_file(q), models / f"{q}.gguf")
    d = json.loads(json.dumps(SMOKE))
    d.update(model={"source": "local", "path": str(models / "{quant}.gguf")}, quants=["Q4_K_M", "Q8_0"])
    d["bench"].update(repetitions=2, rounds=2, n_prompt=0)
    cfg = config.from_dict(d)
    run_dir, errors = runner.run(cfg, out=tmp_path / "run", progress=False, echo=lambda s: None)
    rec_path = run_dir / "records.jsonl"
    kept = [x for x in rec_path.read_text().splitlines() if json.loads(x)["rep"] == 0]  # round 1 only
    rec_path.write_text("\n".join(kept) + "\n")
    (models / "Q8_0.gguf").unlink()
    run_dir, errors = runner.run(cfg, resume=run_dir, progress=False, echo=lambda s: None)
    assert "not found" in errors["Q8_0"]
    recs = schema.read_records(rec_path)
    assert sorted((r.quant, -1 if r.rep is None else r.rep, r.status) for r in recs) == [
        ("Q4_K_M", 0, "ok"), ("Q4_K_M", 1, "ok"), ("Q8_0", -1, "error"), ("Q8_0", 0, "ok")]


def test_two_probes_cancel_the_probes_own_overhead():
    """costs() on records made here: time per token = 3 ms overhead + 2e-12 s per weight; the difference of a
    6-layer and a 2-layer probe gives the cost per weight exactly, the one-probe figure overstates it."""
    from harness.analysis import kernels

    def recs(label, n_w):
        t = 3e-3 + 2e-12 * n_w
        return [{"status": "ok", "test": "tg", "quant": label, "tokens_per_s": 1 / t, "model_n_params": n_w}] * 3

    df = pd.DataFrame(recs("Q4_K", 600_000_000) + recs("Q4_K@2L", 200_000_000) + recs("Q8_0", 600_000_000))
    c = kernels.costs(df)
    assert c["Q4_K"]["s_per_weight"] == pytest.approx(2e-12)
    assert c["Q4_K"]["overhead_s"] == pytest.approx(3e-3)
    assert c["Q4_K"]["method"].startswith("two probes")
    assert c["Q8_0"]["s_per_weight"] == pytest.approx((3e-3 + 1.2e-3) / 600_000_000)  # overhead included
    assert "overhead_s" not in c["Q8_0"]


def test_rounds_default_to_three_on_a_cpu(monkeypatch):
    from harness.measure import devices

    if not devices.gpu_backends():  # a CPU or RPC build, whatever the host's driver says
        assert runner.default_rounds(5, -1) == 3
    monkeypatch.setattr(devices, "gpu_backends", lambda: [])  # a build with no GPU back end
    assert runner.default_rounds(5, -1) == 3
    assert runner.default_rounds(2, -1) == 2  # never more rounds than repetitions
    monkeypatch.setattr(devices, "gpu_backends", lambda: ["CUDA"])  # a CUDA build that found its GPU
    assert runner.default_rounds(5, -1) == 1
    assert runner.default_rounds(6, 0) == 3  # weights kept on the CPU
    monkeypatch.setattr(devices, "gpu_backends", lambda: [])
    cfg = config.from_dict({"name": "x", "bench": {"repetitions": 6}})
    assert cfg.bench.rounds is None and runner.resolved_bench(cfg)["rounds"] == 3
    assert runner.resolved_bench(config.from_dict({"name": "x", "bench": {"rounds": 2}}))["rounds"] == 2
