"""What runs inside a timed region: no call into Python per llama.cpp log line (llama-bench's null log callback),
and on a CUDA device no CUDA-graph capture (warm-ups until the graphs settle). The log-pausing runs on the real
llama.cpp; the graph logic is fed the debug lines of the pinned ggml-cuda (its format strings in
ggml/src/ggml-cuda/ggml-cuda.cu of llama-cpp-python 0.3.36's llama.cpp: no CUDA device runs here)."""

from __future__ import annotations

import pytest

from harness import config
from harness.llamalog import LogCapture
from harness.measure import bench, breakdown

WARMUP_COMPLETE = "ggml_backend_cuda_graph_compute: CUDA graph warmup complete"  # GGML_LOG_DEBUG, line 4462
WARMUP_RESET = "ggml_backend_cuda_graph_compute: CUDA graph warmup reset"  # line 4472
REUSED = "CUDA Graph id 7 reused"  # "CUDA Graph id %zu reused\n", line 2600
DISABLED = "ggml_cuda_graph_set_enabled: disabling CUDA graphs due to GPU architecture"  # line 4428


def settle(*warmups: list[str]) -> tuple[list[bool], dict]:
    state = {"in_use": False, "warmups": 0, "said": []}
    return [bench.graph_state(lines, state) for lines in warmups], state


def test_graphs_settle_once_captured_in_a_warm_up():
    # first call: executed directly, nothing logged; second: captured ("warmup complete")
    done, state = settle([], [WARMUP_COMPLETE])
    assert done == [False, True] and state["in_use"] and state["said"] == ["CUDA graph warmup complete"]
    # a change resets the warm-up: one more call captures again
    done, state = settle([], [WARMUP_COMPLETE], [WARMUP_RESET], [WARMUP_COMPLETE])
    assert done == [False, True, False, True] and state["in_use"] and state["warmups"] == 4
    done, state = settle([REUSED])
    assert done == [True] and state["in_use"]


def test_graphs_not_in_use_where_disabled_or_silent():
    done, state = settle([DISABLED])
    assert done == [True] and not state["in_use"]
    # a build without graphs (GGML_CUDA_DISABLE_GRAPHS, or not compiled in) says nothing: settled after two
    done, state = settle([], [])
    assert done == [False, True] and not state["in_use"] and state["said"] == []


class _FakeCapture:
    """The capture's debug switch and take(), fed the lines a warm-up would log."""

    def __init__(self, per_call: list[list[str]]):
        self.debug = False
        self.lines: list[str] = []
        self.per_call = per_call
        self.debug_seen: list[bool] = []

    def take(self):
        out, self.lines = self.lines, []
        return out


def test_warm_ups_go_on_until_the_graphs_are_captured_on_a_cuda_device():
    cap = _FakeCapture([[], [WARMUP_COMPLETE], [REUSED]])
    s = type("S", (), {"device": "cuda", "capture": cap})()
    calls = []

    def warm_up():
        cap.debug_seen.append(cap.debug)
        cap.lines += cap.per_call[len(calls)]
        calls.append(1)

    state = bench.warm_until_graphs(s, warm_up, 1)  # the config's one warm-up would leave the capture to rep 0
    assert len(calls) == 2 and state["in_use"] and state["warmups"] == 2
    assert all(cap.debug_seen) and cap.debug is False  # debug lines read while warming up only
    cpu = type("S", (), {"device": "cpu", "capture": cap})()
    calls.clear()
    assert bench.warm_until_graphs(cpu, lambda: calls.append(1), 3) is None and len(calls) == 3


def test_a_paused_capture_sends_llama_cpps_log_to_a_c_function(tiny_file):
    """While paused, llama.cpp logs into the shim's null callback (no Python runs); after, into the capture."""
    null = breakdown.null_log()
    if null is None:
        pytest.skip(f"no memory-breakdown shim here ({breakdown.shim_error()})")
    b = {**config.BenchSpec().__dict__, "threads": 1, "n_gpu_layers": 0}
    b.update(cache_type_k="f16", cache_type_v="f16")
    with LogCapture() as cap:
        s = bench.Session(str(tiny_file("Q8_0")), b, cap)
        try:
            with cap.paused(null):
                ctx, _ = s.new_context(256, ("f16", "f16"), "auto")  # logs its buffers: into the null callback
                s.lib.llama_free(ctx)
                assert cap.take() == []
            ctx, ctx_log = s.new_context(256, ("f16", "f16"), "auto")
            s.lib.llama_free(ctx)
            assert any("KV buffer size" in x for x in ctx_log)  # the capture is back
        finally:
            s.free()
