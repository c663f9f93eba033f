"""`estimate --users N --context C` (harness.estimate_serving, harness.analysis.serving): the memory terms against
llama.cpp's own numbers (harness/data/buffers-1b.json for the 1B; the batched test run for real on the tiny model),
fits-or-not flipping at the right number of users on a small-memory device, the words beside a GPU's speed terms,
and the step model's fit on real tiny-model batched records. No mocks, no timing thresholds."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import run_cli

from harness import estimate_serving
from harness.analysis import serving as sv
from harness.catalog import devices
from harness.sources.synthetic import ARCHS

TINY = ARCHS["tiny"]
NPP, NTG, NPL = [16, 48], 8, [1, 2, 4]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_cache) -> Path:
    """The batched test on the tiny model, as a user runs it: two quants, two prompt lengths, 1-4 users."""
    tmp = tmp_path_factory.mktemp("est-serving")
    cfg = tmp / "bt.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "bt", "model": {"source": "synthetic", "architecture": "tiny"}, "quants": ["Q4_0", "Q8_0"],
        "cache_dir": str(tiny_cache), "probes": False,
        "bench": {"n_prompt": 0, "n_gen": 0, "rounds": 1, "threads": 1, "n_batch": 64, "n_ubatch": 64,
                  "batched": {"npp": NPP, "ntg": [NTG], "npl": NPL, "repetitions": 1}},
    }))
    r = run_cli("run", str(cfg), "--out", str(tmp / "results"), "--no-report", "--no-progress")
    assert r.returncode == 0, r.stderr
    return tmp / "results"


@pytest.fixture(scope="module")
def records(tiny_run) -> list[dict]:
    recs = [json.loads(x) for x in (tiny_run / "batched.jsonl").read_text().splitlines() if x.strip()]
    assert len(recs) == 2 * len(NPP) * len(NPL) and all(r["status"] == "ok" for r in recs)
    return recs


# --- memory against llama.cpp's own numbers ----------------------------------------------------------------------

def test_one_user_is_llamacpps_own_breakdown_at_every_tabulated_context():
    """One user at a context buffers-1b.json tabulates: every term is llama.cpp's figure, to the byte."""
    b = sv.buffers_1b()
    assert len(b["quants"]) == 12
    for q, cells in b["quants"].items():
        for c in b["contexts"]:
            m, x = sv.memory(q, 1, c), cells[f"on:{c}"]
            assert (m["weights_device"], m["weights_host"], m["kv"], m["compute_device"], m["compute_host"]) == \
                (x["device_model"], x["host_model"], x["device_context"], x["device_compute"],
                 x["host_compute"]), (q, c)


