"""Parsing llama.cpp's buffer log lines into bytes: fixed text, exact answers."""

from harness.llamalog import flash_attn_resolved, is_host_buffer, parse_buffers

MIB = 1024 * 1024

LOG = """\
load_tensors: loading model tensors, this can take a while... (mmap = true, direct_io = false)
load_tensors:   CPU_Mapped model buffer size =   762.81 MiB
load_tensors:   CPU_REPACK model buffer size =   301.50 MiB
load_tensors:        CUDA0 model buffer size =  1024.00 MiB
llama_context: n_ctx         = 384
llama_context: flash_attn    = auto
llama_context:        CPU  output buffer size =     0.49 MiB
llama_kv_cache:        CPU KV buffer size =    12.00 MiB
resolve_fused_ops: Flash Attention enabled
sched_reserve:        CPU compute buffer size =   254.50 MiB
sched_reserve:      CUDA0 compute buffer size =     8.25 MiB
llama_memory_recurrent:        CPU RS buffer size =     1.00 MiB
"""


def test_parse_buffers_exact():
    b = parse_buffers(LOG.splitlines())
    assert b.model == {"CPU_Mapped": round(762.81 * MIB), "CPU_REPACK": round(301.5 * MIB), "CUDA0": 1024 * MIB}
    assert b.kv == {"CPU": 12 * MIB + 1 * MIB}  # KV and recurrent state both count as cache
    assert b.compute == {"CPU": round(254.5 * MIB), "CUDA0": round(8.25 * MIB)}
    assert b.output == {"CPU": round(0.49 * MIB)}


def test_parse_ignores_other_lines():
    assert parse_buffers(["print_info: file size = 762.81 MiB (5.18 BPW)", "nothing"]) == ({}, {}, {}, {})


def test_flash_attn_resolved():
    assert flash_attn_resolved(LOG.splitlines()) == "enabled"
    assert flash_attn_resolved(["llama_context: Flash Attention was auto, set to disabled"]) == "disabled"
    assert flash_attn_resolved(["llama_context: flash_attn    = auto"]) is None  # the request, not the outcome
    assert flash_attn_resolved(["no such line"]) is None
    # the pinned build's other outcome of 'auto' (llama_context::resolve_fused_ops, src/llama-context.cpp of
    # llama-cpp-python 0.3.36's llama.cpp: "%s: %s not supported, set to disabled\n"), e.g. a CUDA build whose
    # attention of a layer would leave its device
    assert flash_attn_resolved(["resolve_fused_ops: Flash Attention not supported, set to disabled"]) == "disabled"


def test_pinned_host_buffers_are_host_memory():
    """CUDA_Host (pinned host memory: the weights with mmap off, the output, host-side compute) is the host's, as
    every *_Host buffer is; a device is CUDA0, Vulkan0, an RPC server's, Metal."""
    for name in ("CPU", "CPU_Mapped", "CPU_REPACK", "CUDA_Host", "ROCm_Host", "Vulkan_Host"):
        assert is_host_buffer(name), name
    for name in ("CUDA0", "CUDA1", "Vulkan0", "RPC0[127.0.0.1:50052]", "Metal", "MTL0"):
        assert not is_host_buffer(name), name
    from harness.measure.bench import device_of

    # a run whose weights went only to pinned host memory (mmap off, nothing offloaded) ran on the CPU
    assert device_of({"CUDA_Host": 700 * MIB}) == "cpu"
    assert device_of({"CUDA_Host": 200 * MIB, "CUDA0": 500 * MIB}) == "cuda"
