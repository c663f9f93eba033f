"""Add `tensor_types` to records written before the field existed, from the very files they measured.

    .venv/bin/python scripts/backfill-tensor-types.py results/<run-id> [...]

A record gets the field only when the file at its `file_path` still has the record's `file_sha256` (a synthetic
model rebuilt from the same recipe, seed and llama.cpp version is byte-identical, so rebuilding the cache and
running this restores what the measurement saw). Records that already carry it, error records and records whose
file is gone or differs are left as they are. records.jsonl and probes.jsonl are rewritten atomically; nothing
else in a record changes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import schema  # noqa: E402
from harness.gguf import validate  # noqa: E402
from harness.sources.base import sha256_file  # noqa: E402


def backfill(path: Path, cache: dict[str, dict | None]) -> tuple[int, int, int]:
    """(filled, already had it, left without) for one records file."""
    recs = schema.read_records(path)
    out, filled, had, left = [], 0, 0, 0
    for r in recs:
        if r.tensor_types is not None or r.status != "ok":
            had += r.tensor_types is not None
            out.append(r)
            continue
        key = f"{r.file_path}\0{r.file_sha256}"
        if key not in cache:
            types = None
            p = Path(r.file_path or "")
            if p.is_file() and sha256_file(p) == r.file_sha256:
                types = validate.check(p, expect_arch=None).tensor_types()
            cache[key] = types
        if cache[key] is None:
            left += 1
            out.append(r)
        else:
            filled += 1
            out.append(dataclasses.replace(r, tensor_types=cache[key]))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in out))
    os.replace(tmp, path)
    return filled, had, left


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    cache: dict[str, dict | None] = {}
    missing = 0
    for d in map(Path, argv):
        for name in ("records.jsonl", "probes.jsonl"):
            if (d / name).is_file():
                filled, had, left = backfill(d / name, cache)
                missing += left
                print(f"{d / name}: {filled} filled, {had} had them, {left} left without (file gone or changed)")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