def test_kv_per_cell_is_the_shape_times_the_types_block_size():
    assert sv.kv_bytes_per_cell() == 2 * 16 * 8 * 64 * 2  # 32 KiB: the 1B's f16 K and V
    assert sv.kv_bytes_per_cell(type_k="q8_0", type_v="q8_0") == 16 * 2 * (512 // 32 * 34)
    assert sv.kv_bytes_per_cell(type_k="q4_0", type_v="f16") == 16 * (512 // 32 * 18 + 512 * 2)
    # N users at a tabulated context split by user: N x the one-user cache, llama.cpp's own figure
    x = sv.buffers_1b()["quants"]["Q4_K_M"]["on:8192"]
    assert sv.memory("Q4_K_M", 16, 8192)["kv"] == 16 * x["device_context"]


def test_kv_cells_pad_as_llamacpp_does():
    assert sv.kv_cells(1, 4096) == (4096, 4096)
    assert sv.kv_cells(2, 48) == (512, 256)  # n_ctx 96 -> 256; 256 / 2 = 128 -> 256 per user
    assert sv.kv_cells(3, 300) == (3 * 512, 512)  # 900 -> 1024; 1024 / 3 = 341 -> 512
    assert sv.kv_cells(3, 300, unified=True) == (1024, 1024)


def test_memory_terms_match_a_batched_run_on_the_tiny_model(records):
    """Every cell of a real batched run: llama.cpp's cells (n_ctx), its KV buffer to the byte (per buffer type,
    from llama_get_memory_breakdown), its output buffer (as the log prints it, 0.01 MiB), and a compute buffer that
    does not grow with the users at the same context per user once their prompts fill a ubatch (fewer tokens in
    the largest batch decoded take less)."""
    per_cell = sv.kv_bytes_per_cell(TINY)
    compute: dict[tuple, set] = {}
    for r in records:
        b = r["batched"]
        cells, per = sv.kv_cells(b["pl"], b["pp"] + b["tg"])
        assert r["n_ctx"] == b["n_kv_max"] == cells, b
        kv = sum(x["context"] for x in r["memory_breakdown"].values())
        assert kv == r["kv_bytes"] == cells * per_cell
        assert r["output_bytes"] == pytest.approx(b["pl"] * TINY.n_vocab * sv.LOGIT_BYTES, abs=0.005 * 2**20)
        if b["pl"] * b["pp"] >= b["n_ubatch"]:
            compute.setdefault((r["quant"], per), set()).add(r["compute_bytes"])
    assert compute and all(len(v) == 1 for v in compute.values()), compute
    assert len({r["batched"]["pl"] for r in records if r["batched"]["pl"] * r["batched"]["pp"] >= 64}) >= 2
    for r in records:
        assert r["compute_bytes"] <= next(iter(compute[(r["quant"], sv.kv_cells(r["batched"]["pl"], 24)[1])]))


def test_fits_flips_at_the_right_number_of_users_on_a_small_device(tmp_path):
    """An 8 GiB card at 32,768 tokens a user: the largest N whose llama.cpp figures (buffers-1b.json, read here
    directly) fit, and the estimate says fits at N and does not at N + 1."""
    dev = devices.lookup("RTX 3070")
    x = sv.buffers_1b()["quants"]["Q4_K_M"]["on:32768"]

    def on_gpu(n):
        return x["device_model"] + n * x["device_context"] + x["device_compute"]

    n = max(k for k in range(1, 257) if on_gpu(k) <= dev.memory_bytes)
    assert 1 < n < 256 and on_gpu(n + 1) > dev.memory_bytes
    assert sv.max_users("Q4_K_M", 32768, dev.memory_bytes, on_device=True) == n
    outs = {}
    for users in (n, n + 1):
        r = run_cli("estimate", "--device", "RTX 3070", "--quant", "Q4_K_M", "--users", str(users),
                    "--context", "32768", "--json", "--batched", str(tmp_path))
        assert r.returncode == 0, r.stderr
        outs[users] = json.loads(r.stdout)
        assert outs[users]["total_bytes"] == on_gpu(users) and outs[users]["max_users"] == n
    assert outs[n]["fits"] is True and outs[n + 1]["fits"] is False
    r = run_cli("estimate", "--device", "RTX 3070", "--quant", "Q4_K_M", "--users", str(n + 1), "--context", "32768",
                "--batched", str(tmp_path))
    assert f"does NOT fit in 8.0 GiB; the most users that fit at 32,768 tokens each: {n}" in r.stdout


# --- speed -------------------------------------------------------------------------------------------------------

def test_a_gpu_without_batched_records_says_so_beside_every_speed_term(tiny_run):
    r = run_cli("estimate", "--device", "H100 SXM", "--quant", "Q4_K_M", "--users", "16", "--context", "4096",
                "--batched", str(tiny_run))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("speed:"))
    terms = lines[start + 1:start + 5]
    assert [t.split()[0] for t in terms] == ["step", "weights", "KV", "compute"]
    for t in terms:
        assert "no GPU batched measurement of this model stands behind it" in t, t
    assert "another model on another GPU" in terms[3] and "benches/dgx-spark.md" in terms[3]
    assert "no GPU batched measurement" in lines[start + 5] and lines[start + 5].split()[0] == "step"
    ttft = next(x for x in lines if x.startswith("first token:"))
    assert "no GPU batched measurement" in ttft
    # the tiny model's records are not this model's, and it says so
    assert "records of another model (8 layers, n_embd 256), not Llama 3.2 1B's: not used" in r.stdout
    doc = json.loads(run_cli("estimate", "--device", "H100 SXM", "--quant", "Q4_K_M", "--users", "16", "--context",
                             "4096", "--batched", str(tiny_run), "--json").stdout)
    assert doc["speed"]["basis"] == "carried"
    assert all("no GPU batched measurement" in t["basis"] for t in doc["speed"]["terms"])
    assert doc["speed"]["step_s"] == pytest.approx(sum(t["s"] for t in doc["speed"]["terms"]))


def test_published_rows_parse_as_printed():
    """The transcribed rows hold llama-batched-bench's own relations (N_KV = B x (PP + TG), S_TG = B x TG / T_TG)
    to the printed precision, and every used source names its url, date, build and device."""
    for src in sv.published()["sources"]:
        assert all(src.get(k) for k in ("url", "date", "build", "device", "header", "rows", "how"))
        for row in sv.published_rows(src):
            assert row["N_KV"] == row["B"] * (row["PP"] + row["TG"])
            assert row["S_TG t/s"] == pytest.approx(row["B"] * row["TG"] / row["T_TG s"], rel=2e-3)
            assert row["S_PP t/s"] == pytest.approx(row["B"] * row["PP"] / row["T_PP s"], rel=2e-3)
    p = sv.published_terms()
    assert p["a_s"] > 0 and p["g_s"] > 0 and p["k_s_per_token"] > 0 and p["tau_s"] > 0


def _known(cells: list[sv.Cell], terms: dict, k: float, tau: dict, mu: float) -> list[sv.Cell]:
    """The cells with their times replaced by what known terms give: fixed inputs with exact answers."""
    out = []
    for c in cells:
        t_w, g = terms[c.quant]
        out.append(replace(c, t_step_s=t_w + c.pl * g + k * c.pl * c.ctx * c.kv_bytes_per_cell,
                           t_pp_s=c.pl * c.pp * (tau[c.quant] + mu * c.pp)))
    return out


def test_the_fit_recovers_known_terms_from_real_records(records):
    """On the tiny model's real cells (their quants, users, prompts, KV bytes per cell from its shape) with times
    made from known terms, the fit gives those terms back: the KV term told apart by the two prompt lengths."""
    cells, notes = sv.cells_of(records)
    assert len(cells) == 2 * len(NPP) * len(NPL) and not notes
    assert {c.kv_bytes_per_cell for c in cells} == {sv.kv_bytes_per_cell(TINY)}
    terms = {"Q4_0": (2.0e-3, 0.4e-3), "Q8_0": (3.5e-3, 0.25e-3)}
    k, tau, mu = 2e-9, {"Q4_0": 1.5e-4, "Q8_0": 1.1e-4}, 3e-7
    fit = sv.fit_step(_known(cells, terms, k, tau, mu))
    assert fit["k_s_per_byte"] == pytest.approx(k, rel=1e-6) and fit["k_basis"].startswith("fitted on these")
    for q, (t_w, g) in terms.items():
        assert fit["quants"][q]["t_w_s"] == pytest.approx(t_w, rel=1e-6)
        assert fit["quants"][q]["g_s"] == pytest.approx(g, rel=1e-6)
    assert fit["rms_rel"] == pytest.approx(0, abs=1e-9)
    pf = sv.fit_prompt(_known(cells, terms, k, tau, mu))
    assert pf["mu_s"] == pytest.approx(mu, rel=1e-6)
    assert pf["tau_s"] == pytest.approx(tau, rel=1e-6)
    # one prompt length: the KV term cannot be told from a user's compute; the basis given is used and named
    one = [c for c in _known(cells, terms, k, tau, mu) if c.pp == NPP[0]]
    fit1 = sv.fit_step(one, kv_s_per_byte=k, kv_basis="the given rate")
    assert fit1["k_basis"] == "the given rate" and fit1["k_s_per_byte"] == k
    assert fit1["quants"]["Q4_0"]["g_s"] == pytest.approx(terms["Q4_0"][1], rel=1e-6)
    with pytest.raises(sv.ServingError, match="do not tell the KV term apart"):
        sv.fit_step(one)


def test_the_fit_on_measured_times_predicts_what_it_fitted(records):
    """The real timings (no threshold on them): every term non-negative, and a prediction at a measured cell is the
    fit's own value there, its error the one the fit reports."""
    cells, _ = sv.cells_of(records)
    fit = sv.fit_step(cells, kv_s_per_byte=1e-10, kv_basis="a lower bound")
    assert fit["k_s_per_byte"] > 0
    errs = []
    for c in cells:
        q = fit["quants"][c.quant]
        assert q["t_w_s"] >= 0 and q["g_s"] >= 0
        p = sv.predict_step(fit, c.quant, c.size_bytes, c.pl, c.ctx, c.kv_bytes_per_cell)
        assert p["how"] == "measured"
        errs.append(abs(p["step_s"] / c.t_step_s - 1))
    if not any("held at 0" in n for n in fit["notes"]):
        assert max(errs) == pytest.approx(fit["worst_rel"], rel=1e-9)
    doc = estimate_serving._measured_speed({"bandwidth_gb_s": 10.0, "source": "given"}, records, "Q4_0",
                                           cells[0].size_bytes, 4, 56, 16, sv.kv_bytes_per_cell(TINY))
    assert doc["basis"] == "measured" and [t["what"] for t in doc["terms"]] == \
        ["weights + the step's fixed work", "KV read", "compute per user"]
    assert doc["step_s"] == pytest.approx(sum(t["s"] for t in doc["terms"]))


def test_records_of_another_model_or_machine_are_not_used(tiny_run):
    dev = {"kind": "gpu", "name": "NVIDIA H100 SXM"}
    recs, runs, notes = estimate_serving.records_for([tiny_run / "batched.jsonl"], dev)
    assert not recs and not runs and "records of another model" in notes[0]


# --- bad input: one line ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (["--users", "0"], "--users must be at least 1, got 0"),
    (["--users", "4", "--context", "0"], "--context must be at least 1 token per user"),
    (["--users", "300"], "llama.cpp holds at most 256 sequences"),
    (["--users", "4", "--context", "1024", "--prompt", "2048"], "--prompt must be between 1 and"),
    (["--users", "4", "-ctk", "q3_k"], "not a KV cache type llama.cpp takes"),
    (["--users", "4", "--device", "H1000 SXM"], "did you mean 'NVIDIA H100 SXM'?"),
    (["--users", "4", "--quant", "Q4_K_N"], "did you mean 'Q4_K_S'?"),
    (["--users", "4", "--quant", "Q2_K"], "no llama.cpp buffers of Llama 3.2 1B 'Q2_K'"),
])
def test_bad_input_is_one_clear_line(args, says):
    base = {"--device": "H100 SXM", "--quant": "Q4_K_M"}
    for i in range(0, len(args), 2):
        base.pop(args[i], None)
    r = run_cli("estimate", *[x for kv in base.items() for x in kv], *args)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_check_takes_good_input():
    ok = SimpleNamespace(users=16, context=4096, prompt=None, cache_type_k="q8_0", cache_type_v="q8_0")
    assert estimate_serving.check(ok) is None
