"""Model registry on an MLflow 3 tracking server.

Layout on the server:

* one registered model per guardrail model name;
* one run per version, in the experiment named by ``registry.experiment``
  (default ``guardrail``). The run's artifacts hold the model folder under
  ``model/``, the file digests under ``guardrail/files.json``, and the audit
  record and its attestation under ``audit/audit.json`` and
  ``audit/attestation.json``;
* one model version per run, created with the run's ``model/`` artifact URI
  as its source and tagged ``guardrail.status``, ``guardrail.model_digest``,
  ``guardrail.source``, ``guardrail.audit_digest`` and the caller's tags (the
  gate adds ``guardrail.decision`` and ``guardrail.run_id``);
* aliases set with ``set_registered_model_alias`` and resolved with
  ``get_model_version_by_alias``. Deprecated stages are not used.

Credentials come from the environment, where MLflow reads them itself
(``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``, or
``MLFLOW_TRACKING_TOKEN``). They are never part of the tracking URI, and
error messages are scrubbed of their values.

MLflow has no multi-call transactions. :meth:`MlflowRegistry.transaction`
records the model's versions, tags and aliases first and undoes every change
made inside the block when it raises: new versions and their runs are
deleted, and tags, aliases and overwritten audit artifacts are restored.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
import os
import posixpath
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlsplit

import requests
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities.model_registry import ModelVersion as MlflowModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from guardrail.errors import RegistryError
from guardrail.hashing import combine_digests, digest_tree
from guardrail.registry import ModelVersion, validate_name
from guardrail.registry_cache import cached_model

logger = logging.getLogger(__name__)

#: MLflow 3.17 accepts up to 8000 characters in run tags and 100000 in
#: model-version tags. Values are capped lower so that they also fit servers
#: and managed stores with smaller limits; full records go to artifacts.
TAG_VALUE_LIMIT_BYTES = 5000
TAG_KEY_LIMIT = 250

STATUS_TAG = "guardrail.status"
DIGEST_TAG = "guardrail.model_digest"
SOURCE_TAG = "guardrail.source"
AUDIT_TAG = "guardrail.audit_digest"
#: Version tags surfaced as ModelVersion fields rather than in ``tags``.
_FIELD_TAGS = frozenset({STATUS_TAG, DIGEST_TAG, SOURCE_TAG})

MODEL_ARTIFACT = "model"
FILES_ARTIFACT = "guardrail/files.json"
AUDIT_ARTIFACT = "audit/audit.json"
ATTESTATION_ARTIFACT = "audit/attestation.json"

#: Environment variables whose values never appear in an error message.
SECRET_ENV_VARS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")

_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
_ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"
_MESSAGE_LIMIT = 300


@dataclass
class _Journal:
    """Record of a transaction's changes, so that a failure can undo them."""

    name: str
    model_existed: bool
    version_tags: dict[int, dict[str, str]]
    aliases: dict[str, int]
    runs: list[str] = field(default_factory=list)
    #: (run id, artifact path, bytes before the transaction's first write; None when absent).
    artifacts: list[tuple[str, str, Optional[bytes]]] = field(default_factory=list)

    def remember_artifact(self, run_id: str, path: str, read: Callable[[], Optional[bytes]]) -> None:
        if not any(entry[0] == run_id and entry[1] == path for entry in self.artifacts):
            self.artifacts.append((run_id, path, read()))


