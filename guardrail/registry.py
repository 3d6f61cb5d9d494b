"""Model registry: versions, aliases and gate status.

:class:`LocalRegistry` is the embedded default, a folder tree::

    <root>/
      .lock                      file lock held during every write
      <model name>/
        aliases.json             {"approved": 3, "quarantined": 2, ...}
        versions/<N>/
          model/                 the weights (safetensors) and tokenizer
          version.json           digests, status, tags, audit digest
          audit.json             the gate's audit record, when one is attached
          attestation.json       the signed envelope over audit.json, when signed

Every write goes to a temporary folder or file next to its target, is
fsync'ed, and is moved into place with one rename, under a file lock, so two
gates sharing a registry never corrupt it and a failed write leaves it as it
was. A model reference of the form ``registry:<name>@<alias or version>``
resolves to the version's model folder.

:class:`Registry` is the interface every backend implements: this one,
:mod:`guardrail.registry_mlflow` and :mod:`guardrail.registry_hub`.
:func:`open_registry` returns the one that the policy's ``registry.type`` names.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Protocol

from filelock import FileLock, Timeout

from guardrail.errors import RegistryError
from guardrail.files import atomic_write_bytes
from guardrail.hashing import combine_digests, digest_tree

if TYPE_CHECKING:
    from guardrail.policy import SafetyPolicy

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REFERENCE_PREFIX = "registry:"


@dataclass
class ModelVersion:
    """One registered version."""

    name: str
    version: int
    created_at: str
    status: str  # "candidate", "approved", "quarantined", "blocked"
    model_digest: str
    files: dict[str, str]
    tags: dict[str, str] = field(default_factory=dict)
    audit_digest: Optional[str] = None
    source: Optional[str] = None
    aliases: list[str] = field(default_factory=list)


class Registry(Protocol):
    """Interface the gate, the CLI and the pipeline adapters use for any registry.

    :class:`LocalRegistry`, :class:`guardrail.registry_mlflow.MlflowRegistry`
    and :class:`guardrail.registry_hub.HubRegistry` implement it; use
    :func:`open_registry` to get the one a policy names. Every method raises
    :class:`~guardrail.errors.RegistryError` on an invalid name, a missing
    model, version or alias, or a failed read or write.
    """

    @property
    def location(self) -> str:
        """Where the registry is (folder, tracking URI or repo URL), for messages and audit records."""
        ...

    def register(self, name: str, model_folder: Path, *, status: str, tags: dict[str, str], audit: Optional[dict[str, Any]] = None, aliases: tuple[str, ...] = ()) -> ModelVersion:
        """Store a model folder as a new version (or reuse the version with the same digest) and move aliases to it."""
        ...

    def get(self, name: str, version_or_alias: str = "latest") -> ModelVersion:
        """Return a version by number, alias, or ``latest``."""
        ...

    def model_path(self, name: str, version_or_alias: str = "latest", *, refresh: bool = False) -> Path:
        """Return a local folder with the version's model files; remote registries download into a cache.

        ``refresh`` makes a remote registry download the version again instead of reusing its cached copy.
        """
        ...

    def audit_record(self, name: str, version_or_alias: str = "latest") -> Optional[dict[str, Any]]:
        """Return the audit record stored with a version, if any."""
        ...

    def attestation(self, name: str, version_or_alias: str = "latest") -> Optional[dict[str, Any]]:
        """Return the signed attestation stored with a version, if any."""
        ...

    def attach_audit(self, name: str, version: int, record: dict[str, Any], attestation: Optional[dict[str, Any]] = None) -> None:
        """Store a finalized audit record (and its attestation; None removes an old one) with a version."""
        ...

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point an alias at an existing version."""
        ...

    def set_status(self, name: str, version: int, status: str, aliases: tuple[str, ...] = (), tags: Optional[dict[str, str]] = None) -> ModelVersion:
        """Change a version's status and tags and move aliases to it."""
        ...

    def list_versions(self, name: Optional[str] = None) -> list[ModelVersion]:
        """List the versions of one model, or of every model."""
        ...

    def transaction(self, name: str) -> AbstractContextManager[None]:
        """Group writes to one model; on any exception inside, undo them all."""
        ...


