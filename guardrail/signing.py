"""Ed25519 signing keys for audit attestations.

Keys are PEM files: the private key in PKCS8, optionally encrypted with the
passphrase in the environment variable :data:`PASSPHRASE_ENV`, and the public
key in SubjectPublicKeyInfo form. ``guardrail audit keygen`` writes both with
:func:`generate_key_pair`. The passphrase is read from the environment only,
never from a command line, and no message or log line contains it.

Examples:
    >>> pair = generate_key_pair(Path("keys"))
    >>> key_id(load_public_key(pair.public_key)) == pair.keyid
    True
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from guardrail.errors import AuditError

logger = logging.getLogger(__name__)

#: Environment variable holding the private key's passphrase, for keygen and signing.
PASSPHRASE_ENV = "GUARDRAIL_SIGNING_PASSPHRASE"
PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"


@dataclass
class KeyPair:
    """Paths of a key pair written by :func:`generate_key_pair`, with its key id."""

    private_key: Path
    public_key: Path
    keyid: str
    encrypted: bool


def key_id(public_key: Ed25519PublicKey) -> str:
    """Return the hex SHA-256 of the raw 32-byte public key, the ``keyid`` in signatures."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_key_pair(out_dir: Path, *, passphrase: Optional[str] = None, force: bool = False) -> KeyPair:
    """Create an Ed25519 key pair as ``signing.key`` (mode 0600) and ``signing.pub`` in ``out_dir``.

    Args:
        out_dir: Folder for the two files; created with mode 0700 when missing.
        passphrase: Encrypts the private key when given and not empty.
        force: Replace existing key files. Without it, an existing file is an error.

    Returns:
        The written paths and the key id.

    Raises:
        AuditError: A key file exists and ``force`` is False, or a write failed.
    """
    out_dir = Path(out_dir).expanduser()
    private_path, public_path = out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE
    existing = [str(path) for path in (private_path, public_path) if path.exists()]
    if existing and not force:
        raise AuditError(f"key file(s) already exist: {', '.join(existing)}; pass --force to replace them, or choose another --out folder")

    key = Ed25519PrivateKey.generate()
    encryption = serialization.BestAvailableEncryption(passphrase.encode("utf-8")) if passphrase else serialization.NoEncryption()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_key_file(private_path, private_pem, 0o600, overwrite=force)
        _write_key_file(public_path, public_pem, 0o644, overwrite=force)
    except FileExistsError as exc:
        raise AuditError(f"key file {exc.filename} appeared while writing; pass --force to replace it") from exc
    except OSError as exc:
        raise AuditError(f"cannot write keys to {out_dir}: {exc.strerror or exc}; check the folder's permissions") from exc
    keyid = key_id(key.public_key())
    logger.info("Wrote signing key %s and public key %s (keyid %s)", private_path, public_path, keyid[:16])
    return KeyPair(private_path, public_path, keyid, encrypted=bool(passphrase))


def _write_key_file(path: Path, content: bytes, mode: int, *, overwrite: bool) -> None:
    """Write a key file whose mode is set before any byte lands, so a private key is never readable by others."""
    if overwrite:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    else:
        # O_EXCL fails when the file exists, so a concurrent keygen is never overwritten.
        descriptor, temporary = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), str(path)
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key, decrypting it with the passphrase in :data:`PASSPHRASE_ENV` when set.

    Raises:
        AuditError: The file is missing, unreadable, not a PEM private key,
            encrypted without a passphrase set, or not an Ed25519 key. The
            message never contains the passphrase.
    """
    path = Path(path).expanduser()
    fix = f"create a key with `guardrail audit keygen --out {path.parent}` or correct audit.signing_key in the policy"
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise AuditError(f"signing key {path} not found; {fix}") from exc
    except OSError as exc:
        raise AuditError(f"cannot read signing key {path}: {exc.strerror or exc}; check its permissions or {fix}") from exc

    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning("Signing key %s is readable by other users (mode %o); restrict it with chmod 600", path, mode)

    passphrase = os.environ.get(PASSPHRASE_ENV) or None
    try:
        key = serialization.load_pem_private_key(data, password=passphrase.encode("utf-8") if passphrase else None)
    except TypeError:
        if passphrase is None:
            raise AuditError(f"signing key {path} is encrypted; set {PASSPHRASE_ENV} to its passphrase") from None
        # The key is not encrypted, so the passphrase in the environment is not needed.
        logger.debug("Signing key %s is not encrypted; ignoring %s", path, PASSPHRASE_ENV)
        key = _load_unencrypted(data, path, fix)
    except ValueError:
        if passphrase is not None:
            raise AuditError(f"cannot decrypt signing key {path}: the passphrase in {PASSPHRASE_ENV} is wrong, or the file is not a PEM private key") from None
        raise AuditError(f"signing key {path} is not a PEM private key; {fix}") from None
    except UnsupportedAlgorithm:
        raise AuditError(f"signing key {path} uses an unsupported algorithm; {fix}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"signing key {path} is a {type(key).__name__}, not an Ed25519 key; {fix}")
    return key


def _load_unencrypted(data: bytes, path: Path, fix: str) -> Ed25519PrivateKey:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise AuditError(f"signing key {path} is not a PEM private key; {fix}") from None


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file.

    Raises:
        AuditError: The file is missing, unreadable, a private key, or not an Ed25519 public key.
    """
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise AuditError(f"public key {path} not found; pass the {PUBLIC_KEY_FILE} written by `guardrail audit keygen`") from exc
    except OSError as exc:
        raise AuditError(f"cannot read public key {path}: {exc.strerror or exc}") from exc
    if b"PRIVATE KEY" in data:
        raise AuditError(f"{path} contains a private key; pass the public key ({PUBLIC_KEY_FILE}) and keep the private key on the signing machine")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise AuditError(f"{path} is not a PEM public key; pass the {PUBLIC_KEY_FILE} written by `guardrail audit keygen`") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditError(f"public key {path} is a {type(key).__name__}, not an Ed25519 key")
    return key
