"""Lineage of audit records: which gate run produced the model a run started from.

Every audit record names its parent in ``record["parent"]``:

* ``{"type": "audit_record", "digest": ..., "run_id": ..., "decision": ..., "reference": ...}``
  when the candidate came from a registry version that carries an audit
  record, so a model patched twice links back through both runs;
* ``{"type": "base_model", "name": ..., "name_source": ..., "digest": ...}``
  otherwise. The name comes from the adapter's ``base_model_name_or_path``,
  the config's ``_name_or_path``, or the candidate reference itself,
  and ``name_source`` records which of the three. The digest is the base model's guardrail
  model digest when the gate loaded it, else None.

Records of schema ``guardrail.audit/v1`` stored only ``parent_digest``;
:func:`parent_of` reads both forms.

Examples:
    >>> store = RecordStore(audit_dir=Path(".guardrail/audit"), registry=LocalRegistry(".guardrail/registry"))
    >>> lineage = trace_lineage(record, store)
    >>> [entry.record["run_id"] for entry in lineage.entries if entry.record]
    ['20250102T101500Z-4f2a9c1e', '20250101T093000Z-8d1b7a22']
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from guardrail import audit
from guardrail.errors import GuardrailError
from guardrail.registry import parse_reference

logger = logging.getLogger(__name__)

PARENT_AUDIT_RECORD = "audit_record"
PARENT_BASE_MODEL = "base_model"

#: Bound on the records followed from one record, so a damaged store cannot loop.
MAX_DEPTH = 64


def parent_for(reference: str, candidate_path: str, candidate_record: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Describe the parent of a gate run's candidate.

    Args:
        reference: The candidate reference as the user gave it.
        candidate_path: The resolved, loadable candidate (folder, file or Hub repo id).
        candidate_record: The audit record stored with the candidate's registry
            version, when it has one.

    Returns:
        The ``parent`` entry of the new audit record.
    """
    if candidate_record and candidate_record.get("digest"):
        return {
            "type": PARENT_AUDIT_RECORD,
            "digest": candidate_record["digest"],
            "run_id": candidate_record.get("run_id"),
            "decision": candidate_record.get("decision"),
            "reference": reference,
        }
    name, source = _base_model_name(Path(candidate_path), reference)
    return {"type": PARENT_BASE_MODEL, "name": name, "name_source": source, "digest": None}


def _base_model_name(path: Path, reference: str) -> tuple[str, str]:
    """Return the base model's name and the file and key it was read from."""
    for file_name, key in (("adapter_config.json", "base_model_name_or_path"), ("config.json", "_name_or_path")):
        config = path / file_name
        if not config.is_file():
            continue
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get(key)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            logger.warning("Cannot read %s for the lineage base model: %s", config, exc)
            continue
        if isinstance(value, str) and value:
            return value, f"{file_name}:{key}"
    return reference, "reference"


def complete_parent(record: dict[str, Any]) -> None:
    """Fill in the base model's digest once the candidate has been loaded.

    An adapter's base model digest comes from the loaded base. When the base
    model name is the candidate reference itself, the candidate's digest is
    the base model's digest. Any other base model keeps a None digest, because
    the gate never loaded it.
    """
    parent = record.get("parent")
    if not parent or parent.get("type") != PARENT_BASE_MODEL or parent.get("digest"):
        return
    candidate = record.get("candidate") or {}
    base = candidate.get("base")
    if base:
        parent["digest"] = (base.get("digests") or {}).get("model")
    elif parent.get("name_source") == "reference":
        parent["digest"] = (candidate.get("digests") or {}).get("model")


