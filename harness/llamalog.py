"""Capture llama.cpp's log and read its memory accounting out of it.

llama.cpp reports every buffer it allocates (model weights per device, KV cache, compute scratch, logits
output) only in its log, as lines such as::

    load_tensors:   CPU_Mapped model buffer size =   762.81 MiB
    llama_kv_cache:        CPU KV buffer size =    16.00 MiB
    sched_reserve:        CPU compute buffer size =   254.50 MiB

:class:`LogCapture` installs a callback (``llama_log_set``) that collects whole lines; :func:`parse_buffers`
turns them into bytes per buffer name. The parser is pure, so it is tested on fixed text.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

# What the tools put before a line (llama.cpp's common log: colour codes, "0.00.467.913 I " timestamps and levels);
# the pinned build's callback gets lines without them, published logs often have them
_PREFIX_RE = re.compile(r"^(?:\x1b\[[0-9;]*m)*(?:\d+\.\d+\.\d+\.\d+ [IWEDT] )?")
_BUFFER_RE = re.compile(
    r"^\s*(?P<func>[\w:]+):\s+(?P<buf>\S+)\s+(?:(?P<kind>model|KV|compute|output|RS)\s+)?buffer size\s*=\s*"
    r"(?P<mib>[0-9.]+)\s*MiB"
)
GGML_LOG_LEVEL_DEBUG, GGML_LOG_LEVEL_CONT = 1, 5  # enum ggml_log_level
KINDS = {"model": "model", "KV": "kv", "compute": "compute", "output": "output", "RS": "kv"}


class Buffers(NamedTuple):
    model: dict[str, int]  # weights, bytes per buffer name (CPU_Mapped, CPU_REPACK, CUDA0, ...)
    kv: dict[str, int]  # KV cache (or recurrent state)
    compute: dict[str, int]  # compute scratch
    output: dict[str, int]  # logits/embeddings output


def is_host_buffer(name: str) -> bool:
    """Whether a buffer of this name is host memory: the CPU's (CPU, CPU_Mapped, CPU_REPACK) and every back end's
    pinned host buffers (CUDA_Host, ROCm_Host, Vulkan_Host, ...), which hold weights with mmap off, the output and
    host-side compute; everything else (CUDA0, Vulkan0, RPC0[host:port], Metal, ...) is on a device."""
    up = name.upper()
    return up.startswith("CPU") or up.endswith("_HOST")


def strip_prefix(line: str) -> str:
    """A log line without what llama.cpp's tools print before it (colour codes, a timestamp and level)."""
    return _PREFIX_RE.sub("", line, count=1)


def parse_buffers(lines: Iterable[str]) -> Buffers:
    """Bytes per buffer name and kind. MiB in the log carry 2 decimals: each value is good to ~5 KiB.
    The same name logged twice for one kind (e.g. several compute reservations) is summed. Builds before
    mid-2024 logged the weights as "llm_load_tensors: CUDA0 buffer size" (no "model"): taken as model buffers."""
    out: Buffers = Buffers({}, {}, {}, {})
    for line in lines:
        m = _BUFFER_RE.match(strip_prefix(line))
        if not m or (m["kind"] is None and not m["func"].endswith("load_tensors")):
            continue
        d = getattr(out, KINDS[m["kind"] or "model"])
        d[m["buf"]] = d.get(m["buf"], 0) + round(float(m["mib"]) * 1024 * 1024)
    return out


_CUDA_DEVICE_RE = re.compile(r"^\s*Device (?P<i>\d+): (?P<name>.+?), compute capability (?P<cc>[\d.]+)")


def cuda_devices(lines: Iterable[str]) -> list[tuple[int, str, str]]:
    """(index, name, compute capability) of each device ggml-cuda lists at start ("Device 0: NVIDIA H200, compute
    capability 9.0, VMM: yes"): the GPU's name in the log itself."""
    return [(int(m["i"]), m["name"], m["cc"]) for m in map(_CUDA_DEVICE_RE.match, map(strip_prefix, lines)) if m]


