"""`run` takes llama-bench's test flags (-p, -n, -d, -r, -fa, -ngl, -b, -ub, -ctk, -ctv, -t and their long forms),
parsed as llama-bench parses them, over the config; a value llama-bench would reject is one line and exit 2."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from conftest import run_cli

from harness import cli, config, schema
from harness.measure import bench


@pytest.fixture
def cfg_file(tmp_path):
    """A config the flags override: the tiny synthetic model (nothing is built until a run measures)."""
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "model": {"source": "synthetic", "architecture": "tiny"},
                                 "quants": ["Q8_0"], "probes": False, "bench": {"rounds": 1}}))
    return p


def resolved(*argv: str):
    return cli.run_config(cli.build_parser().parse_args(["run", *argv]))


@pytest.mark.parametrize(("given", "want"), [
    (["512"], [512]),
    (["128,256"], [128, 256]),
    (["16", "32"], [16, 32]),  # the flag given again adds values
    (["0-4096+1024"], [0, 1024, 2048, 3072, 4096]),
    (["64-512*2"], [64, 128, 256, 512]),
    (["1-3,8"], [1, 2, 3, 8]),
    (["512,"], [512]),  # llama-bench's parser takes a trailing comma
])
def test_int_lists_and_ranges_expand_as_llama_bench(given, want):
    assert cli.int_values("n_prompt", given) == want


@pytest.mark.parametrize(("given", "match"), [
    (["x"], r"-p/--n-prompt 'x': not a prompt size"),
    (["-5"], "not a prompt size"),  # negative only for -ngl
    (["512,,1024"], "not a prompt size"),
    ([""], "not a prompt size"),
    (["5-3"], "holds no value"),
    (["1-8*1"], "does not grow"),
])
def test_int_values_llama_bench_rejects(given, match):
    with pytest.raises(config.ConfigError, match=match):
        cli.int_values("n_prompt", given)


def test_ngl_takes_a_negative_first_value():
    assert cli.int_values("n_gpu_layers", ["-1"], allow_negative=True) == [-1]


def test_fa_takes_llama_bench_spellings():
    assert cli.fa_values(["0,1"]) == ["off", "on"]
    assert cli.fa_values(["on", "OFF", "auto", "-1", "true", "disabled"]) == ["on", "off", "auto", "auto", "on", "off"]
    with pytest.raises(config.ConfigError, match=r"-fa/--flash-attn '2': not one of on, off, auto"):
        cli.fa_values(["2"])


def test_short_flags_override_the_config(cfg_file):
    cfg = resolved(str(cfg_file), "-p", "512", "-n", "128", "-d", "0,4096", "-r", "3", "-fa", "1", "-ngl", "0",
                   "-b", "256", "-ub", "128", "-ctk", "q8_0", "-ctv", "q8_0", "-t", "2")
    b = cfg.bench
    assert (b.n_prompt, b.n_gen, b.depths, b.repetitions, b.flash_attn) == (512, 128, (0, 4096), 3, "on")
    assert (b.n_gpu_layers, b.n_batch, b.n_ubatch, b.threads) == (0, 256, 128, 2)
    assert (b.cache_type_k, b.cache_type_v) == (("q8_0",), ("q8_0",))


def test_long_forms_and_the_harness_flags_of_before(cfg_file):
    long = resolved(str(cfg_file), "--n-prompt", "64", "--n-gen", "16", "--n-depth", "0", "--n-depth", "32",
                    "--repetitions", "2", "--flash-attn", "off", "--n-gpu-layers", "-1", "--batch-size", "64",
                    "--ubatch-size", "32", "--cache-type-k", "f16", "--cache-type-v", "f16", "--threads", "1")
    b = long.bench
    assert (b.n_prompt, b.n_gen, b.depths, b.repetitions, b.flash_attn) == (64, 16, (0, 32), 2, "off")
    assert (b.n_gpu_layers, b.n_batch, b.n_ubatch, b.threads) == (-1, 64, 32, 1)
    # the harness's own flags keep working as they did: comma lists for the memory test, --rounds, --contexts
    old = resolved(str(cfg_file), "--repetitions", "4", "--rounds", "2", "--threads", "2", "--n-gpu-layers", "0",
                   "--contexts", "512,1024", "--cache-type-k", "f16,q8_0", "--cache-type-v", "f16")
    b = old.bench
    assert (b.repetitions, b.rounds, b.threads, b.n_gpu_layers, b.contexts) == (4, 2, 2, 0, (512, 1024))
    assert b.cache_type_k == ("f16", "q8_0")


def test_b_alone_lowers_the_micro_batch_as_llama_cpp_does(cfg_file):
    """llama-bench's `-b 128` with its default -ub 512: llama.cpp runs micro-batches of min(n_batch, n_ubatch)."""
    assert (resolved(str(cfg_file), "-b", "128").bench.n_ubatch) == 128
    assert (resolved(str(cfg_file), "-b", "2048").bench.n_ubatch) == 512  # the config's, not raised


