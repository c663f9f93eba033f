"""``python -m harness inspect FILE.gguf``: what a GGUF file really holds, read from its header.

The header is read by :mod:`harness.gguf.validate` (bounded, validated, milliseconds) and the file is never
loaded into llama.cpp, so inspecting a 1B file takes a moment and no memory. It reports the parameter count,
a histogram of tensor types, and the true bits per weight (8 * tensor bytes / elements) overall, for the token
embedding and for everything else, next to the "Bits" column the page prints for that quant
(:data:`harness.catalog.page.BY_QUANT`), which is a claim, not a measurement.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from harness.catalog import page, quants
from harness.config import ConfigError
from harness.gguf import validate

EMBD = "token_embd.weight"


def _bits(n_bytes: int, n_elements: int) -> float | None:
    return 8 * n_bytes / n_elements if n_elements else None


def quant_of(ftype_name: str | None, embd_type: str | None, file_name: str) -> tuple[str | None, str | None]:
    """(recipe name, how it was found) from the file type and embedding type, else from the file name.

    ``Q4_K_L`` and ``Q4_K_M`` share a file type; the embedding kept in Q8_0 tells them apart.
    """
    if ftype_name:
        same = [r for r in quants.RECIPES.values() if r.ftype == f"LLAMA_FTYPE_{ftype_name}"]
        pick = [r for r in same if r.embd_type is not None and r.embd_type == embd_type]
        if pick:
            return pick[0].name, f"general.file_type and {EMBD} in {embd_type}"
        pick = [r for r in same if r.embd_type is None]
        if pick:
            return pick[0].name, "general.file_type"
    # Longest name first: "Q4_K_L" must not be read as "Q4_K".
    for name in sorted(quants.RECIPES, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", file_name, re.IGNORECASE):
            return name, "file name"
    return None, None


def label_for(path: str | os.PathLike) -> tuple[str, str]:
    """(label, how it was named) for a GGUF file of any quant: the recipe its header names (general.file_type,
    and the embedding's type for the _L recipes), else llama.cpp's file type ("Q4_1", "BF16"), else the file
    name. Raises ConfigError for a file that is not a readable GGUF."""
    d = describe(path)
    ft = d["file_type"]
    ft_label = ft.removeprefix("MOSTLY_").removeprefix("ALL_") if ft and not ft.startswith("unknown") else None
    # The Hub's _L recipes (Q8_0 embedding and output) are a naming convention of the Llama 3.2 1B files; another
    # model's file type keeps llama.cpp's own name (Gemma's Q4_K_M keeps its embedding in Q8_0 by its recipe).
    one_b = d["architecture"] == "llama" and abs(d["n_params"] / 1_235_814_400 - 1) < 0.005
    if d["quant"] and d["quant_from"] != "file name" and (one_b or d["quant"] == ft_label):
        return d["quant"], d["quant_from"]
    if ft_label:
        return ft_label, "general.file_type"
    if d["quant"]:
        return d["quant"], "file name"
    return Path(path).stem, "file name (the header names no file type)"


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Everything :func:`format_text` prints, as a JSON-ready dict; raises ConfigError for a missing or bad file.
    The header is read (and validated) by :func:`harness.gguf.validate.check`, the one GGUF reader."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such file" if not p.exists() else f"{path}: not a file")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ConfigError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        header = validate.check(p, expect_arch=None)
    except validate.InvalidGGUF as e:
        raise ConfigError(f"{path}: not a readable GGUF file: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    tensors = header.tensors

    types: dict[str, dict[str, int]] = {}
    n_params = n_bytes = 0
    embd: dict[str, Any] | None = None
    for t in tensors:
        name = t.type_name
        row = types.setdefault(name, {"tensors": 0, "n_elements": 0, "bytes": 0})
        row["tensors"] += 1
        row["n_elements"] += int(t.n_elements)
        row["bytes"] += int(t.n_bytes)
        n_params += int(t.n_elements)
        n_bytes += int(t.n_bytes)
        if t.name == EMBD:
            embd = {"type": name, "n_elements": int(t.n_elements), "bytes": int(t.n_bytes),
                    "shape": [int(x) for x in t.shape]}
    for row in types.values():
        row["bits_per_weight"] = _bits(row["bytes"], row["n_elements"])
    types = dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"]))

    ftype_id = header.hparams.get("general.file_type")
    try:
        ftype_name = gguf.LlamaFileType(int(ftype_id)).name if ftype_id is not None else None
    except ValueError:
        ftype_name = f"unknown ({ftype_id})"
    quant, quant_from = quant_of(ftype_name, embd["type"] if embd else None, p.name)
    page_bits = page.BY_QUANT[quant].bits if quant in page.BY_QUANT else None
    rest_elements = n_params - (embd["n_elements"] if embd else 0)
    rest_bytes = n_bytes - (embd["bytes"] if embd else 0)
    bpw = _bits(n_bytes, n_params)
    return {
        "path": str(p),
        "file_bytes": p.stat().st_size,
        "architecture": header.architecture,
        "name": header.strings.get("general.name"),
        "file_type": ftype_name,  # gguf.LlamaFileType name of general.file_type, e.g. "MOSTLY_Q4_K_M"
        "quant": quant,  # recipe name, or None when neither the file type nor the file name tells
        "quant_from": quant_from,  # how: "general.file_type" (+ the embedding's type for _L), or "file name"
        "page_bits": page_bits,  # the page's "Bits" for that quant, None if it has no row
        "n_tensors": len(tensors),
        "n_params": n_params,  # sum of tensor element counts, as llama_model_n_params
        "tensor_bytes": n_bytes,  # sum of tensor sizes, as llama_model_size
        "bits_per_weight": bpw,  # 8 * tensor_bytes / n_params
        "embd": None if embd is None else {**embd, "bits_per_weight": _bits(embd["bytes"], embd["n_elements"])},
        "rest": {"n_elements": rest_elements, "bytes": rest_bytes,  # every tensor but the token embedding
                 "bits_per_weight": _bits(rest_bytes, rest_elements)},
        "types": types,  # ggml type name -> {tensors, n_elements, bytes, bits_per_weight}, biggest first
    }


def _f(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def format_text(d: dict[str, Any]) -> str:
    embd, rest = d["embd"], d["rest"]
    lines = [
        f"file            {d['path']}",
        f"size            {d['file_bytes']:,} bytes ({d['file_bytes'] / 1e6:,.1f} MB; tensors {d['tensor_bytes']:,})",
        f"architecture    {d['architecture'] or '-'}" + (f"  ({d['name']})" if d["name"] else ""),
        f"file type       {d['file_type'] or '-'}",
        f"quant           {d['quant'] or 'not recognised'}" + (f"  (from {d['quant_from']})" if d["quant"] else ""),
        f"parameters      {d['n_params']:,} in {d['n_tensors']} tensors",
        f"bits/weight     {_f(d['bits_per_weight'])} overall",
    ]
    if embd:
        lines.append(f"                {_f(embd['bits_per_weight'])} {EMBD} ({embd['type']}, "
                     f"{embd['n_elements']:,} weights)")
    lines.append(f"                {_f(rest['bits_per_weight'])} everything else ({rest['n_elements']:,} weights)")
    if d["page_bits"] is not None:
        diff = d["bits_per_weight"] - d["page_bits"]
        lines.append(f"page's bits     {d['page_bits']:.2f} for {d['quant']} (file: {_f(d['bits_per_weight'])}, "
                     f"{diff:+.2f})")
    elif d["quant"]:
        lines.append(f"page's bits     - (the page has no row for {d['quant']})")
    lines.append("")
    lines.append(f"{'type':<8} {'tensors':>7} {'weights':>14} {'bytes':>14} {'bits/weight':>11}")
    for name, row in d["types"].items():
        lines.append(f"{name:<8} {row['tensors']:>7} {row['n_elements']:>14,} {row['bytes']:>14,} "
                     f"{_f(row['bits_per_weight']):>11}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="what a GGUF file holds: parameters, tensor types, true bits per weight",
                       description=__doc__.splitlines()[0])
    p.add_argument("file", type=Path, help="a .gguf file")
    p.add_argument("--json", action="store_true", help="print the description as JSON")


def main(args) -> int:
    d = describe(args.file)  # ConfigError: the CLI prints one line and exits 2
    sys.stdout.write((json.dumps(d, indent=2) if args.json else format_text(d)) + "\n")
    return 0
