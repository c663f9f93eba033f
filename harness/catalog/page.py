"""The page under test (``shared/seed/llama-3.2-1b-requirements-page.txt``), its printed numbers and the rule
that reproduces every one of them.

The page prints, for 12 quants, bits, VRAM (GB) and file size (GB), and at Q4_K_M a tok/s figure for four
GPUs. Its text gives formulas that do not produce those numbers; the rules below do, to the last printed
digit (``tests/test_page.py`` checks all 52 figures):

* file size = 1,235,814,400 params x bits / 8, in 1e9 bytes, printed to 2 decimals;
* VRAM = file size x 1.10 (unrounded file size), printed to 1 decimal;
* tok/s = bandwidth (GB/s) / (1.2B x bits / 8 / 1e9 + 0.1 GB) x efficiency, 0.65 for NVIDIA and 0.55 for
  AMD, with bandwidths MI300X 5300, RTX 4090 1008, H100 SXM 3352 and MI250X 3277 GB/s.

:data:`DISCREPANCIES` lists where the page's text and its numbers part ways; the report prints it.
Everything here is the page's claim, not a measurement.
"""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd

from harness.catalog import quants

GB = 1e9  # the page's GB are decimal

N_PARAMS = 1_235_814_400  # what the File Size column uses: Llama 3.2 1B's real count (tied embeddings)
N_PARAMS_TEXT = 1.2e9  # what the FAQ's arithmetic ("1.2B x 4.8 bits / 8") and the speed figures use
VRAM_FACTOR = 1.10  # VRAM column = file size x this
SPEED_OVERHEAD_GB = 0.1  # "KV Cache + Overhead ~ 0.1 GB", added to the 1.2B-param weights in the speed figures
BAND = 0.20  # "Real-world results typically within +-20%"
EFFICIENCY = {"nvidia": 0.65, "amd": 0.55}  # implied by the four printed speeds; the text only says 0.55
DEFAULT_EFFICIENCY = 0.55  # the text's factor, applied where the page prints no speed (CPU, Apple, Intel)
SPEED_QUANT = "Q4_K_M"  # the only quant the page prints speeds for


class PageRow(NamedTuple):
    """One row of the page's VRAM table, as printed."""

    quant: str  # quant name, e.g. "Q4_K_M"
    bits: float  # "Bits" column
    vram_gb: float  # "VRAM" column, GB
    file_gb: float  # "File Size" column, GB
    quality: str  # "Quality" column


# Transcribed from the page, in its order.
ROWS: tuple[PageRow, ...] = (
    PageRow("IQ3_M", 3.60, 0.6, 0.56, "Importance-weighted 3-bit, medium"),
    PageRow("Q4_0", 4.00, 0.7, 0.62, "4-bit legacy quantization"),
    PageRow("Q3_K_L", 4.10, 0.7, 0.63, "3-bit large quantization"),
    PageRow("IQ4_XS", 4.30, 0.7, 0.66, "Importance-weighted 4-bit, compact"),
    PageRow("Q4_K_S", 4.50, 0.8, 0.70, "4-bit small quantization"),
    PageRow("Q4_K_M", 4.80, 0.8, 0.74, "4-bit medium quantization - most popular sweet spot"),
    PageRow("Q4_K_L", 4.90, 0.8, 0.76, "4-bit large quantization"),
    PageRow("Q5_K_S", 5.50, 0.9, 0.85, "5-bit small quantization"),
    PageRow("Q5_K_M", 5.70, 1.0, 0.88, "5-bit medium quantization - good quality/size tradeoff"),
    PageRow("Q5_K_L", 5.80, 1.0, 0.90, "5-bit large quantization"),
    PageRow("Q6_K", 6.60, 1.1, 1.02, "6-bit quantization, very good quality"),
    PageRow("Q8_0", 8.00, 1.4, 1.24, "8-bit quantization, near-lossless"),
)
BY_QUANT: dict[str, PageRow] = {r.quant: r for r in ROWS}

