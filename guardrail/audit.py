"""Audit records: what a gate run saw, did and decided.

A record is written for every gate run, whatever the outcome (approved,
patched, blocked or error). It identifies every input by digest (candidate,
reference, policy, probe sets, patched model), keeps the decoding and judge
settings, the figures before and after the patch, the safety example, the
training trace and the timings, and names the model's parent (the audit
record of the run that produced it, or its base model) so patched models form
a lineage chain; see :mod:`guardrail.lineage`.

The record's ``digest`` is the SHA-256 of its canonical JSON without the
``digest`` key, so any edit to a field is detectable with
:func:`verify_digest`. When the policy names a signing key, the record is also
signed as an in-toto attestation, written beside it as
``<run_id>.intoto.json``; see :mod:`guardrail.attestation`.

Schema ``guardrail.audit/v2`` replaced v1's ``parent_digest`` with the
``parent`` entry.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from guardrail import __version__
from guardrail.errors import AuditError
from guardrail.hashing import sha256_json
from guardrail.files import atomic_write_text

logger = logging.getLogger(__name__)

SCHEMA = "guardrail.audit/v2"

#: Suffix of the signed envelope written beside a record; such files are not records.
ENVELOPE_SUFFIX = ".intoto.json"


def new_run_id() -> str:
    """Return a sortable, unique gate run id: UTC timestamp plus random suffix."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:8]}"


def new_record(run_id: str) -> dict[str, Any]:
    """Start an audit record; the gate fills it in as it goes."""
    return {
        "schema": SCHEMA,
        "run_id": run_id,
        "guardrail_version": __version__,
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "finished_at": None,
        "decision": None,
        "reason": None,
        "error": None,
        "policy": None,
        "candidate": None,
        "reference": None,
        "patched": None,
        "probes": None,
        "decoding": None,
        "judge": None,
        "figures": {},
        "checks": {},
        "safety_example": None,
        "training_trace": None,
        "verification": None,
        "registry": None,
        "parent": None,
        "timings": {},
    }


def record_digest(record: dict[str, Any]) -> str:
    """Return the SHA-256 of a record's canonical JSON, excluding its ``digest`` field."""
    return sha256_json({key: value for key, value in record.items() if key != "digest"})


def finalize(record: dict[str, Any]) -> dict[str, Any]:
    """Stamp the finish time and the digest; call once, just before writing."""
    record["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    record["digest"] = record_digest(record)
    return record


def write_record(record: dict[str, Any], audit_dir: Path) -> Path:
    """Write a finalized record as ``<audit_dir>/<run_id>.json`` atomically."""
    if "digest" not in record:
        raise AuditError("the audit record has no digest; call finalize() before write_record()")
    path = Path(audit_dir) / f"{record['run_id']}.json"
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False))
    logger.info("Wrote audit record %s (%s)", path, record["digest"][:12])
    return path


def read_record(path_or_run_id: str, audit_dir: Optional[Path] = None) -> dict[str, Any]:
    """Read an audit record by path, or by run id inside ``audit_dir``.

    Raises:
        AuditError: The record is missing or not valid JSON.
    """
    path = Path(path_or_run_id)
    if not path.is_file() and audit_dir is not None:
        path = Path(audit_dir) / f"{path_or_run_id}.json"
    if not path.is_file():
        raise AuditError(f"audit record {path_or_run_id!r} not found; pass a record path or a run id from {audit_dir}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuditError(f"{path} is not a valid audit record: {exc}") from exc


def verify_digest(record: dict[str, Any]) -> bool:
    """Return True when the record's stored digest matches its content."""
    return record.get("digest") == record_digest(record)


def _record_paths(audit_dir: Path) -> list[Path]:
    folder = Path(audit_dir)
    if not folder.is_dir():
        return []
    return [path for path in sorted(folder.glob("*.json")) if not path.name.endswith(ENVELOPE_SUFFIX)]


def list_records(audit_dir: Path) -> list[dict[str, Any]]:
    """Return every record in an audit folder, oldest first, without the signed envelopes."""
    return [json.loads(path.read_text(encoding="utf-8")) for path in _record_paths(audit_dir)]


def iter_records(audit_dir: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield each readable record in an audit folder with its path, oldest first.

    Unlike :func:`list_records`, a file that is not valid JSON is logged and
    skipped, so one damaged file does not hide the other records.
    """
    for path in _record_paths(audit_dir):
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            logger.warning("Skipping unreadable audit record %s: %s", path, exc)
            continue
        if isinstance(document, dict):
            yield path, document


def summary_markdown(record: dict[str, Any]) -> str:
    """Render the key facts of a record as Markdown, for CLI output and pipeline artifacts."""
    figures = record.get("figures") or {}
    lines = [
        f"# guardrail gate: {str(record.get('decision')).upper()}",
        "",
        f"- run: `{record['run_id']}`, guardrail {record['guardrail_version']}",
        f"- reason: {record.get('reason')}",
        f"- candidate: `{(record.get('candidate') or {}).get('reference')}`",
        f"- audit digest: `{record.get('digest', '')[:16]}`",
        "",
        "| model | refusal (harmful) | over-refusal (benign) | benign KL |",
        "|---|---|---|---|",
    ]
    for name in ("reference", "candidate", "patched"):
        figure = figures.get(name)
        if figure:
            kl = figure.get("benign_kl")
            lines.append(
                f"| {name} | {100 * figure['refusal_rate']:.1f}% | {100 * figure['over_refusal_rate']:.1f}% | {'' if kl is None else f'{kl:.4f}'} |"
            )
    trace = record.get("training_trace")
    if trace:
        lines += ["", "## Patch trace", "", "| attempt | example | lr | epoch | loss | refusal | over-refusal | KL | accepted |", "|---|---|---|---|---|---|---|---|---|"]
        for attempt in trace["attempts"]:
            for epoch in attempt["epochs"]:
                screen = epoch["screen"]
                lines.append(
                    f"| {attempt['index']} | {attempt['example_id']} | {attempt['learning_rate']:.0e} | {epoch['epoch']} | {epoch['loss']:.3f} | "
                    f"{100 * screen['refusal']:.0f}% | {100 * screen['over_refusal']:.0f}% | {screen['kl']:.4f} | {'yes' if epoch['accepted'] else ''} |"
                )
    plots = record.get("plots") or {}
    if plots.get("patch_trace"):
        lines += ["", f"![refusal and over-refusal per patch epoch]({plots['patch_trace']})", "", "The plot file is in the audit folder, next to this run's record."]
    if record.get("error"):
        lines += ["", f"error: {record['error']}"]
    return "\n".join(lines) + "\n"
