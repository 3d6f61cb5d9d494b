"""Verification of signed audit records: signature, record, model files and lineage.

:func:`verify_registered` checks a registry version against the attestation
stored with it, and :func:`verify_model` checks a model folder against an
envelope file. Each returns a :class:`Verification` whose checks run in a
fixed order:

1. ``signature``: a signature in the envelope verifies under the given
   Ed25519 public key, over the DSSE pre-authentication encoding;
2. ``statement``: the payload is an in-toto Statement v1 whose predicate is a
   guardrail audit record;
3. ``audit record``: the signed predicate equals the stored record, and both
   digests match their content;
4. ``model files``: every subject's SHA-256, recomputed from the model files,
   matches, and no weight, tokenizer or config file was added;
5. ``lineage``: every ancestor record is found and its digest verifies.

Every check runs even after an earlier one fails, so one report names every
changed file and field. A failed signature means the later checks read an
untrusted payload; they still point at what changed.

Examples:
    >>> store = RecordStore(Path(".guardrail/audit"), LocalRegistry(".guardrail/registry"))
    >>> verification = verify_registered(store.registry, "chat-model", "approved", load_public_key("keys/signing.pub"), store)
    >>> [(check.name, check.passed) for check in verification.checks]
    [('signature', True), ('statement', True), ('audit record', True), ('model files', True), ('lineage', True)]
"""

from __future__ import annotations

import binascii
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from guardrail import audit
from guardrail.attestation import (
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    RECORD_ROLE,
    STATEMENT_TYPE,
    decode_base64,
    decode_statement,
    file_kind,
    model_files,
    pre_authentication_encoding,
    subject_roles,
)
from guardrail.errors import AuditError, GuardrailError
from guardrail.lineage import RecordStore, trace_lineage
from guardrail.signing import key_id

_MAX_LISTED_PROBLEMS = 20


@dataclass
class Check:
    """One verification check: its name, outcome, a one-line detail and the problems it found."""

    name: str
    passed: bool
    detail: str
    problems: list[str] = field(default_factory=list)


@dataclass
class Verification:
    """Every check run on one attested model."""

    model: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "passed": self.passed, "checks": [asdict(check) for check in self.checks]}


def _limited(problems: list[str]) -> list[str]:
    if len(problems) <= _MAX_LISTED_PROBLEMS:
        return problems
    return problems[:_MAX_LISTED_PROBLEMS] + [f"... and {len(problems) - _MAX_LISTED_PROBLEMS} more"]


def check_signature(envelope: dict[str, Any], public_key: Ed25519PublicKey, source: str = "the envelope") -> Check:
    """Check that some signature in the envelope verifies under ``public_key``.

    Every signature is tried, because DSSE treats ``keyid`` as a hint only.
    """
    keyid = key_id(public_key)
    name = "signature"
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        return Check(name, False, f"{source} has payloadType {envelope.get('payloadType')!r}; expected {PAYLOAD_TYPE!r}")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        return Check(name, False, f"{source} has no signatures")
    try:
        payload = decode_base64(envelope.get("payload"))
    except (TypeError, binascii.Error):
        return Check(name, False, f"{source} has a payload that is not base64")

    signed_bytes = pre_authentication_encoding(PAYLOAD_TYPE, payload)
    keyids = []
    for signature in signatures:
        if not isinstance(signature, dict):
            continue
        keyids.append(str(signature.get("keyid")))
        try:
            public_key.verify(decode_base64(signature.get("sig")), signed_bytes)
        except (InvalidSignature, TypeError, binascii.Error):
            continue
        return Check(name, True, f"valid Ed25519 signature by key {keyid[:16]}")
    if keyid in keyids:
        return Check(name, False, f"the signature by key {keyid[:16]} in {source} does not verify: the payload or the signature was changed after signing")
    signers = ", ".join(value[:16] for value in keyids) or "none"
    return Check(name, False, f"{source} is not signed by key {keyid[:16]}; its signatures carry key ids {signers}")