def test_list_axes_of_the_memory_test(cfg_file):
    """-ctk/-ctv/-fa lists are crossed in the memory test; pp and tg take the first value."""
    b = resolved(str(cfg_file), "--contexts", "1024", "-ctk", "f16,q8_0", "-ctv", "f16", "-ctv", "q8_0",
                 "-fa", "on,off").bench
    assert b.cache_type_k == ("f16", "q8_0") and b.cache_type_v == ("f16", "q8_0")
    assert b.flash_attn == "on" and b.context_flash_attn == ("on", "off")


def test_zero_skips_the_test_as_in_llama_bench(cfg_file):
    tests = bench.tests_for(dataclasses.asdict(resolved(str(cfg_file), "-n", "0", "-p", "32", "-d", "0,16").bench))
    assert [(t.kind, t.n_prompt, t.n_depth) for t in tests] == [("pp", 32, 0), ("pp", 32, 16)]
    tests = bench.tests_for(dataclasses.asdict(resolved(str(cfg_file), "-p", "0", "-n", "8").bench))
    assert [(t.kind, t.n_gen) for t in tests] == [("tg", 8)]


@pytest.mark.parametrize(("argv", "match"), [
    (["-fa", "2"], "-fa/--flash-attn '2': not one of on, off, auto"),
    (["-p", "x"], "-p/--n-prompt 'x': not a prompt size"),
    (["-r", "x"], "-r/--repetitions 'x': not a whole number"),
    (["-r", "0"], "bench.repetitions must be > 0"),
    (["-ctk", "q3_k"], "bench.cache_type_k[0] 'q3_k' is not one of"),
    (["-p", "0", "-n", "0"], "nothing to measure"),
    (["-ub", "1024"], "bench.n_ubatch (1024) must not exceed bench.n_batch (512)"),
    # lists of a setting measured once per run: refused, saying what is crossed
    (["-p", "512,1024"], "-p/--n-prompt 512,1024: one prompt size per run here .* crosses -d"),
    (["-n", "64", "-n", "128"], "-n/--n-gen 64,128: one generation length per run"),
    (["-t", "2,4"], "-t/--threads 2,4: one thread count per run"),
    (["-ngl", "0-2"], "-ngl/--n-gpu-layers 0,1,2: one GPU layer count per run"),
    (["-b", "128,256"], "-b/--batch-size 128,256: one batch size per run"),
    # a memory-test list where there is no memory test: pp and tg would silently use the first
    (["-fa", "0,1"], "-fa/--flash-attn 0,1: pp and tg run with one value of it .* --contexts"),
    (["-ctk", "f16,q8_0"], "-ctk/--cache-type-k f16,q8_0: pp and tg run with one value"),
])
def test_mistakes_are_one_line_and_exit_2(cfg_file, capsys, argv, match):
    import re

    assert cli.main(["run", str(cfg_file), *argv]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(".*".join(map(re.escape, match.split(" .* "))), err), err  # " .* ": anything between


def test_resume_command_repeats_the_flags():
    argv = ["run", "-m", "my model.gguf", "-p", "16", "--out", "res/x", "-fa", "1", "--resume=res/y"]
    assert cli.resume_command(argv) == "python -m harness run -m 'my model.gguf' -p 16 -fa 1 --resume RESULTS_DIR"


def test_a_llama_bench_command_line_measures_and_is_recorded(tiny_file, tmp_path):
    """`run -m FILE -p 16 -n 4 -d 0,8 -r 1 -fa 1 -t 1 -b 16` on the tiny model: the records carry each setting, and
    config.resolved.yaml records the overrides."""
    cfg = tmp_path / "np.yaml"
    cfg.write_text(yaml.safe_dump({"name": "flags", "probes": False}))  # the kernel probes: not this test's
    out = tmp_path / "res" / "run"
    r = run_cli("run", str(cfg), "-m", str(tiny_file("Q8_0")), "-p", "16", "-n", "4", "-d", "0,8", "-r", "1",
                "-fa", "1", "-t", "1", "-b", "16", "--no-progress", "--no-report", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [x for x in schema.read_records(out / "records.jsonl") if x.status == "ok"]
    assert sorted((x.test, x.n_prompt + x.n_gen, x.n_depth) for x in recs) == [
        ("pp", 16, 0), ("pp", 16, 8), ("tg", 4, 0), ("tg", 4, 8)]
    assert {(x.flash_attn, x.n_threads, x.n_batch, x.n_ubatch, x.rep) for x in recs} == {("on", 1, 16, 16, 0)}
    b = yaml.safe_load((out / "config.resolved.yaml").read_text())["bench"]
    assert (b["n_prompt"], b["n_gen"], b["depths"], b["repetitions"], b["flash_attn"]) == (16, 4, [0, 8], 1, "on")
    assert (b["threads"], b["n_batch"], b["n_ubatch"]) == (1, 16, 16)
