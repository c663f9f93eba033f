"""Records round-trip through the documented schema; torn lines from a killed writer are tolerated."""

from __future__ import annotations

import dataclasses
import json

import pytest

from harness import schema


def ok_record(**kw):
    base = dict(run_id="r", utc="2026-01-01T00:00:00+00:00", status="ok", error=None, quant="Q4_K_M",
                weights="synthetic", weights_ref="tiny seed=0", file_sha256="ab" * 32, test="tg", n_prompt=0,
                n_gen=16, n_depth=0, rep=0, wall_ns=1_000_000, tokens_per_s=16000.0,
                model_buffers={"CPU_Mapped": 123}, extra={"flash_attn_resolved": "enabled"})
    base.update(kw)
    return schema.make(**base)


def test_every_field_has_a_comment():
    import inspect

    src = inspect.getsource(schema.Record)
    for f in dataclasses.fields(schema.Record):
        line = next(x for x in src.splitlines() if x.strip().startswith(f"{f.name}:"))
        assert "#" in line, f"field {f.name} has no comment"


def test_round_trip(tmp_path):
    recs = [ok_record(rep=i, tokens_per_s=100.0 + i) for i in range(3)]
    recs.append(schema.make(run_id="r", utc="u", status="error", error="boom", quant="Q8_0", weights="local"))
    with schema.RecordWriter(tmp_path / "records.jsonl") as w:
        for r in recs:
            w.write(r)
    back = schema.read_records(tmp_path / "records.jsonl")
    assert back == recs


def test_torn_last_line_is_skipped_and_append_starts_fresh(tmp_path):
    p = tmp_path / "records.jsonl"
    with schema.RecordWriter(p) as w:
        w.write(ok_record(rep=0))
    with open(p, "a") as f:
        f.write(ok_record(rep=1).to_json()[:57])  # killed mid-write
    assert [r.rep for r in schema.read_records(p)] == [0]
    with schema.RecordWriter(p) as w:  # a resumed run appends after the torn line
        w.write(ok_record(rep=2))
    assert [r.rep for r in schema.read_records(p)] == [0, 2]


@pytest.mark.parametrize("change, msg", [
    ({"bogus": 1}, "unknown fields"),
    ({"status": "fine"}, "status must be ok or error"),
    ({"test": "xx"}, "test must be one of pp, tg, mem"),
    ({"tokens_per_s": 0.0}, "positive"),
    ({"tokens_per_s": None}, "positive"),
    ({"test": "mem", "n_ctx": None}, "mem record needs positive wall_ns and n_ctx"),
    ({"wall_ns": None}, "ok record with null"),
])
def test_schema_rejects(change, msg):
    d = json.loads(ok_record().to_json())
    d.update(change)
    with pytest.raises(schema.SchemaError, match=msg):
        schema.from_dict(d)


def test_mem_record_has_no_rate():
    d = json.loads(ok_record().to_json())
    d.update(test="mem", tokens_per_s=None, n_ctx=131072, cache_type_k="q8_0", cache_type_v="q8_0")
    r = schema.from_dict(d)
    assert (r.test, r.n_ctx, r.cache_type_k) == ("mem", 131072, "q8_0")


def test_error_record_needs_a_reason():
    with pytest.raises(schema.SchemaError, match="without an error message"):
        schema.make(run_id="r", utc="u", status="error", error=None, quant="Q8_0", weights="local")


def test_malformed_but_parseable_line_is_an_error(tmp_path):
    p = tmp_path / "records.jsonl"
    p.write_text(ok_record().to_json() + "\n" + json.dumps({"quant": "Q8_0"}) + "\n")
    with pytest.raises(schema.SchemaError, match="records.jsonl:2"):
        schema.read_records(p)