def check_statement(statement: dict[str, Any]) -> Check:
    """Check the statement's type fields and that its predicate is a guardrail audit record."""
    problems = []
    if statement.get("_type") != STATEMENT_TYPE:
        problems.append(f"_type is {statement.get('_type')!r}; expected {STATEMENT_TYPE!r}")
    if statement.get("predicateType") != PREDICATE_TYPE:
        problems.append(f"predicateType is {statement.get('predicateType')!r}; expected {PREDICATE_TYPE!r}")
    subjects = statement.get("subject")
    if not isinstance(subjects, list) or not subjects:
        problems.append("subject is missing or empty")
    elif not all(isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance((item.get("digest") or {}).get("sha256"), str) for item in subjects):
        problems.append("every subject needs a 'name' and a 'digest' with 'sha256'")
    predicate = statement.get("predicate")
    if not isinstance(predicate, dict) or "run_id" not in predicate or "digest" not in predicate:
        problems.append("predicate is not a guardrail audit record (no run_id or digest)")
    if problems:
        return Check("statement", False, "; ".join(problems), problems)
    return Check("statement", True, f"in-toto Statement v1 with {len(subjects)} subjects, run {predicate['run_id']}")


def json_differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Return the dotted paths at which two JSON documents differ."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        differences = []
        for key in sorted(set(expected) | set(actual), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in actual:
                differences.append(f"{where} (missing)")
            elif key not in expected:
                differences.append(f"{where} (added)")
            else:
                differences += json_differences(expected[key], actual[key], where)
        return differences
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path or '(root)'} (length {len(expected)} became {len(actual)})"]
        differences = []
        for index, (left, right) in enumerate(zip(expected, actual)):
            differences += json_differences(left, right, f"{path}[{index}]")
        return differences
    return [] if expected == actual and type(expected) is type(actual) else [path or "(root)"]


def check_record(predicate: dict[str, Any], stored: Optional[dict[str, Any]], stored_source: str) -> Check:
    """Check that the signed predicate equals the stored audit record and that both digests verify."""
    problems = []
    if not audit.verify_digest(predicate):
        problems.append(f"the signed predicate's digest does not match its content (run {predicate.get('run_id')})")
    if stored is None:
        problems.append(f"the stored audit record was not found in {stored_source}")
        return Check("audit record", False, problems[-1], problems)
    if not audit.verify_digest(stored):
        problems.append(
            f"the stored record {stored_source} was changed after it was written: its digest {str(stored.get('digest'))[:16]} "
            f"does not match its content ({audit.record_digest(stored)[:16]})"
        )
    differences = json_differences(predicate, stored)
    if differences:
        problems.append(f"the stored record {stored_source} differs from the signed predicate at: {', '.join(_limited(differences))}")
    if problems:
        return Check("audit record", False, "; ".join(problems), problems)
    return Check("audit record", True, f"{stored_source} equals the signed predicate; digest {stored['digest'][:16]} verified")


def check_subjects(statement: dict[str, Any], model_paths: Mapping[str, Path], unavailable: Optional[Mapping[str, str]] = None) -> Check:
    """Recompute each subject's SHA-256 from the model files and report changed, missing and extra files.

    Args:
        statement: The decoded statement.
        model_paths: Role to model folder (or single model file) to check.
            Roles in the statement without a path here are reported as not checked.
        unavailable: Role to the reason its model could not be located; each is a problem.
    """
    attested: dict[str, dict[str, str]] = {}
    record_subjects = []
    for subject in statement.get("subject") or []:
        if not isinstance(subject, dict):
            continue
        role, _, relative = str(subject.get("name", "")).partition("/")
        digest = (subject.get("digest") or {}).get("sha256")
        if role == RECORD_ROLE:
            record_subjects.append((relative, digest))
        else:
            attested.setdefault(role, {})[relative] = digest

    problems: list[str] = [f"{role} model: {reason}" for role, reason in sorted((unavailable or {}).items())]
    checked: list[str] = []
    for run_id, digest in record_subjects:
        predicate_digest = (statement.get("predicate") or {}).get("digest")
        if digest != predicate_digest:
            problems.append(f"subject {RECORD_ROLE}/{run_id} has digest {str(digest)[:16]} but the predicate's digest is {str(predicate_digest)[:16]}")
        checked.append(f"{RECORD_ROLE}/{run_id}")

    for role, expected in sorted(attested.items()):
        path = model_paths.get(role)
        if path is None:
            continue
        path = Path(path)
        if not path.exists():
            problems.append(f"{role} model {path} not found")
            continue
        actual = model_files(path)
        for relative, digest in sorted(expected.items()):
            name = f"{role}/{relative}"
            if relative not in actual:
                problems.append(f"missing {file_kind(relative) or 'model'} file {name} ({path / relative} not found)")
            elif actual[relative] != digest:
                problems.append(f"changed {file_kind(relative) or 'model'} file {name}: sha256 {actual[relative][:16]}, attested {str(digest)[:16]}")
        # A single-file model (GGUF) has no folder to hold extra files.
        if path.is_dir():
            for relative in sorted(set(actual) - set(expected)):
                problems.append(f"extra {file_kind(relative)} file {role}/{relative} is not in the attestation")
        checked.append(f"{role} ({len(expected)} files in {path})")

    unchecked = sorted(role for role in attested if model_paths.get(role) is None and role not in (unavailable or {}))
    if not checked and not problems:
        return Check("model files", False, f"no model given for the attested roles {', '.join(unchecked)}")
    suffix = f"; not checked: {', '.join(unchecked)}" if unchecked else ""
    if problems:
        return Check("model files", False, "; ".join(_limited(problems)) + suffix, problems)
    return Check("model files", True, f"every attested file matches: {', '.join(checked)}{suffix}")