# The page's "quality" percentages (its chart under the table: "IQ3_M 0.6 GB ~78% ... Q8_0 1.4 GB ~99%"), as
# printed; the page never says what they measure or against what.
QUALITY_CLAIMS: dict[str, str] = {"IQ3_M": "~78%", "IQ4_XS": "~87%", "Q4_K_M": "~89%", "Q4_K_L": "~90%",
                                  "Q5_K_M": "~92%", "Q8_0": "~99%"}


class PageSpeed(NamedTuple):
    """One printed speed at Q4_K_M and the bandwidth and vendor that reproduce it."""

    device: str  # the page's device name (harness.catalog.devices.lookup finds it in the catalog)
    vendor: str  # "nvidia" or "amd": picks the efficiency
    tok_s: int  # printed "~N tok/s"
    bandwidth_gb_s: float  # the bandwidth the page must have used (= the spec sheet's)


SPEEDS: tuple[PageSpeed, ...] = (
    PageSpeed("AMD Instinct MI300X", "amd", 3555, 5300.0),
    PageSpeed("NVIDIA GeForce RTX 4090", "nvidia", 799, 1008.0),
    PageSpeed("NVIDIA H100 SXM", "nvidia", 2657, 3352.0),
    PageSpeed("AMD Instinct MI250X", "amd", 2198, 3277.0),
)

# Where the page's text and its own numbers disagree (each checked by tests/test_page.py).
DISCREPANCIES: list[str] = [
    "VRAM column = file size x 1.10 (1,235,814,400 params x bits / 8 x 1.1, rounded to 0.1 GB) reproduces all "
    "12 rows. The FAQ's 'VRAM = Weights + KV Cache + Overhead' with 'KV Cache + Overhead ~ 0.1 GB' and 1.2B "
    "params does not: at Q8_0 it gives 1.2 + 0.1 = 1.3 GB, the table prints 1.4 GB.",
    "File Size uses 1,235,814,400 parameters (the real count); the FAQ's arithmetic uses 1.2B "
    "('1.2B x 4.8 bits / 8 = 0.7 GB', really 0.72 GB, while the table's Q4_K_M file is 0.74 GB).",
    "The tok/s figures divide by 0.82 GB = 1.2B x 4.8 bits / 8 + 0.1 GB, not by the 0.8 GB the text says "
    "('Estimated speed at Q4_K_M (0.8 GB)'), nor by the VRAM formula's 0.816 GB or the 0.74 GB file.",
    "The worked example '5300 / 0.8 x 0.55 = ~3555 tok/s' is wrong arithmetic: 5300 / 0.8 x 0.55 = 3644; "
    "3555 is 5300 / 0.82 x 0.55.",
    "Efficiency is 0.65 for the NVIDIA GPUs (RTX 4090: 1008 / 0.82 x 0.65 = 799; H100 SXM: 3352 / 0.82 x 0.65 "
    "= 2657) and 0.55 for the AMD ones (MI300X 5300, MI250X 3277 GB/s); the text names only 0.55.",
    "The speed formula reads every weight once per token at a fixed efficiency: it has no term for the "
    "quant's kernel cost, the KV cache read at depth, or per-token overhead, and no batch size or context.",
    "'KV Cache + Overhead ~ 0.1 GB (at 2K context + ~0.3 GB framework)' contradicts itself: 0.3 GB of "
    "framework alone exceeds 0.1 GB. The f16 KV cache at 2K context alone is 2 x 16 layers x 8 KV heads x "
    "64 dims x 2 bytes x 2048 = 64 MiB (0.067 GB).",
    "The '+ Context' column is '-' in every row: the VRAM figures carry no context term although the text "
    "speaks of a 128K context window.",
    "The Bits column is nominal: a file's true bits per weight include its embedding/output tensors and mixed "
    "tensor types (the report measures 8 x model bytes / params).",
    "'The full-precision Q8_0 version is 1.24 GB': Q8_0 is 8-bit; full precision (BF16) is "
    "1,235,814,400 x 2 bytes = 2.47 GB.",
    "'0.6 GB ... exceeds the unified memory of most consumer Macs': every Apple-silicon Mac has 8 GB or more.",
]


def row(quant: str) -> PageRow:
    try:
        return BY_QUANT[quant]
    except KeyError:
        raise quants.UnknownQuant(
            f"the page has no row for {quant!r}{quants.suggest(quant, BY_QUANT)}; it lists: {', '.join(BY_QUANT)}"
        ) from None


