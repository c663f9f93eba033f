"""This machine's kernel costs (harness.analysis.probe_here): the tiny shape's probes measured here once, then
answered from the per-machine cache."""

from __future__ import annotations

import json
import math

import pytest

from harness.analysis import points, probe_here
from harness.measure import runner
from harness.sources import synthetic

TINY = synthetic.ARCHS["tiny"]


class Measured(RuntimeError):
    """Raised by a measuring function patched in where none may run."""


def no_measuring(*args, **kwargs):
    raise Measured("measured")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Q4_K measured alone, then Q4_K and Q6_K asked for together (only Q6_K is measured): (cache dir, the
    first answer, the second, the types the second measured)."""
    cache = tmp_path_factory.mktemp("probe-here")
    first = probe_here.kernel_costs(["Q4_K"], shape=TINY, threads=1, cache_dir=cache, progress=False)
    asked: list[str] = []
    real = probe_here.probe_records

    def spy(t, *args, **kwargs):
        asked.append(t)
        return real(t, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(probe_here, "probe_records", spy)
        both = probe_here.kernel_costs(["Q4_K", "Q6_K"], shape=TINY, threads=1, cache_dir=cache, progress=False)
    return cache, first, both, asked


def test_costs_are_positive_and_finite(measured):
    _, _, both, _ = measured
    assert list(both) == ["Q4_K", "Q6_K"]
    for t, row in both.items():
        assert math.isfinite(row["s_per_weight"]) and row["s_per_weight"] > 0, t
        assert row["tok_s"] > 0 and row["n"] == 5, t  # the config defaults' probes: 5 repetitions
        assert row["method"].startswith("two probes"), t  # both layer counts measured
        assert row["n_weights"] > row["base_n_weights"] > 0, t
    # kernels.costs' format, so the calibration's sum takes it as it is
    assert points.kernel_seconds({"Q4_K": 1000, "Q6_K": 10, "F32": 5}, both) == pytest.approx(
        1000 * both["Q4_K"]["s_per_weight"] + 10 * both["Q6_K"]["s_per_weight"])


def test_only_missing_types_are_measured_and_added(measured):
    cache, first, both, asked = measured
    assert asked == ["Q6_K"]
    assert both["Q4_K"] == first["Q4_K"]
    data = json.loads(probe_here.cache_path(cache).read_text())
    (entry,) = data.values()
    assert entry["key"]["threads"] == 1 and entry["key"]["shape"] == "e256-f512-h4-kv1"
    assert entry["key"]["cpu"] and entry["key"]["llama_cpp_python"]
    assert set(entry["types"]) == {"Q4_K", "Q6_K"}
    assert all(len(v["utc"]) == 10 for v in entry["types"].values())  # 5 repetitions x 2 layer counts


def test_a_second_call_is_cached_without_a_child(measured, monkeypatch):
    cache, _, both, _ = measured
    monkeypatch.setattr(probe_here, "probe_records", no_measuring)
    monkeypatch.setattr(runner, "measure_in_child", no_measuring)
    again = probe_here.kernel_costs(["q6_k", "Q4_K", "F32"], shape=TINY, threads=1, cache_dir=cache, progress=False)
    assert again == {"Q6_K": both["Q6_K"], "Q4_K": both["Q4_K"]}  # F32 (norms) is never probed


def test_other_threads_are_a_cache_miss(measured, monkeypatch):
    cache, _, _, _ = measured
    monkeypatch.setattr(probe_here, "probe_records", no_measuring)
    with pytest.raises(Measured):
        probe_here.kernel_costs(["Q4_K"], shape=TINY, threads=2, cache_dir=cache, progress=False)


def test_an_unknown_type_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(probe_here, "probe_records", no_measuring)
    with pytest.raises(probe_here.ProbeHereError, match=r"no kernel probe for ggml type 'Q4_KM': did you mean "
                                                        r"Q4_K\?") as e:
        probe_here.kernel_costs(["Q6_K", "Q4_KM"], shape=TINY, threads=1, cache_dir=tmp_path, progress=False)
    assert "\n" not in str(e.value)
    assert not probe_here.cache_path(tmp_path).exists()