def check_lineage(record: dict[str, Any], store: RecordStore) -> Check:
    """Check that every ancestor record of ``record`` is found and its digest verifies."""
    lineage = trace_lineage(record, store)
    problems = []
    for entry in lineage.missing:
        problems.append(f"parent record {str(entry.digest)[:16]} not found in {store.describe()}")
    for entry in lineage.unverified:
        problems.append(f"parent record {entry.source} (run {entry.record.get('run_id')}) was changed after it was written: its digest does not verify")
    if problems:
        return Check("lineage", False, "; ".join(problems), problems)
    if lineage.root is not None:
        root = f"base model {lineage.root.get('name')}"
    else:
        root = "a record that names no parent (schema guardrail.audit/v1)"
    ancestors = len(lineage.entries) - 1
    found = f"{ancestors} parent record(s) found and verified" if ancestors else "no parent record"
    return Check("lineage", True, f"{found}; root: {root}")


def record_signature_problems(envelope: dict[str, Any], record: dict[str, Any], public_key: Ed25519PublicKey, source: str) -> list[str]:
    """Check that an envelope is a valid signature over exactly ``record``; return what is wrong, or an empty list.

    This checks the signature and the record only, not the model files or
    the lineage.
    """
    signature = check_signature(envelope, public_key, source)
    problems = [] if signature.passed else [signature.detail]
    try:
        predicate = decode_statement(envelope).get("predicate")
    except AuditError as exc:
        return problems + [str(exc)]
    if not isinstance(predicate, dict):
        return problems + ["the statement has no predicate"]
    return problems + check_record(predicate, record, source).problems


def verify_attestation(
    envelope: dict[str, Any],
    public_key: Ed25519PublicKey,
    *,
    model: str,
    stored_record: Optional[dict[str, Any]],
    stored_source: str,
    model_paths: Mapping[str, Path],
    store: RecordStore,
    envelope_source: str = "the envelope",
    unavailable: Optional[Mapping[str, str]] = None,
) -> Verification:
    """Run every check on an attested model.

    Args:
        envelope: The DSSE envelope.
        public_key: Key the envelope must be signed with.
        model: What is verified, for the report.
        stored_record: The audit record stored with the model, or None when not found.
        stored_source: Where the stored record was looked up, for messages.
        model_paths: Role to model folder (or file) whose files are hashed.
        store: Where parent records are looked up.
        envelope_source: Where the envelope was read from, for messages.
        unavailable: Role to the reason its model could not be located.

    Returns:
        The checks, in order: signature, statement, audit record, model files, lineage.
    """
    verification = Verification(model)
    verification.checks.append(check_signature(envelope, public_key, envelope_source))
    try:
        statement = decode_statement(envelope)
    except AuditError as exc:
        verification.checks.append(Check("statement", False, f"{envelope_source}: {exc}"))
        return verification
    verification.checks.append(check_statement(statement))
    predicate = statement.get("predicate")
    if not isinstance(predicate, dict):
        return verification
    verification.checks.append(check_record(predicate, stored_record, stored_source))
    verification.checks.append(check_subjects(statement, model_paths, unavailable))
    verification.checks.append(check_lineage(predicate, store))
    return verification


