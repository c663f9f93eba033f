"""Check a GGUF file's header in Python before llama.cpp opens it.

A model file is untrusted input (a download, a file someone handed over), and llama.cpp's GGUF parser is C++
that has had memory-safety bugs before; the llama.cpp pinned here turns every structural damage the tests try
into a failed load, but its log tail is a poor reason and a future build may not. :func:`check` walks the whole
header (key/value pairs and tensor infos) with its own bounds-checked parser and raises :class:`InvalidGGUF`
with a one-line reason for anything off: every count, length, type, shape and offset is checked against the
file's size before it is used. It reads the file through a small window, never allocates in proportion to a
length read from the file, and never reads tensor data. Damage inside valid structure (a duplicated token, an
absurd hyper-parameter) is llama.cpp's to find: the measuring child process contains its crash.

The layout (GGUF v2/v3, little-endian; see ggml's ``gguf.cpp``)::

    "GGUF" u32 version, u64 n_tensors, u64 n_kv
    n_kv x (string key, u32 value type, value)              string = u64 length + bytes
    n_tensors x (string name, u32 n_dims, n_dims x i64 ne, u32 ggml type, u64 offset)
    padding to general.alignment, then the tensor data (offsets are relative to its start)
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO, NamedTuple

import gguf

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 (32-bit counts) is long gone from llama.cpp; v2 and v3 share this layout
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: llama.cpp rejects tensor names of this length or longer
MAX_KEY = 65535  # the spec's limit on a key's length
MAX_ARCH = 256  # general.architecture longer than this is no architecture name

# Fixed-size value types: type id -> bytes. STRING (8) and ARRAY (9) are variable.
_T_STRING, _T_ARRAY = int(gguf.GGUFValueType.STRING), int(gguf.GGUFValueType.ARRAY)
_T_UINT32 = int(gguf.GGUFValueType.UINT32)
_SCALAR_SIZE = {
    int(gguf.GGUFValueType.UINT8): 1, int(gguf.GGUFValueType.INT8): 1, int(gguf.GGUFValueType.BOOL): 1,
    int(gguf.GGUFValueType.UINT16): 2, int(gguf.GGUFValueType.INT16): 2,
    int(gguf.GGUFValueType.UINT32): 4, int(gguf.GGUFValueType.INT32): 4, int(gguf.GGUFValueType.FLOAT32): 4,
    int(gguf.GGUFValueType.UINT64): 8, int(gguf.GGUFValueType.INT64): 8, int(gguf.GGUFValueType.FLOAT64): 8,
}
# ggml type id -> (block size in elements, bytes per block)
_QUANT_SIZES = {int(t): sizes for t, sizes in gguf.GGML_QUANT_SIZES.items()}
_TYPE_NAMES = {int(t): t.name for t in gguf.GGMLQuantizationType}

# The fewest bytes one entry can take, to reject counts the file cannot hold before walking them.
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset
_HEADER_BYTES = 4 + 4 + 8 + 8

_SCALAR_FORMAT = {
    int(gguf.GGUFValueType.UINT8): "<B", int(gguf.GGUFValueType.INT8): "<b", int(gguf.GGUFValueType.BOOL): "<B",
    int(gguf.GGUFValueType.UINT16): "<H", int(gguf.GGUFValueType.INT16): "<h",
    int(gguf.GGUFValueType.UINT32): "<I", int(gguf.GGUFValueType.INT32): "<i", int(gguf.GGUFValueType.FLOAT32): "<f",
    int(gguf.GGUFValueType.UINT64): "<Q", int(gguf.GGUFValueType.INT64): "<q", int(gguf.GGUFValueType.FLOAT64): "<d",
}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")

_WINDOW = 1 << 20  # bytes read at a time


class InvalidGGUF(ValueError):
    """The file is not a GGUF llama.cpp can safely open; the message is one line saying why."""


MAX_STRING = 1024  # string values up to this length are kept (general.name, ...); longer ones are skipped


class TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # ne0 first, as GGUF stores it
    type_name: str  # ggml type name, e.g. "Q4_K"
    n_elements: int
    n_bytes: int


class Summary(NamedTuple):
    version: int  # GGUF version (2 or 3)
    n_tensors: int  # tensor infos in the header
    n_kv: int  # metadata key/value pairs
    architecture: str | None  # general.architecture, None when the file has none
    tensor_bytes: int  # sum of the tensors' data sizes (without alignment padding)
    file_bytes: int  # size of the file
    type_weights: dict[str, int]  # weights (elements) per ggml type name, e.g. {"Q4_K": ..., "F32": ...}
    hparams: dict[str, int | float]  # the numeric scalars, e.g. {"llama.block_count": 16, ...}
    type_bytes: dict[str, int] = {}  # bytes of tensor data per ggml type name
    tensors: tuple[TensorInfo, ...] = ()  # every tensor's info, in header order
    strings: dict[str, str] = {}  # string values of at most MAX_STRING bytes, e.g. {"general.name": ...}

    def shape(self) -> dict[str, int | str | None]:
        """The model's shape as its header gives it, for any architecture: layers, attention heads, KV heads, head
        size (key length, else width / heads), width and context length."""
        a = self.architecture or ""

        def get(key: str):
            v = self.hparams.get(f"{a}.{key}")
            return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        n_embd, n_head = get("embedding_length"), get("attention.head_count")
        head_dim = get("attention.key_length") or (n_embd // n_head if n_embd and n_head else None)
        return {"architecture": self.architecture, "n_layer": get("block_count"), "n_embd": n_embd,
                "n_head": n_head, "n_head_kv": get("attention.head_count_kv") or n_head, "head_dim": head_dim,
                "v_head_dim": get("attention.value_length") or head_dim, "n_ctx_train": get("context_length"),
                "sliding_window": get("attention.sliding_window")}

    def tensor_types(self) -> dict[str, dict[str, int]]:
        """{ggml type: {"n_weights": ..., "n_bytes": ...}}: what the analysis needs of a file, recorded with
        every measurement so that no report has to reopen the file."""
        return {t: {"n_weights": int(n), "n_bytes": int(self.type_bytes.get(t, 0))}
                for t, n in sorted(self.type_weights.items())}


class _Reader:
    """Bounds-checked little-endian reads of one file through a window of at most ~1 MiB."""

    def __init__(self, f: BinaryIO, size: int):
        self.f = f
        self.size = size
        self.base = 0  # file offset of buf[0]
        self.buf = b""

    def view(self, pos: int, n: int, what: str) -> tuple[bytes, int]:
        """(buffer, index) such that buffer[index:index + n] are the file's bytes at `pos`."""
        if pos + n > self.size:
            raise InvalidGGUF(f"truncated: {what} at byte {pos} runs past the end of the file ({self.size} bytes)")
        if pos < self.base or pos + n > self.base + len(self.buf):
            self.f.seek(pos)
            self.buf = self.f.read(max(n, _WINDOW))
            self.base = pos
            if len(self.buf) < n:  # the file shrank under us
                raise InvalidGGUF(f"truncated: {what} at byte {pos} could not be read")
        return self.buf, pos - self.base

    def u32(self, pos: int, what: str) -> int:
        buf, i = self.view(pos, 4, what)
        return _U32.unpack_from(buf, i)[0]

    def u64(self, pos: int, what: str) -> int:
        buf, i = self.view(pos, 8, what)
        return _U64.unpack_from(buf, i)[0]

    def i64(self, pos: int, what: str) -> int:
        buf, i = self.view(pos, 8, what)
        return _I64.unpack_from(buf, i)[0]

    def string(self, pos: int, what: str, limit: int | None) -> tuple[bytes | None, int]:
        """Read a GGUF string at `pos`: (its bytes, or None when longer than `limit`; position after it)."""
        n = self.u64(pos, f"{what} length")
        pos += 8
        if n > self.size - pos:
            raise InvalidGGUF(f"{what} claims {n} bytes at byte {pos}, past the end of the file ({self.size} bytes)")
        if limit is not None and n > limit:
            return None, pos + n
        buf, i = self.view(pos, n, what)
        return bytes(buf[i:i + n]), pos + n

    def skip_strings(self, pos: int, count: int, what: str) -> int:
        """Skip `count` consecutive strings; the hot loop of a vocabulary (128k tokens, 280k merges)."""
        size = self.size
        unpack = _U64.unpack_from
        buf, base = self.buf, self.base
        end = base + len(buf)
        for k in range(count):
            if pos < base or pos + 8 > end:
                buf, i = self.view(pos, 8, f"{what}[{k}] length")
                base, end = self.base, self.base + len(buf)
            (n,) = unpack(buf, pos - base)
            pos += 8 + n
            if pos > size:
                raise InvalidGGUF(f"{what}[{k}] claims {n} bytes, past the end of the file ({size} bytes)")
        return pos


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _value(r: _Reader, pos: int, vtype: int, key: str) -> int:
    """Skip one value of type `vtype` at `pos`; return the position after it."""
    if vtype in _SCALAR_SIZE:
        n = _SCALAR_SIZE[vtype]
        r.view(pos, n, f"value of {key!r}")
        return pos + n
    if vtype == _T_STRING:
        return r.string(pos, f"string value of {key!r}", limit=0)[1]
    if vtype == _T_ARRAY:
        etype = r.u32(pos, f"array type of {key!r}")
        count = r.u64(pos + 4, f"array length of {key!r}")
        pos += 12
        if etype in _SCALAR_SIZE:
            need = count * _SCALAR_SIZE[etype]
            if need > r.size - pos:
                raise InvalidGGUF(f"array {key!r} claims {count} elements ({need} bytes) at byte {pos}, past the "
                                  f"end of the file ({r.size} bytes)")
            return pos + need
        if etype == _T_STRING:
            if count * 8 > r.size - pos:
                raise InvalidGGUF(f"array {key!r} claims {count} strings at byte {pos}, more than the rest of "
                                  f"the file can hold")
            return r.skip_strings(pos, count, key)
        raise InvalidGGUF(f"array {key!r} has element type {etype}, which GGUF does not allow in an array")
    raise InvalidGGUF(f"key {key!r} has unknown value type {vtype}")


