"""Shape-faithful synthetic models: the exact Llama 3.2 1B architecture with seeded random weights.

Speed and memory depend on tensor shapes and quant types, not on weight values, so a file with the real
model's metadata, tensor names and shapes measures the same work as the real download (quality does not
carry over). The quants are built from what this module defines (:mod:`harness.sources.quantize`): each
tensor's type comes from llama.cpp's quantizer run dry over a header-only F16 file written here, and its bytes
from llama.cpp quantizing the first rows of the seeded values (:mod:`harness.sources.tiled`). The full F16 file
(the seeded values themselves) is the source of the reference quants that llama.cpp's quantizer makes the slow
way, against which the tiled ones are checked.

Tensors are written one at a time, so writing the 2.5 GB F16 file of the 1B model needs no more memory
than its largest tensor.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

# Bumped whenever the bytes this module writes (or the quants built from it) change, so cached files are rebuilt.
# 3: quants tiled from llama.cpp's blocks (types from its quantizer's dry run), not quantized whole; 4: the rows
# after the first ones made of those rows' blocks drawn at random, not the first rows repeated.
WRITER_VERSION = 4


class Arch(NamedTuple):
    name: str  # key used in configs and cache paths
    hf_id: str  # the model this shape copies
    n_vocab: int  # tokens, special ones included
    n_special: int  # special tokens at the end of the vocabulary (Llama 3: 256)
    n_embd: int  # hidden size
    n_layer: int  # transformer blocks
    n_head: int  # attention heads
    n_head_kv: int  # key/value heads (grouped-query attention)
    n_ff: int  # feed-forward inner size
    n_ctx_train: int  # trained context length
    rope_theta: float  # rope base frequency
    rms_eps: float  # RMSNorm epsilon
    # llama3 rope scaling: factor, low_freq_factor, high_freq_factor, original context (the rope_freqs tensor)
    rope_scaling: tuple[float, float, float, int]

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def n_params(self) -> int:
        """Parameter count as llama.cpp reports it (tied embeddings; rope_freqs included)."""
        return sum(int(np.prod(shape)) for _, shape, _ in tensor_specs(self))


ARCHS: dict[str, Arch] = {
    # meta-llama/Llama-3.2-1B config.json
    "llama-3.2-1b": Arch(
        "llama-3.2-1b", "meta-llama/Llama-3.2-1B", 128256, 256, 2048, 16, 32, 8, 8192, 131072,
        500000.0, 1e-5, (32.0, 1.0, 4.0, 8192),
    ),
    # Same structure, small (~4.6M parameters): GQA 4 and head dim 64 like the real model, 8 layers so
    # llama.cpp's layer-dependent recipe rules (first/last eighth, every third layer) all apply, and every
    # row length a multiple of 256 so K- and IQ-quants apply to every matrix.
    "tiny": Arch(
        "tiny", "meta-llama/Llama-3.2-1B (scaled down)", 512, 16, 256, 8, 4, 1, 512, 4096,
        500000.0, 1e-5, (32.0, 1.0, 4.0, 8192),
    ),
}

# ggml type ids, from gguf.GGMLQuantizationType; kept literal so this table reads without gguf.
F32, F16 = 0, 1


def tensor_specs(arch: Arch) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, numpy shape = reversed ggml ne, ggml type) in the order convert_hf_to_gguf.py writes them."""
    e, hd = arch.n_embd, arch.head_dim
    specs: list[tuple[str, tuple[int, ...], int]] = [
        ("rope_freqs.weight", (hd // 2,), F32),
        ("token_embd.weight", (arch.n_vocab, e), F16),
    ]
    for i in range(arch.n_layer):
        b = f"blk.{i}"
        specs += [
            (f"{b}.attn_norm.weight", (e,), F32),
            (f"{b}.attn_q.weight", (arch.n_head * hd, e), F16),
            (f"{b}.attn_k.weight", (arch.n_head_kv * hd, e), F16),
            (f"{b}.attn_v.weight", (arch.n_head_kv * hd, e), F16),
            (f"{b}.attn_output.weight", (e, arch.n_head * hd), F16),
            (f"{b}.ffn_norm.weight", (e,), F32),
            (f"{b}.ffn_gate.weight", (arch.n_ff, e), F16),
            (f"{b}.ffn_up.weight", (arch.n_ff, e), F16),
            (f"{b}.ffn_down.weight", (e, arch.n_ff), F16),
        ]
    specs.append(("output_norm.weight", (e,), F32))
    return specs


def rope_factors(arch: Arch) -> np.ndarray:
    """Llama 3 rope scaling factors, exactly as convert_hf_to_gguf.py computes rope_freqs."""
    factor, low, high, old_ctx = arch.rope_scaling
    dim = arch.head_dim
    freqs = 1.0 / (arch.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# Llama 3's first special tokens; the rest are <|reserved_special_token_N|>.
_LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 printable characters byte-level BPE spells bytes with."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


class Tokenizer(NamedTuple):
    tokens: list[str]  # id -> token text
    types: list[int]  # id -> gguf TokenType (1 normal, 3 control)
    merges: list[str]  # "left right", rank order
    bos: int  # <|begin_of_text|>
    eos: int  # <|end_of_text|>


@functools.cache  # ~1 s for the 1B's 128k tokens, and every file built in a process writes them
def build_tokenizer(arch: Arch) -> Tokenizer:
    """A byte-level BPE vocabulary of the right size that llama.cpp loads as Llama 3's ("gpt2", "llama-bpe").

    256 byte tokens, then merged tokens (every byte pair, then byte triples) up to the regular vocabulary
    size, then the special tokens. Real merges would change token ids, never tensor shapes.
    """
    chars = _byte_chars()
    n_regular = arch.n_vocab - arch.n_special
    tokens = list(chars)
    merges: list[str] = []
    pairs = ((a, b) for a in chars for b in chars)
    for a, b in pairs:
        if len(tokens) >= n_regular:
            break
        tokens.append(a + b)
        merges.append(f"{a} {b}")
    i = 256
    while len(tokens) < n_regular:  # triples: each pair token extended by each byte
        left = tokens[i]
        for c in chars:
            if len(tokens) >= n_regular:
                break
            tokens.append(left + c)
            merges.append(f"{left} {c}")
        i += 1
    specials = _LLAMA3_SPECIALS[: arch.n_special]
    specials += [f"<|reserved_special_token_{k}|>" for k in range(3, 3 + arch.n_special - len(specials))]
    types = [1] * len(tokens) + [3] * len(specials)
    tokens += specials
    assert len(tokens) == arch.n_vocab and len(set(tokens)) == len(tokens)
    return Tokenizer(tokens, types, merges, bos=n_regular, eos=n_regular + 1)


def stream(name: str, seed: int, *more: int) -> np.random.Generator:
    """The seeded random stream of tensor `name` (`more`: another stream of it): one per tensor, keyed by name,
    so a tensor's values do not depend on the others."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), *more])


def random_weights(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The seeded values of matrix `name` (float32), its first ``shape[0]`` rows when `shape` has fewer rows than
    the tensor: the stream is drawn row after row, so a slice's values are the whole tensor's first rows."""
    rng = stream(name, seed)
    scale = 1.0 / math.sqrt(shape[-1])  # keeps activations O(1) through the random layers
    data = rng.standard_normal(shape, dtype=np.float32)
    data *= scale
    return data


def fixed_values(name: str, shape: tuple[int, ...], arch: Arch) -> np.ndarray | None:
    """The real values of the tensors that are not random (F32 norms, rope factors), else None."""
    if name == "rope_freqs.weight":
        return rope_factors(arch)
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float32)
    return None


def _tensor_data(name: str, shape: tuple[int, ...], ggml_type: int, arch: Arch, seed: int) -> np.ndarray:
    fixed = fixed_values(name, shape, arch)
    if fixed is not None:
        return fixed
    data = random_weights(name, shape, seed)
    return data.astype(np.float16) if ggml_type == F16 else data


def iter_tensors(arch: Arch, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    for name, shape, t in tensor_specs(arch):
        yield name, _tensor_data(name, shape, t, arch, seed)


def add_metadata(w, arch: Arch, seed: int) -> None:
    """Every key of the synthetic model's header but ``general.file_type``, which llama.cpp's quantizer moves to
    the end (it removes the key and appends it after ``general.quantization_version``): the F16 writer and the
    tiled quants append theirs after these, so both lay their keys out as llama.cpp's quantizer does."""
    import gguf

    tok = build_tokenizer(arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(f"synthetic {arch.name} (seed {seed})")
    w.add_description(f"shape-faithful copy of {arch.hf_id} with seeded random weights, written by harness")
    w.add_string("harness.synthetic.architecture", arch.name)
    w.add_uint32("harness.synthetic.seed", seed)
    w.add_uint32("harness.synthetic.writer_version", WRITER_VERSION)
    w.add_block_count(arch.n_layer)
    w.add_context_length(arch.n_ctx_train)
    w.add_embedding_length(arch.n_embd)
    w.add_feed_forward_length(arch.n_ff)
    w.add_head_count(arch.n_head)
    w.add_head_count_kv(arch.n_head_kv)
    w.add_rope_freq_base(arch.rope_theta)
    w.add_layer_norm_rms_eps(arch.rms_eps)
    w.add_vocab_size(arch.n_vocab)
    w.add_rope_dimension_count(arch.head_dim)
    w.add_key_length(arch.head_dim)
    w.add_value_length(arch.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.types)
    w.add_token_merges(tok.merges)
    w.add_bos_token_id(tok.bos)
    w.add_eos_token_id(tok.eos)
    w.add_add_bos_token(True)


def write_f16(arch: Arch, path: str | os.PathLike, seed: int = 0, progress: bool = False,
              data: bool = True) -> Path:
    """Write the F16 GGUF of `arch` with seeded random weights; atomic (a partial file never has `path`).

    ``data=False``: the header alone, the data region left a hole of its full size (a sparse file: nothing
    written, no disk used where the file system supports holes). llama.cpp's loader accepts it (it checks that
    each tensor lies inside the file, and reads nothing until asked), which is all its quantizer's dry run needs
    to choose every tensor's type.
    """
    import gguf
    from tqdm import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    w = gguf.GGUFWriter(tmp, arch="llama")
    add_metadata(w, arch, seed)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    specs = tensor_specs(arch)
    np_dtype = {F32: np.float32, F16: np.float16}
    sizes = [int(np.prod(shape)) * np.dtype(np_dtype[t]).itemsize for _, shape, t in specs]
    for (name, shape, t), nbytes in zip(specs, sizes):
        w.add_tensor_info(name, shape, np.dtype(np_dtype[t]), nbytes)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if data:
            with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"write {arch.name} F16",
                      disable=None if progress else True, leave=False) as bar:
                for _name, values in iter_tensors(arch, seed):
                    w.write_tensor_data(values)
                    bar.update(values.nbytes)
        else:
            f = w.fout[0]
            f.truncate(w.ggml_pad(f.tell(), w.data_alignment) + sum(w.ggml_pad(n, w.data_alignment) for n in sizes))
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%d bytes)", path, path.stat().st_size)
    return path
