"""Signed audit records: in-toto statements in DSSE envelopes, signed with Ed25519.

A gate run's audit record becomes the predicate of an in-toto Statement v1
(https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md):

* ``subject``: every weight, tokenizer and config file of each model the run
  registered, named ``<role>/<path in the model folder>`` with its SHA-256.
  The roles are ``candidate`` and ``patched``. A run that registered nothing
  lists the candidate's files instead. A run with no model files at all (the
  candidate was never found) lists the record itself as ``record/<run_id>``,
  with the record's own digest, because in-toto requires a subject;
* ``predicateType``: :data:`PREDICATE_TYPE`;
* ``predicate``: the finalized audit record, unchanged.

The statement is the payload of a DSSE envelope
(https://github.com/secure-systems-lab/dsse/blob/master/envelope.md) of type
``application/vnd.in-toto+json``. The Ed25519 signature covers the DSSE
pre-authentication encoding of the payload, and ``keyid`` is the hex SHA-256
of the raw 32-byte public key (:func:`guardrail.signing.key_id`).
:mod:`guardrail.attestation_checks` verifies envelopes.

Examples:
    >>> envelope = attest_record(record, {"candidate": Path("models/chat")}, load_private_key("keys/signing.key"))
    >>> write_envelope(envelope, Path(".guardrail/audit"), record["run_id"])
    PosixPath('.guardrail/audit/20250101T093000Z-8d1b7a22.intoto.json')
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Optional

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guardrail import audit
from guardrail.errors import AuditError
from guardrail.files import atomic_write_text
from guardrail.hashing import sha256_file
from guardrail.signing import key_id

logger = logging.getLogger(__name__)

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
#: Identifies the guardrail audit record as an in-toto predicate. The URI names
#: the format and its version; docs/attestation.md describes the fields.
PREDICATE_TYPE = "https://github.com/guardrail-ml/guardrail/attestation/gate-record/v1"

MODEL_ROLES = ("candidate", "patched")
RECORD_ROLE = "record"

_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_NAMES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "spiece.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)


def file_kind(relative_path: str) -> Optional[str]:
    """Classify a file of a model folder as ``weights``, ``tokenizer`` or ``config``; None for other files.

    The lists cover what :mod:`guardrail.loading` reads plus common formats it
    rejects (pickle weights), so an added pickle file is reported too.
    """
    name = PurePosixPath(relative_path).name
    if name in _TOKENIZER_NAMES or name.endswith(".tiktoken"):
        return "tokenizer"
    if name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json"):
        return "weights"
    if name.endswith(".json"):
        return "config"
    return None


def model_files(path: str | Path) -> dict[str, str]:
    """Hash the weight, tokenizer and config files of a model folder, or a single model file.

    Files under hidden folders (a download cache's ``.cache``, say) are
    skipped. Symbolic links to files are followed, so a Hub snapshot folder
    hashes the blobs it points to.

    Returns:
        A mapping from POSIX path relative to the folder (the file's name for
        a single file) to its hex SHA-256.
    """
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    files: dict[str, str] = {}
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if file.is_file() and file_kind(relative.as_posix()):
            files[relative.as_posix()] = sha256_file(file)
    return files


def collect_subjects(record: dict[str, Any], model_paths: Mapping[str, Optional[Path]]) -> list[dict[str, Any]]:
    """List the statement subjects: each role's model files, or the record itself when there are none.

    Args:
        record: The finalized audit record.
        model_paths: Role (``candidate`` or ``patched``) to model folder or file;
            roles whose path is None or absent are left out.
    """
    subjects = []
    for role, path in sorted(model_paths.items()):
        if path is None or not Path(path).exists():
            continue
        for relative, digest in model_files(path).items():
            subjects.append({"name": f"{role}/{relative}", "digest": {"sha256": digest}})
    if not subjects:
        subjects.append({"name": f"{RECORD_ROLE}/{record['run_id']}", "digest": {"sha256": record["digest"]}})
    return subjects


def build_statement(record: dict[str, Any], subjects: list[dict[str, Any]]) -> dict[str, Any]:
    """Wrap a finalized audit record and its subjects in an in-toto Statement v1.

    Raises:
        AuditError: The record has no digest yet.
    """
    if "digest" not in record:
        raise AuditError("the audit record has no digest; call audit.finalize() before signing it")
    return {"_type": STATEMENT_TYPE, "subject": subjects, "predicateType": PREDICATE_TYPE, "predicate": record}


def pre_authentication_encoding(payload_type: str, payload: bytes) -> bytes:
    """Return the DSSE v1 pre-authentication encoding, the bytes a signature covers.

    ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body``, where LEN is the
    byte length in ASCII decimal. Binding the type into the signed bytes stops
    a signature over one payload type being replayed as another.
    """
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def sign_statement(statement: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """Serialize a statement and sign it into a DSSE envelope."""
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    signature = private_key.sign(pre_authentication_encoding(PAYLOAD_TYPE, payload))
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{"keyid": key_id(private_key.public_key()), "sig": base64.b64encode(signature).decode("ascii")}],
    }


def attest_record(record: dict[str, Any], model_paths: Mapping[str, Optional[Path]], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """Build, serialize and sign the statement for a finalized audit record.

    Args:
        record: The finalized audit record, the predicate.
        model_paths: Role to model folder or file, see :func:`collect_subjects`.
        private_key: The Ed25519 signing key.

    Returns:
        The DSSE envelope as a JSON-ready dict.
    """
    subjects = collect_subjects(record, model_paths)
    _check_evaluated_files(record, subjects)
    envelope = sign_statement(build_statement(record, subjects), private_key)
    logger.info("Signed audit record %s (%s) with key %s", record["run_id"], record["digest"][:12], envelope["signatures"][0]["keyid"][:16])
    return envelope


def _check_evaluated_files(record: dict[str, Any], subjects: list[dict[str, Any]]) -> None:
    """Raise when a model file changed between its evaluation and signing, so no statement attests unevaluated weights.

    The record keeps the digests of the files the gate loaded, by file name,
    under ``<role>.digests.files``.
    """
    attested = {subject["name"]: subject["digest"]["sha256"] for subject in subjects}
    for role in MODEL_ROLES:
        evaluated = ((record.get(role) or {}).get("digests") or {}).get("files") or {}
        for name, digest in sorted(evaluated.items()):
            current = attested.get(f"{role}/{name}")
            if current is not None and current != digest:
                raise AuditError(
                    f"the {role} model's {name} changed after it was evaluated (sha256 {current[:16]}, evaluated {digest[:16]}); "
                    "the record is not signed. Find what modified the model folder and run the gate again"
                )


def envelope_path(audit_dir: Path, run_id: str) -> Path:
    """Return where the envelope of a run is written: ``<audit_dir>/<run_id>.intoto.json``."""
    return Path(audit_dir) / f"{run_id}{audit.ENVELOPE_SUFFIX}"


def write_envelope(envelope: dict[str, Any], audit_dir: Path, run_id: str) -> Path:
    """Write an envelope beside its audit record, atomically."""
    path = envelope_path(audit_dir, run_id)
    atomic_write_text(path, json.dumps(envelope, indent=2, sort_keys=True))
    logger.info("Wrote attestation %s", path)
    return path


def read_envelope(path: str | Path) -> dict[str, Any]:
    """Read a DSSE envelope from a JSON file.

    Raises:
        AuditError: The file is missing, not JSON, or not a JSON object.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise AuditError(f"attestation {path} not found; gate runs write it as <audit dir>/<run_id>{audit.ENVELOPE_SUFFIX}") from exc
    except OSError as exc:
        raise AuditError(f"cannot read attestation {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuditError(f"{path} is not a JSON attestation: {exc}") from exc
    if not isinstance(document, dict):
        raise AuditError(f"{path} is not a DSSE envelope: expected a JSON object, got {type(document).__name__}")
    return document


def decode_base64(text: Any) -> bytes:
    """Decode standard or URL-safe base64, with or without padding; DSSE verifiers must accept both alphabets.

    Raises:
        binascii.Error: The text is not base64.
        TypeError: The value is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a base64 string, got {type(text).__name__}")
    standard = text.translate(str.maketrans("-_", "+/"))
    return base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)


def decode_statement(envelope: dict[str, Any]) -> dict[str, Any]:
    """Decode the in-toto statement from an envelope's payload, without checking the signature.

    Raises:
        AuditError: The payload is missing, not base64, or not a JSON object.
    """
    try:
        statement = json.loads(decode_base64(envelope["payload"]).decode("utf-8"))
    except KeyError:
        raise AuditError("the envelope has no 'payload' field") from None
    except (TypeError, binascii.Error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuditError(f"the envelope's payload is not base64-encoded JSON: {exc}") from None
    if not isinstance(statement, dict):
        raise AuditError(f"the envelope's payload is a JSON {type(statement).__name__}, not an in-toto statement")
    return statement


def subject_roles(statement: dict[str, Any]) -> list[str]:
    """Return the model roles (``candidate``, ``patched``) that a statement's subjects name."""
    roles = {str(subject.get("name", "")).partition("/")[0] for subject in statement.get("subject") or [] if isinstance(subject, dict)}
    return [role for role in MODEL_ROLES if role in roles]