def parent_of(record: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Return a record's parent entry, reading the ``parent_digest`` of schema v1 records too."""
    parent = record.get("parent")
    if parent:
        return parent
    legacy_digest = record.get("parent_digest")
    if legacy_digest:
        return {"type": PARENT_AUDIT_RECORD, "digest": legacy_digest}
    return None


def output_model_digest(record: dict[str, Any]) -> Optional[str]:
    """Return the digest of the model a run approved or kept: the patched model's, else the candidate's."""
    for role in ("patched", "candidate"):
        digests = (record.get(role) or {}).get("digests") or {}
        if digests.get("model"):
            return digests["model"]
    return None


class RecordStore:
    """Finds audit records by digest in an audit folder and in a registry.

    A record can live in both places. The gate writes each record to the
    audit folder and stores it with every registry version it wrote, and a
    later run on the same version replaces the copy in the registry, so the
    audit folder is searched first.

    Args:
        audit_dir: Folder of audit records, as set by the policy's ``audit.dir``.
        registry: Registry whose versions' audit records are searched, a
            :class:`guardrail.registry.Registry`.
    """

    def __init__(self, audit_dir: Optional[Path] = None, registry: Any = None) -> None:
        self.audit_dir = Path(audit_dir) if audit_dir is not None else None
        self.registry = registry
        self._by_digest: Optional[dict[str, tuple[dict[str, Any], str]]] = None

    def describe(self) -> str:
        """Return where this store searches, for messages."""
        places = []
        if self.audit_dir is not None:
            places.append(f"audit folder {self.audit_dir}")
        if self.registry is not None:
            places.append(f"registry {getattr(self.registry, 'location', None) or getattr(self.registry, 'root', self.registry)}")
        return " and ".join(places) or "no audit folder or registry"

    def find(self, digest: str, model_name: Optional[str] = None) -> Optional[tuple[dict[str, Any], str]]:
        """Return the record whose ``digest`` field is ``digest`` and where it was found, or None.

        Args:
            digest: The record's own digest.
            model_name: Registered model the record probably belongs to; its
                versions are searched before those of every model in the registry.
        """
        found = self._audit_dir_index().get(digest)
        if found is not None:
            return found
        return self._find_in_registry(digest, model_name)

    def find_run(self, run_id: str, digest: str) -> tuple[Optional[dict[str, Any]], str]:
        """Return the stored record of a run and where it was read, or None and where it was looked for.

        The audit folder's ``<run_id>.json`` is read first, whatever its
        content, so an edited copy is returned and its digest check fails.
        Without it, the registry copy carrying ``digest`` is returned.
        """
        if self.audit_dir is not None and run_id:
            path = self.audit_dir / f"{run_id}.json"
            if path.is_file():
                try:
                    return audit.read_record(str(path)), str(path)
                except GuardrailError as exc:
                    logger.warning("Cannot read audit record %s: %s", path, exc)
                    return None, f"{path} (unreadable)"
        found = self._find_in_registry(digest) if digest else None
        if found is not None:
            return found
        return None, self.describe()

    def _audit_dir_index(self) -> dict[str, tuple[dict[str, Any], str]]:
        if self._by_digest is None:
            self._by_digest = {}
            if self.audit_dir is not None:
                for path, record in audit.iter_records(self.audit_dir):
                    if isinstance(record.get("digest"), str):
                        self._by_digest.setdefault(record["digest"], (record, str(path)))
        return self._by_digest

    def _find_in_registry(self, digest: str, model_name: Optional[str] = None) -> Optional[tuple[dict[str, Any], str]]:
        if self.registry is None:
            return None
        try:
            # Listing every model costs several requests per version on an MLflow
            # server, so the versions of the likely model are searched first.
            if model_name is not None:
                found = self._find_in_versions(self.registry.list_versions(model_name), digest)
                if found is not None:
                    return found
            return self._find_in_versions(self.registry.list_versions(), digest)
        except GuardrailError as exc:
            logger.warning("Cannot search %s for audit record %s: %s", self.describe(), digest[:12], exc)
        return None

    def _find_in_versions(self, versions: list[Any], digest: str) -> Optional[tuple[dict[str, Any], str]]:
        for version in versions:
            if version.audit_digest != digest:
                continue
            record = self.registry.audit_record(version.name, str(version.version))
            if record is not None:
                return record, f"registry:{version.name}@{version.version}"
        return None


def _registered_name(parent: dict[str, Any]) -> Optional[str]:
    """Return the model name in a parent's ``registry:<name>@<selector>`` reference, or None for other references."""
    try:
        parsed = parse_reference(str(parent.get("reference") or ""))
    except GuardrailError:
        return None
    return parsed[0] if parsed is not None else None


@dataclass
class LineageEntry:
    """An audit record in a lineage chain, or a placeholder for one that was not found."""

    digest: Optional[str]
    record: Optional[dict[str, Any]] = None
    source: Optional[str] = None

    @property
    def found(self) -> bool:
        return self.record is not None

    @property
    def digest_verified(self) -> bool:
        """True when the record was found, carries the expected digest, and its content matches it."""
        return self.record is not None and self.record.get("digest") == self.digest and audit.verify_digest(self.record)


@dataclass
class Lineage:
    """A record and its ancestors, newest first, ending at the base model or at a missing record."""

    entries: list[LineageEntry] = field(default_factory=list)
    root: Optional[dict[str, Any]] = None

    @property
    def missing(self) -> list[LineageEntry]:
        return [entry for entry in self.entries if not entry.found]

    @property
    def unverified(self) -> list[LineageEntry]:
        return [entry for entry in self.entries if entry.found and not entry.digest_verified]


def trace_lineage(record: dict[str, Any], store: RecordStore, source: Optional[str] = None) -> Lineage:
    """Follow a record's parents through ``store`` until the base model or a missing record.

    Args:
        record: The record to start from; it is the first entry.
        store: Where the ancestors are looked up by digest.
        source: Where ``record`` was read from, for display.

    Returns:
        The chain, newest first. ``root`` is the base model entry of the
        oldest record, or None when the chain ends at a missing record or at a
        schema v1 record that names no parent.
    """
    lineage = Lineage(entries=[LineageEntry(record.get("digest"), record, source)])
    seen = {record.get("digest")}
    current = record
    for _ in range(MAX_DEPTH):
        parent = parent_of(current)
        if parent is None:
            return lineage
        if parent.get("type") != PARENT_AUDIT_RECORD:
            lineage.root = parent
            return lineage
        digest = parent.get("digest")
        if digest in seen:
            # A digest cannot contain itself, so a repeat means a damaged or forged store.
            logger.warning("Audit record %s appears twice in its own lineage; stopping there", str(digest)[:12])
            lineage.entries.append(LineageEntry(digest))
            return lineage
        seen.add(digest)
        found = store.find(digest, _registered_name(parent)) if isinstance(digest, str) else None
        if found is None:
            lineage.entries.append(LineageEntry(digest))
            return lineage
        current, where = found
        lineage.entries.append(LineageEntry(digest, current, where))
    logger.warning("Stopped following the lineage of %s after %d records", record.get("run_id"), MAX_DEPTH)
    return lineage