def open_registry(policy: "SafetyPolicy") -> Registry:
    """Open the registry that the policy's ``registry`` section names.

    Args:
        policy: The validated policy; ``registry.type`` selects the backend.

    Returns:
        A :class:`LocalRegistry`, an MLflow registry or a Hub registry.

    Raises:
        RegistryError: The backend's package is not installed, or its settings are unusable.

    Examples:
        >>> registry = open_registry(load_policy("policies/default.yaml"))
        >>> registry.location
        '.guardrail/registry'
    """
    settings = policy.registry
    if settings.type == "mlflow":
        try:
            from guardrail.registry_mlflow import MlflowRegistry
        except ImportError as exc:
            raise RegistryError(f"registry.type is 'mlflow' but MLflow cannot be imported ({exc}); install it with pip install 'guardrail[mlflow]'") from exc
        return MlflowRegistry(str(settings.tracking_uri), experiment=settings.experiment, cache_dir=settings.cache_dir)
    if settings.type == "hub":
        from guardrail.registry_hub import HubRegistry

        token = os.environ.get(settings.token_env) or None
        if token is None:
            logger.info("$%s is not set; the Hub registry uses huggingface_hub's saved login, if any", settings.token_env)
        return HubRegistry(
            str(settings.repo_id),
            branch=settings.branch,
            endpoint=settings.endpoint,
            token=token,
            token_env=settings.token_env,
            cache_dir=settings.cache_dir,
        )
    return LocalRegistry(settings.path)


def validate_name(value: str, what: str = "model name") -> str:
    """Reject names that could escape the registry root (path separators, ``..``)."""
    if not _NAME.match(value) or ".." in value:
        raise RegistryError(
            f"invalid {what} {value!r}; use letters, digits, '.', '_' and '-' (no path separators or '..'), at most 128 characters"
        )
    return value


def parse_reference(reference: str) -> Optional[tuple[str, str]]:
    """Split ``registry:<name>@<alias or version>``; return None for other references."""
    if not reference.startswith(REFERENCE_PREFIX):
        return None
    name, _, selector = reference[len(REFERENCE_PREFIX):].partition("@")
    return validate_name(name), selector or "latest"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _write_json_atomic(path: Path, document: Any) -> None:
    atomic_write_bytes(path, json.dumps(document, indent=2, sort_keys=True).encode("utf-8"))


