"""Config validation: every user mistake is one line naming the field; exit status 2; no traceback."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, run_cli

from harness import config
from harness.catalog.quants import PAGE_QUANTS
from harness.config import ConfigError


def good() -> dict:
    return yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())


def test_shipped_configs_load():
    for name in ("smoke.yaml", "1b-synthetic.yaml"):
        cfg = config.load(REPO / "configs" / name)
        assert cfg.quants == PAGE_QUANTS
        assert cfg.model.source == "synthetic"
    assert config.load(REPO / "configs" / "smoke.yaml").model.architecture == "tiny"
    assert config.load(REPO / "configs" / "1b-synthetic.yaml").model.architecture == "llama-3.2-1b"


def test_context_axes():
    d = good()
    d["bench"].update(contexts=131072, cache_type_k="f16,q8_0", context_flash_attn=[True, False])
    b = config.from_dict(d).bench
    assert b.contexts == (131072,) and b.cache_type_k == ("f16", "q8_0") and b.cache_type_v == ("f16",)
    assert b.context_flash_attn == ("on", "off")
    assert config.from_dict({"name": "x", "bench": {"n_prompt": 0, "n_gen": 0, "contexts": [512]}}).bench.contexts


def test_defaults_fill_in():
    cfg = config.from_dict({"name": "x"})
    assert cfg.bench.n_prompt == 512 and cfg.bench.n_gen == 128 and cfg.bench.depths == (0,)
    assert cfg.bench.n_gpu_layers == -1 and cfg.bench.flash_attn == "auto" and cfg.bench.threads is None
    assert cfg.quants == PAGE_QUANTS


@pytest.mark.parametrize("mutate, expect", [
    (lambda d: d.update(nmae="x"), "unknown key nmae (did you mean 'name'?)"),
    (lambda d: d["bench"].update(repetitons=3), "unknown key bench.repetitons (did you mean 'repetitions'?)"),
    (lambda d: d["bench"].update(repetitions="five"), "bench.repetitions must be int, got str 'five'"),
    (lambda d: d["bench"].update(repetitions=True), "bench.repetitions must be int, got bool True"),
    (lambda d: d["bench"].update(repetitions=0), "bench.repetitions must be > 0, got 0"),
    (lambda d: d["bench"].update(depths=[0, -5]), "bench.depths[1] must be >= 0, got -5"),
    (lambda d: d["bench"].update(flash_attn="yes"), "bench.flash_attn 'yes' is not one of auto, on, off"),
    (lambda d: d["bench"].update(n_ubatch=1024, n_batch=512), "bench.n_ubatch (1024) must not exceed"),
    (lambda d: d["bench"].update(n_prompt=0, n_gen=0), "nothing to measure"),
    (lambda d: d["bench"].update(contexts=[2048, 32]),
     "bench.contexts[1] = 32 is below the tests' own tokens (max of n_prompt, n_gen = 64)"),
    (lambda d: d["bench"].update(contexts=[2048, 2048]), "bench.contexts lists a value twice"),
    (lambda d: d["bench"].update(contexts=["8K"]), "bench.contexts[0] must be int, got str '8K'"),
    (lambda d: d["bench"].update(cache_type_k=["f16", "q8"]),
     "bench.cache_type_k[1] 'q8' is not one of f32, f16, bf16, q8_0"),
    (lambda d: d["bench"].update(cache_type_v="q4_0,q4_0"), "bench.cache_type_v lists q4_0 twice"),
    (lambda d: d["bench"].update(context_flash_attn=["on", "maybe"]),
     "bench.context_flash_attn[1] 'maybe' is not one of auto, on, off"),
    (lambda d: d.update(quants=["Q4_KM"]), "quants[0]: unknown quant 'Q4_KM' (did you mean 'Q4_K_M'?)"),
    (lambda d: d.update(quants=["Q8_0", "Q8_0"]), "quants[1]: Q8_0 is listed twice"),
    (lambda d: d.update(quants=[]), "quants must be a non-empty list"),
    (lambda d: d["model"].update(source="hf"), "model.source 'hf' is not one of synthetic, hub, local"),
    (lambda d: d["model"].update(architecture="llama-3.2-3b"), "model.architecture 'llama-3.2-3b'"),
    (lambda d: d["model"].update(repo="a/b"), "model.repo does not apply to source 'synthetic'"),
    (lambda d: d.update(model={"source": "hub", "repo": "a/b", "file": "model.gguf"}),
     "model.file 'model.gguf' must contain {quant}"),
    (lambda d: d.update(model={"source": "hub", "repo": "ab", "file": "{quant}.gguf"}),
     "model.repo must look like 'owner/name'"),
    (lambda d: d.update(model={"source": "local", "path": "x/{quant}/{other}.gguf"}),
     "has a placeholder other than {quant}"),
    (lambda d: d.update(model={"source": "local"}),
     "model.path (a pattern with {quant}) or model.files is required for source 'local'"),
    (lambda d: d.pop("name"), "name is required"),
    (lambda d: d.update(name="../up"), "must not contain '/'"),
])
def test_mistakes_name_the_field(mutate, expect):
    d = good()
    mutate(d)
    with pytest.raises(ConfigError) as e:
        config.from_dict(d)
    assert expect in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_overrides_beat_yaml():
    cfg = config.load(REPO / "configs" / "smoke.yaml", {"bench.repetitions": 7, "quants": "Q8_0,Q4_0"})
    assert cfg.bench.repetitions == 7 and cfg.quants == ("Q8_0", "Q4_0")


def test_bad_yaml_reports_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nbench: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        config.load(p)


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    p = tmp_path / "c.yaml"
    d = good()
    d["quants"] = ["Q4_K_M", "Q5_KS"]
    p.write_text(yaml.safe_dump(d))
    r = run_cli("run", str(p), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "quants[1]: unknown quant 'Q5_KS' (did you mean 'Q5_K_S'?)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_missing_config_suggests(tmp_path):
    r = run_cli("run", "configs/smoke.yml")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not found (did you mean 'smoke.yaml'?)" in r.stderr


def test_cli_usage_error_exit_2():
    r = run_cli("run")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_label_files_names_colliding_quants_by_file(tmp_path):
    """Two files of the same quant (two models' Q4_1) get their file names, so a table row says which file it is;
    a file alone in its quant keeps the quant."""
    from harness.config import label_files

    quant = {"gemma.gguf": "Q4_K_M", "SmolLM2.Q4_1.gguf": "Q4_1", "llama-1b.gguf": "Q4_1", "a/x.gguf": "Q8_0",
             "b/x.gguf": "Q8_0"}
    paths = [tmp_path / p for p in quant]
    got = label_files(paths, lambda p: (quant[str(p.relative_to(tmp_path))], "test"))
    assert list(got) == ["Q4_K_M", "SmolLM2.Q4_1", "llama-1b", "x", "x-2"]
    assert got["x-2"] == str((tmp_path / "b/x.gguf").resolve())