_OFFLOAD_RE = re.compile(r"offloaded (?P<n>\d+)/(?P<m>\d+) layers to GPU")


def offloaded_layers(lines: Iterable[str]) -> tuple[int, int] | None:
    """(N, M) from the load log's "offloaded N/M layers to GPU" (M counts the output layer too); None where the
    build cannot offload (the line is not logged)."""
    for line in lines:
        m = _OFFLOAD_RE.search(line)
        if m:
            return int(m["n"]), int(m["m"])
    return None


# The pinned build resolves 'auto' in llama_context::resolve_fused_ops (src/llama-context.cpp): "Flash Attention
# enabled", or "Flash Attention not supported, set to disabled" where a layer's attention would leave its device;
# older builds print "Flash Attention was auto, set to ..." or "flash_attn = enabled".
_FA_RE = re.compile(r"Flash Attention (?:was auto, set to |not supported, set to )?(?P<val>enabled|disabled)"
                    r"|flash_attn\s+=\s+(?P<val2>enabled|disabled)")


def flash_attn_resolved(lines: Iterable[str]) -> str | None:
    """What flash attention resolved to ('auto' becomes enabled or disabled), from the context's log."""
    for line in lines:
        m = _FA_RE.search(line)
        if m:
            return m["val"] or m["val2"]
    return None


class LogCapture:
    """Collects llama.cpp's log lines while installed. Lines arrive in pieces; they are joined on newline.

    ``on_line`` sees every complete line (for progress bars). Only one capture is active per process, since
    llama.cpp has one global logger.
    """

    def __init__(self, on_line: Callable[[str], None] | None = None, echo: Callable[[str], None] | None = None,
                 debug: bool = False):
        self.lines: list[str] = []
        self.debug = debug
        self._in_debug = False
        self._partial = ""
        self._on_line = on_line
        self._echo = echo
        self._cb = None

    def _feed(self, text: str) -> None:
        text = self._partial + text
        *complete, self._partial = text.split("\n")
        for line in complete:
            self.lines.append(line)
            if self._echo:
                self._echo(line)
            if self._on_line:
                self._on_line(line)

    def take(self) -> list[str]:
        """The lines collected since the last take()."""
        lines, self.lines = self.lines, []
        return lines

    def __enter__(self) -> LogCapture:
        import llama_cpp

        @llama_cpp.llama_log_callback
        def _cb(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            # DEBUG lines come several per decoded batch: drop them first thing, they carry no buffer sizes.
            if level != GGML_LOG_LEVEL_CONT:
                self._in_debug = level == GGML_LOG_LEVEL_DEBUG
            if self._in_debug and not self.debug:
                return
            try:
                self._feed(text.decode("utf-8", errors="replace"))
            except Exception:  # noqa: BLE001 - an exception must never cross into C
                pass

        self._cb = _cb  # keep a reference: ctypes callbacks die with their Python object
        llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc) -> None:
        if self._partial:
            self._feed("\n")
        silence()

    @contextlib.contextmanager
    def paused(self, null_callback=None):
        """llama.cpp's log to `null_callback` (a C function that does nothing) while inside, then back to this
        capture: a timed region must not call into Python for each line llama.cpp logs (a CUDA build logs debug
        lines per token), as llama-bench installs its llama_null_log_callback. Without a C callback nothing
        changes."""
        if null_callback is None or self._cb is None:
            yield
            return
        import llama_cpp

        llama_cpp.llama_log_set(null_callback, ctypes.c_void_p(0))
        try:
            yield
        finally:
            llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))


_silent_cb = None


def silence() -> None:
    """Route llama.cpp's log to nowhere (its default prints everything to stderr)."""
    global _silent_cb
    import llama_cpp

    if _silent_cb is None:  # created once and kept: llama.cpp holds the pointer for the process's life
        _silent_cb = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_silent_cb, ctypes.c_void_p(0))