def check(path: str | os.PathLike, expect_arch: str | None = "llama") -> Summary:
    """Validate the GGUF header of `path`; raise InvalidGGUF(one-line reason) for anything llama.cpp must not
    be given. `expect_arch`: required general.architecture, None to accept any. OSError (no such file) passes
    through."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return _check(_Reader(f, size), expect_arch)


def _check(r: _Reader, expect_arch: str | None) -> Summary:
    size = r.size
    if size < _HEADER_BYTES:
        raise InvalidGGUF(f"file is {size} bytes, too small for a GGUF header ({_HEADER_BYTES} bytes)")
    buf, _ = r.view(0, _HEADER_BYTES, "header")
    magic = bytes(buf[:4])
    if magic != MAGIC:
        raise InvalidGGUF(f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
    version = _U32.unpack_from(buf, 4)[0]
    if version not in VERSIONS:
        raise InvalidGGUF(f"GGUF version {version} is not supported (only {' and '.join(map(str, VERSIONS))})")
    n_tensors, n_kv = _U64.unpack_from(buf, 8)[0], _U64.unpack_from(buf, 16)[0]
    room = size - _HEADER_BYTES
    if n_kv > room // _MIN_KV_BYTES:
        raise InvalidGGUF(f"absurd key/value count {n_kv} for a file of {size} bytes")
    if n_tensors > room // _MIN_TENSOR_INFO_BYTES:
        raise InvalidGGUF(f"absurd tensor count {n_tensors} for a file of {size} bytes")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > room:
        raise InvalidGGUF(f"{n_kv} key/value pairs and {n_tensors} tensor infos cannot fit in {size} bytes")

    # --- key/value pairs
    pos = _HEADER_BYTES
    keys: set[bytes] = set()
    architecture: str | None = None
    alignment = DEFAULT_ALIGNMENT
    hparams: dict[str, int | float] = {}
    strings: dict[str, str] = {}
    for i in range(n_kv):
        raw, pos = r.string(pos, f"key #{i}", limit=MAX_KEY)
        if raw is None:
            raise InvalidGGUF(f"key #{i} is longer than {MAX_KEY} bytes")
        if raw in keys:
            raise InvalidGGUF(f"duplicate key {_text(raw)!r}")
        keys.add(raw)
        key = _text(raw)
        vtype = r.u32(pos, f"value type of {key!r}")
        pos += 4
        if raw == b"general.architecture":
            if vtype != _T_STRING:
                raise InvalidGGUF(f"general.architecture has value type {vtype}, not string")
            value, pos = r.string(pos, "general.architecture", limit=MAX_ARCH)
            if value is None:
                raise InvalidGGUF(f"general.architecture is longer than {MAX_ARCH} bytes")
            architecture = _text(value)
        elif raw == b"general.alignment":
            if vtype != _T_UINT32:  # llama.cpp asserts (aborts) on any other type
                raise InvalidGGUF(f"general.alignment has value type {vtype}, not uint32")
            alignment = r.u32(pos, "general.alignment")
            pos += 4
            if alignment == 0 or alignment & (alignment - 1):
                raise InvalidGGUF(f"general.alignment {alignment} is not a power of two")
        elif vtype == _T_STRING:
            value, pos = r.string(pos, f"string value of {key!r}", limit=MAX_STRING)
            if value is not None:
                strings[key] = _text(value)
        elif vtype in _SCALAR_FORMAT:
            buf, at = r.view(pos, _SCALAR_SIZE[vtype], f"value of {key!r}")
            hparams[key] = struct.unpack_from(_SCALAR_FORMAT[vtype], buf, at)[0]
            pos += _SCALAR_SIZE[vtype]
        else:
            pos = _value(r, pos, vtype, key)
    if expect_arch is not None and architecture != expect_arch:
        got = "none" if architecture is None else repr(architecture)
        raise InvalidGGUF(f"general.architecture is {got}, expected {expect_arch!r}")

    # --- tensor infos; the counts were bounded by the file size, so these lists are too
    left = n_tensors * _MIN_TENSOR_INFO_BYTES
    names: set[bytes] = set()
    spans: list[tuple[int, int, str]] = []  # (offset, nbytes, name)
    type_weights: dict[str, int] = {}
    type_nbytes: dict[str, int] = {}
    infos: list[TensorInfo] = []
    for i in range(n_tensors):
        left -= _MIN_TENSOR_INFO_BYTES
        raw, pos = r.string(pos, f"name of tensor #{i}", limit=MAX_NAME - 1)
        if raw is None:
            raise InvalidGGUF(f"name of tensor #{i} is {MAX_NAME} bytes or longer")
        name = _text(raw)
        if raw in names:
            raise InvalidGGUF(f"duplicate tensor {name!r}")
        names.add(raw)
        n_dims = r.u32(pos, f"n_dims of {name!r}")
        pos += 4
        if not 1 <= n_dims <= MAX_DIMS:
            raise InvalidGGUF(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = []
        for d in range(n_dims):
            ne = r.i64(pos, f"dimension {d} of {name!r}")
            pos += 8
            if ne <= 0:
                raise InvalidGGUF(f"tensor {name!r} has dimension {d} = {ne}")
            dims.append(ne)
        ttype = r.u32(pos, f"type of {name!r}")
        offset = r.u64(pos + 4, f"offset of {name!r}")
        pos += 12
        if ttype not in _QUANT_SIZES:
            raise InvalidGGUF(f"tensor {name!r} has unknown ggml type {ttype}")
        block, type_bytes = _QUANT_SIZES[ttype]
        if dims[0] % block:
            raise InvalidGGUF(f"tensor {name!r}: row of {dims[0]} elements is not a multiple of "
                              f"{_TYPE_NAMES[ttype]}'s block of {block}")
        n_elements = 1
        for ne in dims:
            n_elements *= ne
        nbytes = n_elements // block * type_bytes
        if nbytes > size:  # before any sum: shapes like 2**40 x 2**40 stop here
            raise InvalidGGUF(f"tensor {name!r} of shape {dims} needs {nbytes} bytes, more than the file's {size}")
        if offset % alignment:
            raise InvalidGGUF(f"tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}")
        spans.append((offset, nbytes, name))
        infos.append(TensorInfo(name, tuple(dims), _TYPE_NAMES[ttype], n_elements, nbytes))
        type_weights[_TYPE_NAMES[ttype]] = type_weights.get(_TYPE_NAMES[ttype], 0) + n_elements
        type_nbytes[_TYPE_NAMES[ttype]] = type_nbytes.get(_TYPE_NAMES[ttype], 0) + nbytes
        if pos + left > size:
            raise InvalidGGUF(f"truncated: {n_tensors - i - 1} more tensor infos cannot fit after byte {pos}")

    # --- tensor data: inside the file, no overlaps
    data_start = -(-pos // alignment) * alignment
    tensor_bytes = 0
    end_prev, name_prev = 0, ""
    for offset, nbytes, name in sorted(spans):
        if data_start + offset + nbytes > size:
            raise InvalidGGUF(f"tensor {name!r} data (bytes {data_start + offset}..{data_start + offset + nbytes}) "
                              f"runs past the end of the file ({size} bytes): truncated or bad offset")
        if offset < end_prev:
            raise InvalidGGUF(f"tensors {name_prev!r} and {name!r} overlap")
        end_prev, name_prev = offset + nbytes, name
        tensor_bytes += nbytes
    return Summary(version, n_tensors, n_kv, architecture, tensor_bytes, size, type_weights, hparams, type_nbytes,
                   tuple(infos), strings)