class LocalRegistry:
    """A registry in a local folder; see the module docstring for the layout.

    Args:
        root: Registry folder, created on first write.
        lock_timeout: Seconds to wait for another writer before failing.

    Examples:
        >>> registry = LocalRegistry(".guardrail/registry")
        >>> version = registry.register("chat-model", Path("out/model"), status="candidate", tags={}, aliases=("candidate",))
        >>> registry.get("chat-model", "candidate").version
        1
    """

    def __init__(self, root: str | Path, lock_timeout: float = 60.0) -> None:
        self.root = Path(root)
        self.lock_timeout = lock_timeout
        self._file_lock: Optional[FileLock] = None

    @property
    def location(self) -> str:
        """The registry folder, for messages and audit records."""
        return str(self.root)

    def _lock(self) -> FileLock:
        # One FileLock object per registry, so nested acquisitions in a transaction re-enter it.
        if self._file_lock is None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RegistryError(f"cannot create the registry folder {self.root}: {exc.strerror}; check registry.path and permissions") from exc
            self._file_lock = FileLock(str(self.root / ".lock"), timeout=self.lock_timeout)
        return self._file_lock

    @contextmanager
    def transaction(self, name: str) -> Iterator[None]:
        """Group writes to one model so that they all land or none does.

        The lock is held throughout. On any exception, versions created inside
        the block are removed and the alias, version and audit files of the
        older versions are restored byte for byte.
        """
        validate_name(name)
        with self._lock_or_fail():
            versions_before = set(self._versions(name))
            snapshot = self._snapshot(name, versions_before)
            try:
                yield
            except BaseException:
                logger.warning("Rolling back registry writes to %s", name)
                for version in set(self._versions(name)) - versions_before:
                    shutil.rmtree(self._model_dir(name) / "versions" / str(version), ignore_errors=True)
                for path, content in snapshot.items():
                    if content is None:
                        path.unlink(missing_ok=True)
                    else:
                        atomic_write_bytes(path, content)
                raise

    def _snapshot(self, name: str, versions: set[int]) -> dict[Path, Optional[bytes]]:
        """Return the bytes of the metadata files a transaction may change; None marks an absent file."""
        model_dir = self._model_dir(name)
        paths = [model_dir / "aliases.json"]
        for version in versions:
            folder = model_dir / "versions" / str(version)
            paths += [folder / "version.json", folder / "audit.json", folder / "attestation.json"]
        return {path: path.read_bytes() if path.is_file() else None for path in paths}

    def attach_audit(self, name: str, version: int, record: dict[str, Any], attestation: Optional[dict[str, Any]] = None) -> None:
        """Store a finalized audit record with a version and tag the version with its digest.

        Args:
            name: Registered model name.
            version: Version number the record describes.
            record: The finalized audit record, written as ``audit.json``.
            attestation: A signed DSSE envelope over the record, written as
                ``attestation.json`` beside it. None removes an earlier
                attestation, which signed a record that is now replaced.
        """
        with self._lock_or_fail():
            self._update(name, version, status=self._read_version(name, version).status, tags={"guardrail.audit_digest": record["digest"]}, audit=record, aliases=())
            path = self._model_dir(name) / "versions" / str(version) / "attestation.json"
            if attestation is not None:
                _write_json_atomic(path, attestation)
            else:
                path.unlink(missing_ok=True)

    def _model_dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    def _aliases(self, name: str) -> dict[str, int]:
        path = self._model_dir(name) / "aliases.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def _versions(self, name: str) -> list[int]:
        folder = self._model_dir(name) / "versions"
        if not folder.is_dir():
            return []
        return sorted(int(entry.name) for entry in folder.iterdir() if entry.name.isdigit() and (entry / "version.json").is_file())

    def _read_version(self, name: str, version: int) -> ModelVersion:
        path = self._model_dir(name) / "versions" / str(version) / "version.json"
        record = ModelVersion(**json.loads(path.read_text(encoding="utf-8")))
        record.aliases = sorted(alias for alias, target in self._aliases(name).items() if target == version)
        return record

    def register(
        self,
        name: str,
        model_folder: Path,
        *,
        status: str,
        tags: dict[str, str],
        audit: Optional[dict[str, Any]] = None,
        aliases: tuple[str, ...] = (),
    ) -> ModelVersion:
        """Copy a model folder into a new version, then point the given aliases at it.

        A model whose digest is already registered under ``name`` is not copied
        again: its existing version gets the new status, tags and aliases.

        Raises:
            RegistryError: The name is invalid, the folder is missing, or the write failed.
        """
        validate_name(name)
        for alias in aliases:
            validate_name(alias, "alias")
        model_folder = Path(model_folder)
        if not model_folder.is_dir():
            raise RegistryError(f"model folder {model_folder} not found; nothing was registered")
        files = digest_tree(model_folder)
        model_digest = combine_digests(files.items())

        with self._lock_or_fail():
            existing = self._find_digest(name, model_digest)
            if existing is not None:
                logger.info("Model %s is already registered as %s version %d", model_digest[:12], name, existing.version)
                return self._update(name, existing.version, status=status, tags=tags, audit=audit, aliases=aliases)

            version = (self._versions(name) or [0])[-1] + 1
            record = ModelVersion(
                name=name,
                version=version,
                created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                status=status,
                model_digest=model_digest,
                files=files,
                tags=dict(tags),
                audit_digest=(audit or {}).get("digest"),
                source=str(model_folder),
            )
            self._write_version(name, version, model_folder, record, audit)
            self._move_aliases(name, {alias: version for alias in aliases})
            logger.info("Registered %s version %d (%s) with aliases %s", name, version, status, list(aliases))
            return self._read_version(name, version)

    def _lock_or_fail(self) -> FileLock:
        lock = self._lock()
        try:
            lock.acquire()
        except Timeout as exc:
            raise RegistryError(f"registry {self.root} is locked by another writer for over {self.lock_timeout:.0f} s; retry later") from exc
        return _Held(lock)

    def _write_version(self, name: str, version: int, model_folder: Path, record: ModelVersion, audit: Optional[dict[str, Any]]) -> None:
        versions = self._model_dir(name) / "versions"
        staging = None
        try:
            versions.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=versions))
            shutil.copytree(model_folder, staging / "model")
            (staging / "version.json").write_text(json.dumps(asdict(record), indent=2, sort_keys=True), encoding="utf-8")
            if audit is not None:
                (staging / "audit.json").write_text(json.dumps(audit, indent=2, sort_keys=True), encoding="utf-8")
            _fsync_tree(staging)
            os.rename(staging, versions / str(version))
        except OSError as exc:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise RegistryError(f"cannot write {name} version {version} to {versions}: {exc.strerror or exc}; the registry is unchanged") from exc

    def _update(self, name: str, version: int, *, status: str, tags: dict[str, str], audit: Optional[dict[str, Any]], aliases: tuple[str, ...]) -> ModelVersion:
        folder = self._model_dir(name) / "versions" / str(version)
        record = self._read_version(name, version)
        record.status = status
        record.tags.update(tags)
        if audit is not None:
            record.audit_digest = audit.get("digest")
            _write_json_atomic(folder / "audit.json", audit)
        document = asdict(record)
        document.pop("aliases")
        _write_json_atomic(folder / "version.json", document)
        self._move_aliases(name, {alias: version for alias in aliases})
        return self._read_version(name, version)

    def _move_aliases(self, name: str, moves: dict[str, int]) -> None:
        if not moves:
            return
        aliases = self._aliases(name)
        aliases.update(moves)
        _write_json_atomic(self._model_dir(name) / "aliases.json", aliases)

    def _find_digest(self, name: str, model_digest: str) -> Optional[ModelVersion]:
        for version in self._versions(name):
            record = self._read_version(name, version)
            if record.model_digest == model_digest:
                return record
        return None

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point an alias at an existing version."""
        validate_name(alias, "alias")
        with self._lock_or_fail():
            if version not in self._versions(name):
                raise RegistryError(f"{name} has no version {version}; versions: {self._versions(name)}")
            self._move_aliases(name, {alias: version})

    def set_status(self, name: str, version: int, status: str, aliases: tuple[str, ...] = (), tags: Optional[dict[str, str]] = None) -> ModelVersion:
        """Change a version's status and move aliases to it."""
        with self._lock_or_fail():
            return self._update(name, version, status=status, tags=tags or {}, audit=None, aliases=aliases)

    def get(self, name: str, version_or_alias: str = "latest") -> ModelVersion:
        """Return a version by number, alias, or ``latest``.

        Raises:
            RegistryError: The model, version or alias does not exist.
        """
        versions = self._versions(name)
        if not versions:
            raise RegistryError(f"model {name!r} is not in registry {self.root}; `guardrail registry list` shows what is")
        if version_or_alias == "latest":
            return self._read_version(name, versions[-1])
        if version_or_alias.isdigit():
            if int(version_or_alias) not in versions:
                raise RegistryError(f"{name} has no version {version_or_alias}; versions: {versions}")
            return self._read_version(name, int(version_or_alias))
        aliases = self._aliases(name)
        if version_or_alias not in aliases:
            raise RegistryError(f"{name} has no alias {version_or_alias!r}; aliases: {sorted(aliases)}")
        return self._read_version(name, aliases[version_or_alias])

    def model_path(self, name: str, version_or_alias: str = "latest", *, refresh: bool = False) -> Path:
        """Return the model folder of a version.

        ``refresh`` has no effect here, because the folder is the registry's own copy, not a cached download.
        """
        record = self.get(name, version_or_alias)
        return self._model_dir(name) / "versions" / str(record.version) / "model"

    def audit_record(self, name: str, version_or_alias: str = "latest") -> Optional[dict[str, Any]]:
        """Return the audit record stored with a version, if any."""
        record = self.get(name, version_or_alias)
        path = self._model_dir(name) / "versions" / str(record.version) / "audit.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def attestation(self, name: str, version_or_alias: str = "latest") -> Optional[dict[str, Any]]:
        """Return the signed attestation (DSSE envelope) stored with a version, if any."""
        record = self.get(name, version_or_alias)
        path = self._model_dir(name) / "versions" / str(record.version) / "attestation.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def list_versions(self, name: Optional[str] = None) -> list[ModelVersion]:
        """List versions of one model, or of every model in the registry."""
        if name is not None:
            return [self._read_version(name, version) for version in self._versions(name)]
        if not self.root.is_dir():
            return []
        names = sorted(entry.name for entry in self.root.iterdir() if entry.is_dir() and _NAME.match(entry.name))
        return [record for model in names for record in self.list_versions(model)]


class _Held:
    """Context manager that releases an acquired file lock."""

    def __init__(self, lock: FileLock) -> None:
        self.lock = lock

    def __enter__(self) -> FileLock:
        return self.lock

    def __exit__(self, *exc_info: Any) -> None:
        self.lock.release()