def _predicate_or_empty(envelope: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the statement and its predicate, or empty dicts when the payload cannot be decoded."""
    try:
        statement = decode_statement(envelope)
    except AuditError:
        return {}, {}
    predicate = statement.get("predicate")
    return statement, predicate if isinstance(predicate, dict) else {}


def verify_registered(registry: Any, name: str, selector: str, public_key: Ed25519PublicKey, store: RecordStore) -> Verification:
    """Verify a registered version against the attestation stored with it.

    The model files of every role the attestation names are checked in the
    registry versions its predicate lists, so verifying the approved patched
    version also checks the quarantined candidate it came from. A remote
    registry downloads those versions again rather than trusting its cache.

    Args:
        registry: The registry, with ``get``, ``model_path``, ``audit_record`` and ``attestation``.
        name: Registered model name.
        selector: Version number, alias or ``latest``.
        public_key: Key the attestation must be signed with.
        store: Where parent records are looked up.

    Raises:
        RegistryError: The model, version or alias does not exist.
    """
    version = registry.get(name, selector)
    label = f"registry:{name}@{selector}"
    where = f"{label} (version {version.version})"
    envelope = registry.attestation(name, selector)
    if envelope is None:
        return Verification(label, [Check("signature", False, f"{where} has no attestation; it was registered by a gate run without audit.signing_key")])

    statement, predicate = _predicate_or_empty(envelope)
    versions = (predicate.get("registry") or {}).get("versions") or {}
    model_paths: dict[str, Path] = {}
    unavailable: dict[str, str] = {}
    for role in subject_roles(statement):
        if role not in versions:
            unavailable[role] = f"the predicate's registry section names no {role} version"
            continue
        try:
            # A cached download may predate a change to the stored files, so download again.
            model_paths[role] = registry.model_path(name, str(versions[role]), refresh=True)
        except GuardrailError as exc:
            unavailable[role] = str(exc)
    if versions and version.version not in versions.values():
        unavailable["version"] = f"the attestation stored with {where} covers versions {versions}, not {version.version}"

    return verify_attestation(
        envelope,
        public_key,
        model=label,
        stored_record=registry.audit_record(name, selector),
        stored_source=f"{where} audit.json",
        model_paths=model_paths,
        store=store,
        envelope_source=f"{where} attestation.json",
        unavailable=unavailable,
    )


def verify_model(
    model_path: Path, envelope: dict[str, Any], public_key: Ed25519PublicKey, store: RecordStore, *, role: Optional[str] = None, envelope_source: str = "the envelope"
) -> Verification:
    """Verify a model folder (or model file) against a DSSE envelope.

    The stored record is ``<audit dir>/<run_id>.json`` of the store's audit
    folder, or else the registry copy with the predicate's digest.

    Args:
        model_path: Model folder, or a single model file such as a GGUF.
        envelope: The DSSE envelope.
        public_key: Key the envelope must be signed with.
        store: Where the stored record and the parent records are looked up.
        role: Which attested model ``model_path`` is; needed only when the
            attestation names both a candidate and a patched model.
        envelope_source: Where the envelope was read from, for messages.

    Raises:
        AuditError: The model is not found, or ``role`` is missing or not in the attestation.
    """
    model_path = Path(model_path)
    if not model_path.exists():
        raise AuditError(f"model {model_path} not found; pass a model folder, or registry:<name>@<alias or version>")
    statement, predicate = _predicate_or_empty(envelope)
    roles = subject_roles(statement)
    if role is None and len(roles) > 1:
        raise AuditError(f"the attestation covers the models {', '.join(roles)}; pass --role to say which one {model_path} is")
    if role is None:
        role = roles[0] if roles else None
    elif role not in roles:
        raise AuditError(f"the attestation has no {role!r} model; it covers: {', '.join(roles) or 'no model files'}")

    stored, stored_source = store.find_run(str(predicate.get("run_id", "")), str(predicate.get("digest", "")))
    return verify_attestation(
        envelope,
        public_key,
        model=str(model_path),
        stored_record=stored,
        stored_source=stored_source,
        model_paths={role: model_path} if role else {},
        store=store,
        envelope_source=envelope_source,
    )