def redacted_uri(uri: str) -> str:
    """Return a URI without any ``user:password@`` part."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()


#: Seconds to wait for a tracking server's health endpoint before giving up.
_HEALTH_TIMEOUT = 10.0


def _check_reachable(tracking_uri: str) -> None:
    """Raise at once when an HTTP tracking server does not respond.

    The MLflow client retries a refused connection with growing back-off for
    minutes before it raises, so one short request to ``/health`` first turns
    a wrong URI or a stopped server into an immediate, clear error. Any HTTP
    response counts as reachable, because an authenticating proxy may refuse
    ``/health`` without credentials.
    """
    if urlsplit(tracking_uri).scheme not in ("http", "https"):
        return
    try:
        requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=_HEALTH_TIMEOUT)
    except requests.RequestException as exc:
        raise RegistryError(
            f"the MLflow tracking server at {tracking_uri} is not reachable ({type(exc).__name__}); "
            "start it, or fix registry.tracking_uri in the policy"
        ) from None


class MlflowRegistry:
    """A registry on an MLflow tracking server; see the module docstring for the layout.

    Args:
        tracking_uri: Tracking server URI, such as ``http://127.0.0.1:5000``. It must not
            contain credentials.
        experiment: Experiment that contains one run per registered version; created when missing.
        cache_dir: Folder that downloaded versions are cached in.

    Raises:
        RegistryError: The URI contains a user name or password.

    Examples:
        >>> registry = MlflowRegistry("http://127.0.0.1:5000")
        >>> version = registry.register("chat-model", Path("out/model"), status="candidate", tags={}, aliases=("candidate",))
        >>> registry.model_path("chat-model", "candidate")
        PosixPath('.guardrail/registry-cache/mlflow/.../chat-model/1/model')
    """

    def __init__(self, tracking_uri: str, *, experiment: str = "guardrail", cache_dir: str | Path = ".guardrail/registry-cache") -> None:
        if redacted_uri(tracking_uri) != tracking_uri:
            raise RegistryError(
                "the MLflow tracking URI contains a user name or password; remove it from the URI and set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment"
            )
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.cache_dir = Path(cache_dir)
        _check_reachable(tracking_uri)
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._experiment_id: Optional[str] = None
        self._journal: Optional[_Journal] = None
        # A run's files.json is written once, before its version exists, so it can be cached by run id.
        self._manifests: dict[str, dict[str, str]] = {}

    @property
    def location(self) -> str:
        """The tracking server URI, for messages and audit records."""
        return self.tracking_uri

    # Errors

    def _clean(self, exc: BaseException) -> str:
        """Return an exception's message on one line, shortened, without any secret from the environment."""
        message = exc.message if isinstance(exc, MlflowException) else str(exc)
        message = " ".join(message.split())
        for variable in SECRET_ENV_VARS:
            secret = os.environ.get(variable)
            if secret:
                message = message.replace(secret, "***")
        if len(message) > _MESSAGE_LIMIT:
            message = message[:_MESSAGE_LIMIT] + "..."
        return message

    @contextmanager
    def _errors(self, action: str, fix: Optional[str] = None) -> Iterator[None]:
        """Turn MLflow, HTTP and file errors raised inside the block into a RegistryError."""
        try:
            yield
        except RegistryError:
            raise
        except (MlflowException, requests.RequestException, OSError) as exc:
            fix = fix or f"check that the MLflow server at {self.location} is reachable and that your credentials allow this"
            raise RegistryError(f"MLflow registry {self.location}: {action} failed: {self._clean(exc)}; {fix}") from exc

    # Reads

    def _experiment(self) -> str:
        if self._experiment_id is None:
            with self._errors(f"opening experiment {self.experiment!r}"):
                found = self._client.get_experiment_by_name(self.experiment)
                if found is None:
                    try:
                        self._experiment_id = self._client.create_experiment(self.experiment)
                    except MlflowException as exc:
                        # Another gate created it between the lookup and the create.
                        if exc.error_code != _ALREADY_EXISTS:
                            raise
                        self._experiment_id = self._client.get_experiment_by_name(self.experiment).experiment_id
                else:
                    self._experiment_id = found.experiment_id
        return self._experiment_id

    def _model_exists(self, name: str) -> bool:
        with self._errors(f"looking up model {name!r}"):
            try:
                self._client.get_registered_model(name)
            except MlflowException as exc:
                if exc.error_code == _NOT_FOUND:
                    return False
                raise
        return True

    def _aliases(self, name: str) -> dict[str, int]:
        with self._errors(f"reading the aliases of {name!r}"):
            try:
                aliases = self._client.get_registered_model(name).aliases
            except MlflowException as exc:
                if exc.error_code == _NOT_FOUND:
                    return {}
                raise
        return {alias: int(version) for alias, version in aliases.items()}

    def _search(self, name: str) -> dict[int, MlflowModelVersion]:
        """Return every version of a model by number; empty when the model does not exist."""
        found: dict[int, MlflowModelVersion] = {}
        page_token = None
        with self._errors(f"listing the versions of {name!r}"):
            while True:
                page = self._client.search_model_versions(f"name = '{name}'", page_token=page_token)
                found.update({int(version.version): version for version in page})
                page_token = page.token
                if not page_token:
                    return found

    def _read_artifact(self, run_id: str, path: str) -> Optional[bytes]:
        """Return an artifact's bytes, or None when the run has no such file."""
        with self._errors(f"reading artifact {path} of run {run_id}"):
            listed = {entry.path for entry in self._client.list_artifacts(run_id, posixpath.dirname(path))}
            if path not in listed:
                return None
            with tempfile.TemporaryDirectory(prefix="guardrail-mlflow-") as folder:
                local = self._client.download_artifacts(run_id, path, dst_path=folder)
                return Path(local).read_bytes()

    def _read_json_artifact(self, run_id: Optional[str], path: str) -> Optional[dict[str, Any]]:
        if run_id is None:
            return None
        data = self._read_artifact(run_id, path)
        return None if data is None else json.loads(data.decode("utf-8"))

    def _manifest(self, run_id: Optional[str]) -> dict[str, str]:
        """Return the file digests recorded with a version's run; empty for versions registered by other tools."""
        if run_id is None:
            return {}
        if run_id not in self._manifests:
            self._manifests[run_id] = self._read_json_artifact(run_id, FILES_ARTIFACT) or {}
        return self._manifests[run_id]

    def _to_version(self, version: MlflowModelVersion, aliases: dict[str, int]) -> ModelVersion:
        tags = dict(version.tags)
        number = int(version.version)
        files = self._manifest(version.run_id)
        return ModelVersion(
            name=version.name,
            version=number,
            created_at=_dt.datetime.fromtimestamp(version.creation_timestamp / 1000, _dt.timezone.utc).isoformat(timespec="seconds"),
            status=tags.get(STATUS_TAG, "unknown"),
            model_digest=tags.get(DIGEST_TAG, ""),
            files=files,
            tags={key: value for key, value in tags.items() if key not in _FIELD_TAGS},
            audit_digest=tags.get(AUDIT_TAG),
            source=tags.get(SOURCE_TAG, version.source),
            aliases=sorted(alias for alias, target in aliases.items() if target == number),
        )

    def _resolve(self, name: str, version_or_alias: str) -> MlflowModelVersion:
        """Return the MLflow model version for a number, an alias or ``latest``."""
        validate_name(name)
        if version_or_alias == "latest" or version_or_alias.isdigit():
            versions = self._search(name)
            if not versions:
                raise RegistryError(f"model {name!r} is not in MLflow registry {self.location}; `guardrail registry list` shows what is")
            number = max(versions) if version_or_alias == "latest" else int(version_or_alias)
            if number not in versions:
                raise RegistryError(f"{name} has no version {version_or_alias}; versions: {sorted(versions)}")
            return versions[number]
        with self._errors(f"resolving alias {version_or_alias!r} of {name!r}"):
            try:
                return self._client.get_model_version_by_alias(name, version_or_alias)
            except MlflowException as exc:
                # MLflow 3.17 returns INVALID_PARAMETER_VALUE for an unknown alias and
                # RESOURCE_DOES_NOT_EXIST for an unknown model, so look at the model itself.
                if not self._model_exists(name):
                    raise RegistryError(f"model {name!r} is not in MLflow registry {self.location}; `guardrail registry list` shows what is") from exc
                aliases = self._aliases(name)
                if version_or_alias not in aliases:
                    raise RegistryError(f"{name} has no alias {version_or_alias!r}; aliases: {sorted(aliases)}") from exc
                raise

    def get(self, name: str, version_or_alias: str = "latest") -> ModelVersion:
        """Return a version by number, alias, or ``latest``.

        Raises:
            RegistryError: The model, version or alias does not exist, or the server failed.
        """
        return self._to_version(self._resolve(name, version_or_alias), self._aliases(name))

    def model_path(self, name: str, version_or_alias: str = "latest", *, refresh: bool = False) -> Path:
        """Download a version's model into the cache, verify its digests and return the folder.

        A verified copy already in the cache is reused unless ``refresh`` is set.
        """
        found = self._resolve(name, version_or_alias)
        record = self._to_version(found, {})
        server_key = hashlib.sha256(self.location.encode("utf-8")).hexdigest()[:16]
        folder = self.cache_dir / "mlflow" / server_key / name / str(record.version)
        label = f"{name} version {record.version}"

        def download(staging: Path) -> Path:
            with self._errors(f"downloading {label} from {found.source}"):
                return Path(download_artifacts(artifact_uri=found.source, dst_path=str(staging), tracking_uri=self.tracking_uri))

        return cached_model(folder, record.files, record.model_digest, download, label=label, refresh=refresh)

    def audit_record(self, name: str, version_or_alias: str = "latest") -> Optional[dict[str, Any]]:
        """Return the audit record stored with a version, if any."""
        return self._read_json_artifact(self._resolve(name, version_or_alias).run_id, AUDIT_ARTIFACT)

    def attestation(self, name: str, version_or_alias: str = "latest") -> Optional[dict[str, Any]]:
        """Return the signed attestation (DSSE envelope) stored with a version, if any."""
        return self._read_json_artifact(self._resolve(name, version_or_alias).run_id, ATTESTATION_ARTIFACT)

    def list_versions(self, name: Optional[str] = None) -> list[ModelVersion]:
        """List versions of one model, or of every registered model whose name guardrail accepts."""
        if name is not None:
            validate_name(name)
            aliases = self._aliases(name)
            return [self._to_version(version, aliases) for _, version in sorted(self._search(name).items())]
        names: list[str] = []
        page_token = None
        with self._errors("listing registered models"):
            while True:
                page = self._client.search_registered_models(page_token=page_token)
                names += [model.name for model in page]
                page_token = page.token
                if not page_token:
                    break
        usable = []
        for model_name in sorted(names):
            try:
                usable.append(validate_name(model_name))
            except RegistryError:
                logger.debug("Skipping registered model %r: its name is not a valid guardrail model name", model_name)
        return [record for model_name in usable for record in self.list_versions(model_name)]

    # Writes

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
        """Upload a model folder as a new run and model version, then point the given aliases at it.

        A model whose digest is already registered under ``name`` is not uploaded
        again: its existing version gets the new status, tags and aliases.

        Raises:
            RegistryError: The name, an alias or a tag is invalid, the folder is missing, or the server failed.
        """
        validate_name(name)
        for alias in aliases:
            validate_name(alias, "alias")
        _check_tags(name, tags)
        model_folder = Path(model_folder)
        if not model_folder.is_dir():
            raise RegistryError(f"model folder {model_folder} not found; nothing was registered")
        files = digest_tree(model_folder)
        model_digest = combine_digests(files.items())

        existing = next((version for version in self._search(name).values() if version.tags.get(DIGEST_TAG) == model_digest), None)
        if existing is not None:
            logger.info("Model %s is already registered as %s version %s", model_digest[:12], name, existing.version)
            return self._update(name, int(existing.version), status=status, tags=tags, audit=audit, aliases=aliases)

        self._ensure_model(name)
        run_id = self._upload_run(name, model_folder, files, model_digest, audit)
        version_tags = {**tags, STATUS_TAG: status, DIGEST_TAG: model_digest, SOURCE_TAG: str(model_folder)}
        if audit is not None:
            version_tags[AUDIT_TAG] = audit["digest"]
        try:
            with self._errors(f"creating a version of {name!r} from run {run_id}"):
                artifact_uri = self._client.get_run(run_id).info.artifact_uri
                created = self._client.create_model_version(name, source=f"{artifact_uri}/{MODEL_ARTIFACT}", run_id=run_id, tags=version_tags)
                self._client.set_tag(run_id, "guardrail.version", created.version)
        except RegistryError:
            if self._journal is None:
                self._delete_run_quietly(run_id)
            raise
        self._move_aliases(name, aliases, int(created.version))
        logger.info("Registered %s version %s (%s) with aliases %s in %s", name, created.version, status, list(aliases), self.location)
        return self.get(name, str(created.version))

    def _ensure_model(self, name: str) -> None:
        with self._errors(f"creating registered model {name!r}"):
            try:
                self._client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != _ALREADY_EXISTS:
                    raise

    def _upload_run(self, name: str, model_folder: Path, files: dict[str, str], model_digest: str, audit: Optional[dict[str, Any]]) -> str:
        """Create a run that contains the model, its file digests and the audit record; delete it again on failure."""
        with self._errors(f"creating a run for {name!r} in experiment {self.experiment!r}"):
            run = self._client.create_run(self._experiment(), run_name=f"{name}-{model_digest[:12]}", tags={"guardrail.model": name, DIGEST_TAG: model_digest})
        run_id = run.info.run_id
        if self._journal is not None:
            self._journal.runs.append(run_id)
        try:
            with self._errors(f"uploading {model_folder} to run {run_id}", "check the server's artifact store and free space, then re-run"):
                self._client.log_artifacts(run_id, str(model_folder), MODEL_ARTIFACT)
                self._write_artifact(run_id, FILES_ARTIFACT, _json_bytes(files))
                if audit is not None:
                    self._write_artifact(run_id, AUDIT_ARTIFACT, _json_bytes(audit))
                # update_run, unlike set_terminated, does not print the run's URL to stdout.
                self._client.update_run(run_id, status="FINISHED")
        except RegistryError:
            if self._journal is None:
                self._delete_run_quietly(run_id)
            raise
        return run_id

    def _delete_run_quietly(self, run_id: str) -> None:
        try:
            self._client.delete_run(run_id)
        except (MlflowException, requests.RequestException) as exc:
            logger.error("Could not delete the incomplete run %s: %s; delete it in the MLflow UI", run_id, self._clean(exc))

    def _write_artifact(self, run_id: str, path: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="guardrail-mlflow-") as folder:
            local = Path(folder) / posixpath.basename(path)
            local.write_bytes(data)
            self._client.log_artifact(run_id, str(local), posixpath.dirname(path) or None)

    def _delete_artifact(self, run_id: str, path: str) -> None:
        artifact_uri = self._client.get_run(run_id).info.artifact_uri
        get_artifact_repository(artifact_uri, tracking_uri=self.tracking_uri).delete_artifacts(path)

    def _update(
        self,
        name: str,
        version: int,
        *,
        status: str,
        tags: dict[str, str],
        audit: Optional[dict[str, Any]],
        aliases: tuple[str, ...],
    ) -> ModelVersion:
        for alias in aliases:
            validate_name(alias, "alias")
        _check_tags(name, tags)
        if audit is not None:
            self._store_audit(name, version, audit, None, replace_attestation=False)
        with self._errors(f"tagging {name} version {version}"):
            for key, value in {**tags, STATUS_TAG: status}.items():
                self._client.set_model_version_tag(name, str(version), key, value)
        self._move_aliases(name, aliases, version)
        return self.get(name, str(version))

    def _move_aliases(self, name: str, aliases: tuple[str, ...], version: int) -> None:
        with self._errors(f"pointing aliases {list(aliases)} of {name!r} at version {version}"):
            for alias in aliases:
                self._client.set_registered_model_alias(name, alias, str(version))

    def _store_audit(self, name: str, version: int, record: dict[str, Any], attestation: Optional[dict[str, Any]], *, replace_attestation: bool) -> None:
        """Write the audit record (and the attestation) into the version's run, then tag the version with the digest."""
        found = self._resolve(name, str(version))
        run_id = found.run_id
        if not run_id:
            raise RegistryError(f"{name} version {version} has no MLflow run to hold its audit record; register the model through guardrail")
        with self._errors(f"storing the audit record of {name} version {version}", "check the server's artifact store, then re-run"):
            if self._journal is not None:
                self._journal.remember_artifact(run_id, AUDIT_ARTIFACT, functools.partial(self._read_artifact, run_id, AUDIT_ARTIFACT))
                if replace_attestation:
                    self._journal.remember_artifact(run_id, ATTESTATION_ARTIFACT, functools.partial(self._read_artifact, run_id, ATTESTATION_ARTIFACT))
            self._write_artifact(run_id, AUDIT_ARTIFACT, _json_bytes(record))
            if replace_attestation:
                if attestation is not None:
                    self._write_artifact(run_id, ATTESTATION_ARTIFACT, _json_bytes(attestation))
                elif self._read_artifact(run_id, ATTESTATION_ARTIFACT) is not None:
                    self._delete_artifact(run_id, ATTESTATION_ARTIFACT)
            self._client.set_model_version_tag(name, str(version), AUDIT_TAG, record["digest"])

    def attach_audit(self, name: str, version: int, record: dict[str, Any], attestation: Optional[dict[str, Any]] = None) -> None:
        """Store a finalized audit record with a version and tag the version with its digest.

        Args:
            name: Registered model name.
            version: Version number the record describes.
            record: The finalized audit record, stored as the run artifact ``audit/audit.json``.
            attestation: A signed DSSE envelope over the record, stored as
                ``audit/attestation.json``. None removes an earlier attestation,
                which signed a record that is now replaced.
        """
        validate_name(name)
        self._store_audit(name, version, record, attestation, replace_attestation=True)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point an alias at an existing version."""
        validate_name(alias, "alias")
        self._resolve(name, str(version))
        self._move_aliases(name, (alias,), version)

    def set_status(self, name: str, version: int, status: str, aliases: tuple[str, ...] = (), tags: Optional[dict[str, str]] = None) -> ModelVersion:
        """Change a version's status and move aliases to it."""
        self._resolve(name, str(version))
        return self._update(name, version, status=status, tags=tags or {}, audit=None, aliases=aliases)

    # Transactions

    @contextmanager
    def transaction(self, name: str) -> Iterator[None]:
        """Group writes to one model so that they all stay or all are undone.

        On any exception, versions created inside the block are deleted with
        their runs, and the tags and aliases of the older versions and their
        audit artifacts are restored. Version numbers are not reused: MLflow
        numbers the next version after the deleted ones.

        NOTE: MLflow has no lock, so a second writer to the same model during
        the block is not detected. Its alias moves may be undone by a rollback.
        """
        validate_name(name)
        if self._journal is not None:
            yield
            return
        model_existed = self._model_exists(name)
        versions = self._search(name) if model_existed else {}
        self._journal = _Journal(
            name=name,
            model_existed=model_existed,
            version_tags={number: dict(version.tags) for number, version in versions.items()},
            aliases=self._aliases(name),
        )
        try:
            yield
        except BaseException:
            journal, self._journal = self._journal, None
            logger.warning("Rolling back MLflow registry writes to %s", name)
            try:
                self._rollback(journal)
            except RegistryError as rollback_error:
                # Keep the error that caused the rollback as the one raised.
                logger.error("Rollback of %s in MLflow registry %s failed (%s); undo its changes in the MLflow UI", name, self.location, rollback_error)
            raise
        finally:
            self._journal = None

    def _rollback(self, journal: _Journal) -> None:
        """Undo a transaction's writes, step by step; report every step that failed and go on."""
        name = journal.name
        problems: list[str] = []

        def attempt(what: str, action: Callable[[], Any]) -> None:
            try:
                action()
            except (MlflowException, requests.RequestException, OSError, RegistryError) as exc:
                problems.append(f"{what}: {self._clean(exc)}")

        current = self._search(name) if self._model_exists(name) else {}
        for number in sorted(set(current) - set(journal.version_tags)):
            attempt(f"delete version {number}", functools.partial(self._client.delete_model_version, name, str(number)))
        for run_id in journal.runs:
            attempt(f"delete run {run_id}", functools.partial(self._client.delete_run, run_id))
        for run_id, path, before in reversed(journal.artifacts):
            if before is None:
                attempt(f"delete {path} of run {run_id}", functools.partial(self._delete_artifact, run_id, path))
            else:
                attempt(f"restore {path} of run {run_id}", functools.partial(self._write_artifact, run_id, path, before))
        for number, before in journal.version_tags.items():
            now = dict(current[number].tags) if number in current else {}
            for key in set(now) - set(before):
                attempt(f"delete tag {key} of version {number}", functools.partial(self._client.delete_model_version_tag, name, str(number), key))
            for key, value in before.items():
                if now.get(key) != value:
                    attempt(f"restore tag {key} of version {number}", functools.partial(self._client.set_model_version_tag, name, str(number), key, value))
        aliases_now = self._aliases(name)
        for alias, number in aliases_now.items():
            if alias not in journal.aliases:
                attempt(f"delete alias {alias}", functools.partial(self._client.delete_registered_model_alias, name, alias))
        for alias, number in journal.aliases.items():
            if aliases_now.get(alias) != number:
                attempt(f"restore alias {alias}", functools.partial(self._client.set_registered_model_alias, name, alias, str(number)))
        if not journal.model_existed:
            attempt(f"delete registered model {name}", functools.partial(self._client.delete_registered_model, name))

        if problems:
            logger.error(
                "Rollback of %s in MLflow registry %s left changes behind (%s); undo them in the MLflow UI",
                name,
                self.location,
                "; ".join(problems),
            )


def _check_tags(name: str, tags: dict[str, str]) -> None:
    """Reject tags that MLflow stores badly or not at all, before anything is written."""
    for key, value in tags.items():
        if not isinstance(key, str) or not key or len(key) > TAG_KEY_LIMIT:
            raise RegistryError(f"invalid tag key {key!r} for {name}; use a non-empty string of at most {TAG_KEY_LIMIT} characters")
        if not isinstance(value, str):
            raise RegistryError(f"tag {key!r} of {name} must be a string, got {type(value).__name__}")
        size = len(value.encode("utf-8"))
        if size > TAG_VALUE_LIMIT_BYTES:
            raise RegistryError(
                f"tag {key!r} of {name} is {size} bytes, over the {TAG_VALUE_LIMIT_BYTES}-byte limit for MLflow tag values; "
                "put large values in the audit record, which is stored as an artifact"
            )


def _json_bytes(document: Any) -> bytes:
    return json.dumps(document, indent=2, sort_keys=True).encode("utf-8")
