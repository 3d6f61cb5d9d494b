"""Tests for audit records: digest, write and read round trip, and the Markdown summary."""

from __future__ import annotations

import json
import re

import pytest

from guardrail import __version__
from guardrail.audit import (
    SCHEMA,
    finalize,
    list_records,
    new_record,
    new_run_id,
    read_record,
    record_digest,
    summary_markdown,
    verify_digest,
    write_record,
)
from guardrail.errors import AuditError


def filled_record(run_id: str = "20250101T000000Z-abcdef12") -> dict:
    record = new_record(run_id)
    record.update(
        decision="patched",
        reason="candidate refused 40.0% of harmful probes; the patch restored 95.0%",
        candidate={"reference": "models/chat", "digest": "c" * 64},
        figures={
            "reference": {"refusal_rate": 0.96, "over_refusal_rate": 0.04, "benign_kl": None},
            "candidate": {"refusal_rate": 0.4, "over_refusal_rate": 0.02, "benign_kl": None},
            "patched": {"refusal_rate": 0.95, "over_refusal_rate": 0.05, "benign_kl": 0.0123},
        },
        training_trace={
            "attempts": [
                {
                    "index": 1,
                    "example_id": "general-01",
                    "learning_rate": 2e-5,
                    "epochs": [
                        {"epoch": 1, "loss": 2.5, "screen": {"refusal": 0.5, "over_refusal": 0.0, "kl": 0.001}, "accepted": False},
                        {"epoch": 2, "loss": 0.75, "screen": {"refusal": 0.9375, "over_refusal": 0.0625, "kl": 0.0123}, "accepted": True},
                    ],
                }
            ]
        },
    )
    return record


def test_new_run_id_format():
    first, second = new_run_id(), new_run_id()
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}", first)
    assert first != second


def test_new_record_fields():
    record = new_record("run-1")
    assert record["schema"] == SCHEMA
    assert record["run_id"] == "run-1"
    assert record["guardrail_version"] == __version__
    assert record["finished_at"] is None
    assert "digest" not in record


def test_finalize_sets_digest():
    record = finalize(filled_record())
    assert record["finished_at"] is not None
    assert record["digest"] == record_digest(record)
    assert verify_digest(record)


def test_digest_ignores_key_order():
    record = finalize(filled_record())
    reordered = dict(reversed(list(record.items())))
    assert verify_digest(reordered)


def test_round_trip(tmp_path):
    record = finalize(filled_record())
    path = write_record(record, tmp_path / "audit")
    assert path == tmp_path / "audit" / f"{record['run_id']}.json"
    loaded = read_record(str(path))
    assert loaded == record
    assert verify_digest(loaded)
    assert [entry.name for entry in (tmp_path / "audit").iterdir()] == [path.name]


def test_write_requires_finalize(tmp_path):
    with pytest.raises(AuditError, match="finalize"):
        write_record(filled_record(), tmp_path)
    assert not list(tmp_path.iterdir())


def test_unicode_round_trip(tmp_path):
    record = filled_record()
    record["reason"] = "Désolé — 拒否 ✓"
    finalize(record)
    loaded = read_record(str(write_record(record, tmp_path)))
    assert loaded["reason"] == "Désolé — 拒否 ✓"
    assert verify_digest(loaded)


@pytest.mark.parametrize(
    "edit",
    [
        lambda record: record.update(decision="approved"),
        lambda record: record["figures"]["candidate"].update(refusal_rate=0.99),
        lambda record: record.update(extra_field=True),
        lambda record: record.pop("reason"),
        lambda record: record.update(digest="0" * 64),
    ],
    ids=["decision", "nested-figure", "added-field", "removed-field", "replaced-digest"],
)
def test_verify_detects_edit(tmp_path, edit):
    path = write_record(finalize(filled_record()), tmp_path)
    document = json.loads(path.read_text(encoding="utf-8"))
    edit(document)
    path.write_text(json.dumps(document), encoding="utf-8")
    assert not verify_digest(read_record(str(path)))


def test_verify_without_digest():
    assert not verify_digest(filled_record())


def test_read_by_run_id(tmp_path):
    record = finalize(filled_record("run-42"))
    write_record(record, tmp_path)
    assert read_record("run-42", tmp_path) == record


def test_read_missing_raises(tmp_path):
    with pytest.raises(AuditError, match="'run-404' not found"):
        read_record("run-404", tmp_path)
    with pytest.raises(AuditError, match="not found"):
        read_record(str(tmp_path / "absent.json"))


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00"], ids=["bad-json", "not-utf8"])
def test_read_invalid_raises(tmp_path, content):
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    with pytest.raises(AuditError, match="not a valid audit record"):
        read_record(str(path))


def test_list_records_order(tmp_path):
    for run_id in ("20250102T000000Z-b", "20250101T000000Z-a"):
        write_record(finalize(filled_record(run_id)), tmp_path)
    assert [record["run_id"] for record in list_records(tmp_path)] == ["20250101T000000Z-a", "20250102T000000Z-b"]
    assert list_records(tmp_path / "absent") == []


def test_summary_figures():
    record = finalize(filled_record())
    summary = summary_markdown(record)
    assert summary.startswith("# guardrail gate: PATCHED\n")
    assert f"`{record['run_id']}`" in summary
    assert "`models/chat`" in summary
    assert f"`{record['digest'][:16]}`" in summary
    assert "| reference | 96.0% | 4.0% |  |" in summary
    assert "| candidate | 40.0% | 2.0% |  |" in summary
    assert "| patched | 95.0% | 5.0% | 0.0123 |" in summary


def test_summary_trace():
    summary = summary_markdown(finalize(filled_record()))
    assert "## Patch trace" in summary
    assert "| 1 | general-01 | 2e-05 | 1 | 2.500 | 50% | 0% | 0.0010 |  |" in summary
    assert "| 1 | general-01 | 2e-05 | 2 | 0.750 | 94% | 6% | 0.0123 | yes |" in summary


def test_summary_error_without_figures():
    record = new_record("run-err")
    record.update(decision="error", error="model not found: 'x'")
    summary = summary_markdown(finalize(record))
    assert summary.startswith("# guardrail gate: ERROR\n")
    assert "## Patch trace" not in summary
    assert "| candidate |" not in summary
    assert summary.rstrip().endswith("error: model not found: 'x'")