def file_gb_formula(quant: str) -> float:
    """File size by the page's rule, unrounded GB."""
    return N_PARAMS * row(quant).bits / 8 / GB


def vram_gb_formula(quant: str) -> float:
    """VRAM by the page's rule, unrounded GB."""
    return file_gb_formula(quant) * VRAM_FACTOR


def speed_model_gb(quant: str) -> float:
    """The 'model GB' the speed figures divide by: 1.2B x bits / 8 + 0.1 GB (0.82 GB at Q4_K_M)."""
    return N_PARAMS_TEXT * row(quant).bits / 8 / GB + SPEED_OVERHEAD_GB


def page_file_bytes(quant: str, printed: bool = True) -> float:
    """The page's file size in bytes: as printed (2 decimals of GB), or the formula's unrounded value."""
    return row(quant).file_gb * GB if printed else file_gb_formula(quant) * GB


def page_vram_bytes(quant: str, printed: bool = True) -> float:
    """The page's VRAM in bytes: as printed (1 decimal of GB), or the formula's unrounded value."""
    return row(quant).vram_gb * GB if printed else vram_gb_formula(quant) * GB


def efficiency(vendor: str | None) -> float:
    """The page's efficiency for a vendor ("nvidia", "amd"); the text's 0.55 for anything else."""
    return EFFICIENCY.get((vendor or "").lower(), DEFAULT_EFFICIENCY)


def rule_tok_s(bandwidth_gb_s: float, vendor: str | None, weights_gb: float) -> float:
    """The page's speed rule, the one place it is coded: bandwidth (GB/s) / (weights GB + its 0.1 GB of KV cache
    and overhead) x its efficiency (0.65 NVIDIA, 0.55 AMD, the text's 0.55 for anything else). Applied to
    another model's file (a published row's), `weights_gb` is that file's size: the rule extrapolated."""
    return bandwidth_gb_s / (weights_gb + SPEED_OVERHEAD_GB) * efficiency(vendor)


def page_tok_s(device_bandwidth_gb_s: float, vendor: str | None, quant: str = SPEED_QUANT) -> float:
    """The page's tok/s (unrounded) for a device of this bandwidth and vendor.

    At Q4_K_M this is exactly the rule behind the printed figures. For other quants the page prints no
    speed; the same rule with that quant's bits is applied (the page's text implies it: 'bandwidth / model GB'):
    an extrapolation, which is never given a verdict (:func:`printed_tok_s` says where the page prints one).
    """
    return rule_tok_s(device_bandwidth_gb_s, vendor, speed_model_gb(quant) - SPEED_OVERHEAD_GB)


def printed_speed(device: str | None, quant: str) -> PageSpeed | None:
    """The speed the page prints for this device and quant, or None: it prints one for Q4_K_M on its four GPUs
    only (`device` a name the device catalog resolves, e.g. "RTX 4090")."""
    if quant != SPEED_QUANT or not device:
        return None
    from harness.catalog import devices

    found = devices.find(device)
    for s in SPEEDS:
        if found is not None and devices.lookup(s.device).name == found.name:
            return s
    return None


def page_table() -> pd.DataFrame:
    """The page's table as printed, with the unrounded values of the rules that reproduce it."""
    out = []
    for r in ROWS:
        out.append({
            "quant": r.quant, "bits": r.bits, "vram_gb": r.vram_gb, "file_gb": r.file_gb,
            "file_gb_formula": file_gb_formula(r.quant), "vram_gb_formula": vram_gb_formula(r.quant),
            "speed_model_gb": speed_model_gb(r.quant), "quality": r.quality,
        })
    return pd.DataFrame(out)


def speeds_table() -> pd.DataFrame:
    """The four printed speeds beside the rule's unrounded values."""
    return pd.DataFrame([{
        "device": s.device, "vendor": s.vendor, "bandwidth_gb_s": s.bandwidth_gb_s,
        "efficiency": efficiency(s.vendor), "printed_tok_s": s.tok_s,
        "formula_tok_s": page_tok_s(s.bandwidth_gb_s, s.vendor, SPEED_QUANT),
    } for s in SPEEDS])
