"""Kernel probes: this device's time per weight for each ggml tensor type, measured apart from the quants.

Where generation is compute-bound (a small CPU), tok/s depends more on which dequantize-and-dot kernels a
file's tensors use than on its size: IQ3_M, the smallest of the page's files, is the slowest on this project's
machines. A model fitted to the other quants cannot know a kernel that only the held-out quant uses. A probe
measures each kernel on its own: a model with the measured model's layer shapes (the same matrices, so the
same kernels, blocking and CPU repacking) but few layers and a 512-token vocabulary, every matrix in one ggml
type (llama.cpp's quantizer's ``pure`` recipe), measured with the same tg test as the quants. Each type is probed
at two layer counts; the difference of their times per token over the difference of their weights is that
type's cost per weight, free of the probe's own per-token overhead (output, decode call, synchronisation);
:mod:`harness.analysis.calibration` turns it into a feature of the tg model::

    kernel time of a file = sum over its tensor types of (weights in that type x the type's probe cost)

Probe files are built once per shape, type and llama.cpp version and cached beside the synthetic models, the
way the synthetic quants are (:func:`harness.sources.quantize.build_tiled`: the types from llama.cpp's
quantizer's dry run with ``pure``, the blocks llama.cpp's own quantization of seeded random rows, tiled).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from harness.gguf import validate
from harness.sources import quantize, tiled
from harness.sources.synthetic import Arch

log = logging.getLogger(__name__)

VOCAB, N_SPECIAL = 512, 16  # the output matmul is then negligible (1M weights)
SEED = 0

# ggml type -> the llama.cpp file type whose base type it is; with ``pure`` every matrix gets that type.
PURE_FTYPES: dict[str, str] = {
    "F16": "LLAMA_FTYPE_MOSTLY_F16", "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K", "Q3_K": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q4_K": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "IQ2_XXS": "LLAMA_FTYPE_MOSTLY_IQ2_XXS", "IQ2_XS": "LLAMA_FTYPE_MOSTLY_IQ2_XS",
    "IQ2_S": "LLAMA_FTYPE_MOSTLY_IQ2_M", "IQ3_XXS": "LLAMA_FTYPE_MOSTLY_IQ3_XXS",
    "IQ3_S": "LLAMA_FTYPE_MOSTLY_IQ3_S", "IQ4_NL": "LLAMA_FTYPE_MOSTLY_IQ4_NL", "IQ4_XS": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
    "IQ1_S": "LLAMA_FTYPE_MOSTLY_IQ1_S", "IQ1_M": "LLAMA_FTYPE_MOSTLY_IQ1_M",
}
UNPROBED = {"F32"}  # norms and rope factors: a few thousand weights per layer


class ProbeError(RuntimeError):
    """A probe cannot be built for this file (not a llama shape the writer knows, an unknown type)."""


def types_to_probe(type_weights: dict[str, int]) -> list[str]:
    """The ggml types of a file worth a probe, most weights first (F32 norms are not)."""
    return [t for t, _ in sorted(type_weights.items(), key=lambda kv: -kv[1]) if t not in UNPROBED]


def shape_of(hparams: dict[str, Any], expect_arch: str = "llama") -> Arch:
    """The architecture of a llama GGUF from its header's hyper-parameters (harness.gguf.validate's Summary)."""
    def get(key: str) -> Any:
        v = hparams.get(f"{expect_arch}.{key}")
        if v is None:
            raise ProbeError(f"the file's header has no {expect_arch}.{key}: cannot build a probe of its shape")
        return v

    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    n_head_kv = int(hparams.get(f"{expect_arch}.attention.head_count_kv", n_head))
    if n_head <= 0 or n_embd % n_head or n_head_kv <= 0 or n_head % n_head_kv:
        raise ProbeError(f"unsupported attention shape: {n_embd} wide, {n_head} heads, {n_head_kv} KV heads")
    return Arch(
        name="shape", hf_id="(from the measured file's header)",
        n_vocab=int(hparams.get(f"{expect_arch}.vocab_size", 0)), n_special=0,
        n_embd=n_embd, n_layer=int(get("block_count")), n_head=n_head, n_head_kv=n_head_kv,
        n_ff=int(get("feed_forward_length")), n_ctx_train=int(hparams.get(f"{expect_arch}.context_length", 4096)),
        rope_theta=float(hparams.get(f"{expect_arch}.rope.freq_base", 500000.0)),
        rms_eps=float(hparams.get(f"{expect_arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_scaling=(32.0, 1.0, 4.0, 8192),
    )


def probe_arch(shape: Arch, n_layer: int) -> Arch:
    """`shape`'s layers (same matrices) but `n_layer` of them and a 512-token vocabulary; named by its shape,
    so one cache entry serves every model with these layers."""
    name = f"probe-e{shape.n_embd}-f{shape.n_ff}-h{shape.n_head}-kv{shape.n_head_kv}-l{n_layer}"
    return shape._replace(name=name, hf_id=f"kernel probe ({shape.hf_id})", n_vocab=VOCAB, n_special=N_SPECIAL,
                          n_layer=n_layer)


def probe_file(cache_dir: Path, parch: Arch, type_name: str) -> Path:
    return quantize.synthetic_dir(cache_dir, parch.name, SEED) / f"llama-cpp-python-{quantize.llama_cpp_version()}" \
        / f"{parch.name}-{type_name}-pure.gguf"


def ensure_probe(cache_dir: Path, parch: Arch, type_name: str, progress: bool = False) -> tuple[Path, bool]:
    """The probe file of `type_name` for `parch`, built if not cached: (path, built_now)."""
    if type_name not in PURE_FTYPES:
        raise ProbeError(f"no probe for ggml type {type_name} (known: {', '.join(PURE_FTYPES)})")
    target = probe_file(cache_dir, parch, type_name)
    if target.exists():
        return target, False
    # A uniform importance matrix, as for the synthetic quants (the IQ2 types require one).
    quantize.build_tiled(parch, SEED, target, PURE_FTYPES[type_name], label=f"probe {type_name}", pure=True,
                         imatrix=True, progress=progress)
    try:
        got = validate.check(target).type_weights
    except validate.InvalidGGUF as e:
        target.unlink()
        raise ProbeError(f"llama.cpp's pure {PURE_FTYPES[type_name]} wrote an invalid file: {e}") from None
    stray = {t for t in got if t not in (type_name, "F32")}
    if stray:
        target.unlink()
        raise ProbeError(f"llama.cpp's pure {PURE_FTYPES[type_name]} gave {sorted(got)}, not only {type_name}")
    return target, True


def base_label(type_name: str, n_layer: int) -> str:
    """The `quant` of the base probe's records ("Q4_K@2L"): the main probe's is the type name alone."""
    return f"{type_name}@{n_layer}L"


def split_label(label: str) -> tuple[str, int | None]:
    """("Q4_K", 2) for "Q4_K@2L", ("Q4_K", None) for "Q4_K"."""
    t, _, n = label.partition("@")
    return t, int(n[:-1]) if n.endswith("L") and n[:-1].isdigit() else None


def weights_ref(parch: Arch, type_name: str) -> str:
    return (f"kernel probe: {parch.n_layer} layers of {parch.n_embd}x{parch.n_ff}, all {type_name}, seed={SEED}, "
            f"{tiled.WEIGHTS_REF}")
