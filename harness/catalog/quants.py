"""The quantization recipes the harness knows, by the names people download them under.

A recipe is a llama.cpp file type (``LLAMA_FTYPE_MOSTLY_*``) plus optional per-tensor overrides. Most names
are llama.cpp's own; ``Q4_K_L`` and ``Q5_K_L`` are the Hub's convention (bartowski and others): the ``_M``
recipe with the token embedding and output tensors kept in Q8_0.

What the page under test claims for each quant (its "Bits" column among them) is transcribed once, in
:mod:`harness.catalog.page`.
"""

from __future__ import annotations

import difflib
from typing import NamedTuple

# The page's 12 quants, in the page's order.
PAGE_QUANTS = (
    "IQ3_M", "Q4_0", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M",
    "Q4_K_L", "Q5_K_S", "Q5_K_M", "Q5_K_L", "Q6_K", "Q8_0",
)


class Recipe(NamedTuple):
    name: str  # the name used in configs, records and file names, e.g. "Q4_K_M"
    ftype: str  # llama.cpp file type constant, e.g. "LLAMA_FTYPE_MOSTLY_Q4_K_M"
    embd_type: str | None  # ggml type forced on token_embd.weight (and output.weight), e.g. "Q8_0"
    description: str  # one line for tables


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("IQ3_M", "LLAMA_FTYPE_MOSTLY_IQ3_M", None, "importance-weighted 3-bit, medium"),
        Recipe("Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", None, "4-bit legacy"),
        Recipe("Q3_K_L", "LLAMA_FTYPE_MOSTLY_Q3_K_L", None, "3-bit K, large"),
        Recipe("IQ4_XS", "LLAMA_FTYPE_MOSTLY_IQ4_XS", None, "importance-weighted 4-bit, compact"),
        Recipe("Q4_K_S", "LLAMA_FTYPE_MOSTLY_Q4_K_S", None, "4-bit K, small"),
        Recipe("Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M", None, "4-bit K, medium"),
        Recipe("Q4_K_L", "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q8_0", "Q4_K_M with Q8_0 embedding/output"),
        Recipe("Q5_K_S", "LLAMA_FTYPE_MOSTLY_Q5_K_S", None, "5-bit K, small"),
        Recipe("Q5_K_M", "LLAMA_FTYPE_MOSTLY_Q5_K_M", None, "5-bit K, medium"),
        Recipe("Q5_K_L", "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q8_0", "Q5_K_M with Q8_0 embedding/output"),
        Recipe("Q6_K", "LLAMA_FTYPE_MOSTLY_Q6_K", None, "6-bit K"),
        Recipe("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", None, "8-bit"),
        # Not on the page; common enough that users will ask for them.
        Recipe("Q2_K", "LLAMA_FTYPE_MOSTLY_Q2_K", None, "2-bit K"),
        Recipe("Q3_K_S", "LLAMA_FTYPE_MOSTLY_Q3_K_S", None, "3-bit K, small"),
        Recipe("Q3_K_M", "LLAMA_FTYPE_MOSTLY_Q3_K_M", None, "3-bit K, medium"),
        Recipe("IQ4_NL", "LLAMA_FTYPE_MOSTLY_IQ4_NL", None, "importance-weighted 4-bit, non-linear"),
        Recipe("Q5_0", "LLAMA_FTYPE_MOSTLY_Q5_0", None, "5-bit legacy"),
        Recipe("F16", "LLAMA_FTYPE_MOSTLY_F16", None, "16-bit float, unquantized"),
    )
}


class UnknownQuant(ValueError):
    pass


def suggest(name: str, choices) -> str:
    """' (did you mean X?)' for a near miss, else ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if c.lower() == name.lower()]
    return f" (did you mean {close[0]!r}?)" if close else ""


def get(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownQuant(
            f"unknown quant {name!r}{suggest(name, RECIPES)}; known: {', '.join(RECIPES)}"
        ) from None
