"""Model registry in a Hugging Face Hub model repository.

One repository contains one model name. Each registered version is one commit
on the registry's branch, tagged ``v<N>``, with the version's model files at
the repository root, so ``from_pretrained(repo_id, revision="v3")`` loads
version 3. Every commit also writes:

* ``guardrail/registry.json``: versions, file digests, status, tags and
  aliases, the registry's source of truth;
* ``README.md``: a model card whose YAML metadata carries ``base_model``,
  ``base_model_relation``, the gate's status and decision, and the audit
  digest of the version at the root. A model folder's own README.md is kept
  as ``guardrail/model-readme.md`` and restored on download;
* ``guardrail/audits/<N>/audit.json`` and ``attestation.json``: the audit
  record and its signed attestation of version N.

Writes are staged in memory and pushed when the outermost
:meth:`HubRegistry.transaction` block ends; every write outside a
transaction is its own. A push sends one commit per new version (one commit
when no version is new), each with ``parent_commit`` set to the head read
before, so a concurrent change to the branch makes the push fail cleanly
instead of being overwritten. A block that raises pushes nothing. If a
push fails after some of its commits landed, a revert commit restores
every file it changed from the starting revision and its tags are deleted.

The token is read from the environment variable the policy names
(``registry.token_env``, default ``HF_TOKEN``). It is passed to
huggingface_hub and never logged or put in a message.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import logging
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCardData, constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.repocard import metadata_load

from guardrail.errors import RegistryError
from guardrail.hashing import combine_digests, digest_tree
from guardrail.registry import ModelVersion, validate_name
from guardrail.registry_cache import cached_model

try:  # huggingface_hub 1.x and 2.x raise transport errors of httpx's family
    from huggingface_hub.errors import HTTPError as _TransportError
except ImportError:  # huggingface_hub 0.x uses requests
    from requests import RequestException as _TransportError

logger = logging.getLogger(__name__)

SCHEMA = "guardrail.hub-registry/v1"
REGISTRY_FILE = "guardrail/registry.json"
AUDIT_FOLDER = "guardrail/audits"
MODEL_README = "guardrail/model-readme.md"
CARD = "README.md"
#: Top-level names in a model folder that would collide with the registry's own files.
_RESERVED = ("guardrail",)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_VERSION_TAG = re.compile(r"^v(\d+)$")
_MESSAGE_LIMIT = 300


@dataclass
class _State:
    """The content of ``guardrail/registry.json``."""

    model: Optional[str] = None
    versions: dict[int, dict[str, Any]] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)
    root_version: Optional[int] = None

    def to_bytes(self) -> bytes:
        document = {
            "schema": SCHEMA,
            "model": self.model,
            "root_version": self.root_version,
            "aliases": dict(sorted(self.aliases.items())),
            "versions": {str(number): entry for number, entry in sorted(self.versions.items())},
        }
        return json.dumps(document, indent=2, sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> "_State":
        try:
            document = json.loads(data.decode("utf-8"))
            if document.get("schema") != SCHEMA:
                raise ValueError(f"schema is {document.get('schema')!r}, expected {SCHEMA!r}")
            return cls(
                model=document["model"],
                versions={int(number): entry for number, entry in document["versions"].items()},
                aliases={alias: int(number) for alias, number in document["aliases"].items()},
                root_version=document.get("root_version"),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RegistryError(f"{source} is not a valid guardrail registry file: {exc}; restore it from the repo's history") from exc


@dataclass
class _Pending:
    """Writes staged by a transaction, pushed when it ends."""

    name: str
    base_head: Optional[str]
    base: _State
    state: _State
    tags: set[str]
    #: New versions in the order they were registered: (number, model folder).
    new_versions: list[tuple[int, Path]] = field(default_factory=list)
    #: Version number to {file name: bytes, or None to delete the file} under its audit folder.
    audits: dict[int, dict[str, Optional[bytes]]] = field(default_factory=dict)

    def changed(self) -> bool:
        return bool(self.new_versions or self.audits) or self.state.to_bytes() != self.base.to_bytes()


def _repo_path(relative: str) -> str:
    """Return where a model file lives in the repo; the model's own README.md moves aside for the card."""
    return MODEL_README if relative == CARD else relative


class HubRegistry:
    """A registry in one Hugging Face Hub model repo; see the module docstring for the layout.

    Args:
        repo_id: Model repository, ``owner/name``; created on the first write.
        branch: Branch the versions are committed to; created from ``main`` when missing.
        endpoint: Hub URL; None uses ``HF_ENDPOINT`` or https://huggingface.co.
        token: Hub token; None lets huggingface_hub find one (its login cache).
        token_env: Name of the environment variable the token came from, for messages.
        cache_dir: Folder that downloaded versions are cached in.

    Examples:
        >>> registry = HubRegistry("my-org/chat-model", token=os.environ.get("HF_TOKEN"))
        >>> version = registry.register("chat-model", Path("out/model"), status="candidate", tags={}, aliases=("candidate",))
        >>> version.tags, registry.get("chat-model", "v1".lstrip("v")).aliases
        ({}, ['candidate'])
    """

    def __init__(
        self,
        repo_id: str,
        *,
        branch: str = "main",
        endpoint: Optional[str] = None,
        token: Optional[str] = None,
        token_env: str = "HF_TOKEN",
        cache_dir: str | Path = ".guardrail/registry-cache",
    ) -> None:
        if not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
            raise RegistryError(f"invalid Hub repo id {repo_id!r}; use owner/name with letters, digits, '.', '_' and '-'")
        self.repo_id = repo_id
        self.branch = branch
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.token_env = token_env
        self.cache_dir = Path(cache_dir)
        self._token = token
        self._api = HfApi(endpoint=self.endpoint, token=token)
        self._pending: Optional[_Pending] = None

    @property
    def location(self) -> str:
        """The repo URL and branch, for messages and audit records."""
        return f"{self.endpoint}/{self.repo_id}@{self.branch}"

    # Errors

    def _clean(self, exc: BaseException) -> str:
        message = " ".join(str(exc).split())
        if self._token:
            message = message.replace(self._token, "***")
        return message if len(message) <= _MESSAGE_LIMIT else message[:_MESSAGE_LIMIT] + "..."

    def _registry_error(self, action: str, exc: BaseException) -> RegistryError:
        """Build the RegistryError for a failed Hub call, with the fix for its cause."""
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, OfflineModeIsEnabled):
            fix = "HF_HUB_OFFLINE is set; unset it to use a Hub registry"
        elif status == 412:
            return RegistryError(
                f"Hub registry {self.location}: {action} failed because the branch changed since guardrail read it "
                "(another writer committed); nothing of this update was kept, so re-run it"
            )
        elif status in (401, 403):
            fix = f"the Hub rejected the token; check that ${self.token_env} holds a token with write access to {self.repo_id}"
        else:
            fix = f"check that {self.endpoint} is reachable and that ${self.token_env} allows this"
        return RegistryError(f"Hub registry {self.location}: {action} failed: {self._clean(exc)}; {fix}")

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except RegistryError:
            raise
        except (HfHubHTTPError, _TransportError, OSError, ValueError) as exc:
            raise self._registry_error(action, exc) from exc

    # Reads

    def _download(self, path: str, revision: str, folder: Path) -> Optional[Path]:
        """Download one file of a revision into ``folder``; None when the revision has no such file."""
        try:
            return Path(self._api.hf_hub_download(self.repo_id, path, revision=revision, local_dir=folder))
        except EntryNotFoundError:
            return None

    def _read_remote(self) -> tuple[Optional[str], _State]:
        """Return the branch head and the registry state there; (None, empty) when the repo or branch is missing."""
        with self._errors(f"reading {REGISTRY_FILE}"):
            try:
                head = self._api.model_info(self.repo_id, revision=self.branch).sha
            except (RepositoryNotFoundError, RevisionNotFoundError):
                return None, _State()
            with tempfile.TemporaryDirectory(prefix="guardrail-hub-") as folder:
                local = self._download(REGISTRY_FILE, head, Path(folder))
                if local is None:
                    return head, _State()
                return head, _State.from_bytes(local.read_bytes(), f"{self.location}:{REGISTRY_FILE}")

    def _state(self) -> _State:
        return self._pending.state if self._pending is not None else self._read_remote()[1]

    def _entry(self, state: _State, name: str, version_or_alias: str) -> tuple[int, dict[str, Any]]:
        validate_name(name)
        if state.model != name or not state.versions:
            raise RegistryError(
                f"model {name!r} is not in Hub registry {self.location} (the repo may not exist, or the token in "
                f"${self.token_env} may not read it); `guardrail registry list` shows what is"
            )
        if version_or_alias == "latest":
            number = max(state.versions)
        elif version_or_alias.isdigit():
            number = int(version_or_alias)
            if number not in state.versions:
                raise RegistryError(f"{name} has no version {version_or_alias}; versions: {sorted(state.versions)}")
        elif version_or_alias in state.aliases:
            number = state.aliases[version_or_alias]
        else:
            raise RegistryError(f"{name} has no alias {version_or_alias!r}; aliases: {sorted(state.aliases)}")
        return number, state.versions[number]

    @staticmethod
    def _to_version(state: _State, number: int) -> ModelVersion:
        entry = state.versions[number]
        fields = {key: entry[key] for key in ModelVersion.__dataclass_fields__ if key in entry and key != "aliases"}
        return ModelVersion(**fields, aliases=sorted(alias for alias, target in state.aliases.items() if target == number))

    def get(self, name: str, version_or_alias: str = "latest") -> ModelVersion:
        """Return a version by number, alias, or ``latest``.

        Raises:
            RegistryError: The model, version or alias does not exist, or the Hub failed.
        """
        state = self._state()
        number, _ = self._entry(state, name, version_or_alias)
        return self._to_version(state, number)

    def list_versions(self, name: Optional[str] = None) -> list[ModelVersion]:
        """List the versions of the repo's model; empty when ``name`` is another model."""
        state = self._state()
        if state.model is None or (name is not None and validate_name(name) != state.model):
            return []
        return [self._to_version(state, number) for number in sorted(state.versions)]

    def model_path(self, name: str, version_or_alias: str = "latest", *, refresh: bool = False) -> Path:
        """Download a version's model files from its tag into the cache, verify them and return the folder.

        A verified copy already in the cache is reused unless ``refresh`` is set.
        """
        number, entry = self._entry(self._state(), name, version_or_alias)
        if self._pending is not None and any(number == new for new, _ in self._pending.new_versions):
            raise RegistryError(f"{name} version {number} is staged in an open transaction and not pushed yet; read it after the transaction ends")
        revision = entry["revision"]
        label = f"{name} version {number}"
        files: dict[str, str] = entry["files"]

        def download(staging: Path) -> Path:
            raw, model = staging / "raw", staging / "model"
            with self._errors(f"downloading {label} from revision {revision}"):
                for relative in sorted(files):
                    local = self._download(_repo_path(relative), revision, raw)
                    if local is None:
                        raise RegistryError(f"{label} lists {relative}, but revision {revision} of {self.repo_id} has no such file; the tag was moved or the files removed")
                    target = model / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(local), target)
            return model

        server_key = hashlib.sha256(self.location.encode("utf-8")).hexdigest()[:16]
        folder = self.cache_dir / "hub" / server_key / name / str(number)
        return cached_model(folder, files, entry["model_digest"], download, label=label, refresh=refresh)

    def _read_audit_file(self, name: str, version_or_alias: str, file_name: str) -> Optional[dict[str, Any]]:
        state = self._state()
        number, _ = self._entry(state, name, version_or_alias)
        if self._pending is not None and file_name in self._pending.audits.get(number, {}):
            data = self._pending.audits[number][file_name]
            return None if data is None else json.loads(data.decode("utf-8"))
        with self._errors(f"reading the {file_name} of {name} version {number}"), tempfile.TemporaryDirectory(prefix="guardrail-hub-") as folder:
            local = self._download(f"{AUDIT_FOLDER}/{number}/{file_name}", self.branch, Path(folder))
            return None if local is None else json.loads(local.read_text(encoding="utf-8"))

    def audit_record(self, name: str, version_or_alias: str = "latest") -> Optional[dict[str, Any]]:
        """Return the audit record stored with a version, if any."""
        return self._read_audit_file(name, version_or_alias, "audit.json")

    def attestation(self, name: str, version_or_alias: str = "latest") -> Optional[dict[str, Any]]:
        """Return the signed attestation (DSSE envelope) stored with a version, if any."""
        return self._read_audit_file(name, version_or_alias, "attestation.json")

    # Staged writes

    @contextmanager
    def _staged(self, name: str) -> Iterator[_Pending]:
        """Yield the open transaction's staging area, opening a transaction for this one write if none is open."""
        if self._pending is not None:
            yield self._pending
            return
        with self.transaction(name):
            assert self._pending is not None
            yield self._pending

    def _claim(self, state: _State, name: str) -> None:
        if state.model is None:
            state.model = name
        elif state.model != name:
            raise RegistryError(
                f"Hub repo {self.repo_id} contains model {state.model!r}, and a Hub registry repo contains one model; "
                f"set registry.model_name to {state.model!r} or registry.repo_id to another repo for {name!r}"
            )

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
        """Stage a model folder as a new version, then point the given aliases at it.

        A model whose digest is already registered is not uploaded again: its
        existing version gets the new status, tags and aliases. Outside a
        transaction the version is pushed before this returns.

        Raises:
            RegistryError: The name or an alias is invalid, the folder is missing or
                contains a top-level ``guardrail`` entry, or the push failed.
        """
        validate_name(name)
        for alias in aliases:
            validate_name(alias, "alias")
        model_folder = Path(model_folder)
        if not model_folder.is_dir():
            raise RegistryError(f"model folder {model_folder} not found; nothing was registered")
        for reserved in _RESERVED:
            if (model_folder / reserved).exists():
                raise RegistryError(f"model folder {model_folder} contains '{reserved}', which the Hub registry keeps for its own files; rename it")
        files = digest_tree(model_folder)
        model_digest = combine_digests(files.items())

        with self._staged(name) as pending:
            state = pending.state
            self._claim(state, name)
            existing = next((number for number, entry in state.versions.items() if entry["model_digest"] == model_digest), None)
            if existing is not None:
                logger.info("Model %s is already registered as %s version %d", model_digest[:12], name, existing)
                self._stage_update(pending, existing, status=status, tags=tags, audit=audit, aliases=aliases)
                number = existing
            else:
                number = max([*state.versions, *_tag_numbers(pending.tags), 0]) + 1
                state.versions[number] = {
                    "name": name,
                    "version": number,
                    "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "status": status,
                    "model_digest": model_digest,
                    "files": files,
                    "tags": dict(tags),
                    "audit_digest": None,
                    "source": str(model_folder),
                    "revision": f"v{number}",
                    "base_model": _base_model(model_folder, tags, state),
                }
                pending.new_versions.append((number, model_folder))
                self._stage_update(pending, number, status=status, tags={}, audit=audit, aliases=aliases)
                logger.info("Staged %s version %d (%s) with aliases %s for %s", name, number, status, list(aliases), self.location)
        return self.get(name, str(number)) if self._pending is not None else self._to_version(self._read_remote()[1], number)

    def _stage_update(self, pending: _Pending, number: int, *, status: str, tags: dict[str, str], audit: Optional[dict[str, Any]], aliases: tuple[str, ...]) -> None:
        entry = pending.state.versions[number]
        entry["status"] = status
        entry["tags"].update(tags)
        if audit is not None:
            self._stage_audit(pending, number, audit, None, replace_attestation=False)
        pending.state.aliases.update({alias: number for alias in aliases})

    @staticmethod
    def _stage_audit(pending: _Pending, number: int, record: dict[str, Any], attestation: Optional[dict[str, Any]], *, replace_attestation: bool) -> None:
        entry = pending.state.versions[number]
        entry["audit_digest"] = record["digest"]
        entry["tags"]["guardrail.audit_digest"] = record["digest"]
        staged = pending.audits.setdefault(number, {})
        staged["audit.json"] = _json_bytes(record)
        if replace_attestation:
            staged["attestation.json"] = None if attestation is None else _json_bytes(attestation)
            entry["attested"] = attestation is not None

    def attach_audit(self, name: str, version: int, record: dict[str, Any], attestation: Optional[dict[str, Any]] = None) -> None:
        """Store a finalized audit record with a version and tag the version with its digest.

        Args:
            name: Registered model name.
            version: Version number the record describes.
            record: The finalized audit record, committed as ``guardrail/audits/<N>/audit.json``.
            attestation: A signed DSSE envelope over the record, committed beside it as
                ``attestation.json``. None removes an earlier attestation, which
                signed a record that is now replaced.
        """
        with self._staged(name) as pending:
            self._entry(pending.state, name, str(version))
            self._stage_audit(pending, version, record, attestation, replace_attestation=True)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point an alias at an existing version."""
        validate_name(alias, "alias")
        with self._staged(name) as pending:
            self._entry(pending.state, name, str(version))
            pending.state.aliases[alias] = version

    def set_status(self, name: str, version: int, status: str, aliases: tuple[str, ...] = (), tags: Optional[dict[str, str]] = None) -> ModelVersion:
        """Change a version's status and move aliases to it."""
        for alias in aliases:
            validate_name(alias, "alias")
        with self._staged(name) as pending:
            self._entry(pending.state, name, str(version))
            self._stage_update(pending, version, status=status, tags=tags or {}, audit=None, aliases=aliases)
        return self.get(name, str(version))

    # Transactions and pushes

    @contextmanager
    def transaction(self, name: str) -> Iterator[None]:
        """Stage every write inside the block and push them when it ends.

        A block that raises pushes nothing, so the repo stays as it was. See the
        module docstring for what happens when the push itself fails.
        """
        validate_name(name)
        if self._pending is not None:
            yield
            return
        head, state = self._read_remote()
        tags: set[str] = set()
        if head is not None:
            with self._errors("listing tags"):
                tags = {ref.name for ref in self._api.list_repo_refs(self.repo_id).tags}
        self._pending = _Pending(name=name, base_head=head, base=state, state=copy.deepcopy(state), tags=tags)
        try:
            yield
            pending, self._pending = self._pending, None
            self._push(pending)
        except BaseException:
            if self._pending is not None:
                logger.warning("Discarding staged Hub registry writes to %s; nothing was pushed", name)
            raise
        finally:
            self._pending = None

    def _start_head(self, pending: _Pending) -> str:
        """Create the repo and branch when missing and return the head the first commit must build on."""
        with self._errors(f"creating repo {self.repo_id}"):
            self._api.create_repo(self.repo_id, exist_ok=True)
            if self.branch != "main":
                self._api.create_branch(self.repo_id, branch=self.branch, exist_ok=True)
        if pending.base_head is not None:
            return pending.base_head
        head, state = self._read_remote()
        if head is None or state.versions:
            raise RegistryError(
                f"Hub registry {self.location}: another writer registered a model while guardrail created the repo; "
                "nothing of this update was kept, so re-run it"
            )
        return head

    def _push(self, pending: _Pending) -> None:
        if not pending.changed():
            return
        start = self._start_head(pending)
        parent = start
        touched: set[str] = set()
        created_tags: list[str] = []
        written_audits: set[int] = set()
        root = pending.base.root_version
        steps = [number for number, _ in pending.new_versions] or [None]
        folders = dict(pending.new_versions)
        try:
            for step in steps:
                state = _state_until(pending, step)
                operations: list[Any] = []
                if step is not None:
                    operations += _swap_model_files(pending.state.versions.get(root) if root is not None else None, folders[step], pending.state.versions[step]["files"])
                    root = step
                state.root_version = root
                operations.append(CommitOperationAdd(REGISTRY_FILE, state.to_bytes()))
                if root is not None:
                    operations.append(CommitOperationAdd(CARD, _model_card(self.repo_id, state, root).encode("utf-8")))
                for number, staged in sorted(pending.audits.items()):
                    if number in state.versions and number not in written_audits:
                        operations += _audit_operations(number, staged, pending.base.versions)
                        written_audits.add(number)
                touched.update(operation.path_in_repo for operation in operations)
                message = f"Register {pending.name} version {step}" if step is not None else f"Update {pending.name} registry metadata"
                with self._errors(f"committing to {self.repo_id}"):
                    commit = self._api.create_commit(self.repo_id, operations, commit_message=message, revision=self.branch, parent_commit=parent)
                parent = commit.oid
                if step is not None:
                    with self._errors(f"tagging version {step}"):
                        self._api.create_tag(self.repo_id, tag=f"v{step}", revision=commit.oid)
                    created_tags.append(f"v{step}")
                logger.info("Pushed %s to %s (%s)", message.lower(), self.location, commit.oid[:12])
        except RegistryError as exc:
            if parent != start:
                self._revert(start, parent, touched, created_tags, exc)
            raise

    def _revert(self, start: str, head: str, touched: set[str], tags: list[str], cause: RegistryError) -> None:
        """Restore every touched file to its content at ``start`` in one commit and delete the new tags."""
        logger.warning("Reverting a partly pushed update of %s to %s", self.location, start[:12])
        try:
            with self._errors("reverting a partly pushed update"), tempfile.TemporaryDirectory(prefix="guardrail-hub-") as folder:
                present = {sibling.rfilename for sibling in self._api.model_info(self.repo_id, revision=head).siblings or []}
                operations: list[Any] = []
                for path in sorted(touched):
                    local = self._download(path, start, Path(folder))
                    if local is not None:
                        operations.append(CommitOperationAdd(path, str(local)))
                    elif path in present:
                        operations.append(CommitOperationDelete(path))
                self._api.create_commit(
                    self.repo_id, operations, commit_message="Revert a failed guardrail registry update", revision=self.branch, parent_commit=head
                )
                for tag in tags:
                    self._api.delete_tag(self.repo_id, tag=tag)
        except RegistryError as revert_error:
            logger.error(
                "Could not revert the partly pushed update of %s (%s); tags %s and the files %s may need a manual revert to %s",
                self.location,
                revert_error,
                tags,
                sorted(touched),
                start,
            )
            raise RegistryError(f"{cause}; the revert of the commits already pushed failed too: {revert_error}") from revert_error


def _tag_numbers(tags: set[str]) -> list[int]:
    return [int(match.group(1)) for tag in tags if (match := _VERSION_TAG.match(tag))]


def _state_until(pending: _Pending, step: Optional[int]) -> _State:
    """Return the registry state as of the commit of new version ``step``: later new versions are left out.

    Aliases that point at a left-out version keep their value from before the push.
    """
    state = copy.deepcopy(pending.state)
    if step is None:
        return state
    later = {number for number, _ in pending.new_versions if number > step}
    state.versions = {number: entry for number, entry in state.versions.items() if number not in later}
    aliases = {alias: number for alias, number in pending.base.aliases.items() if number in state.versions}
    aliases.update({alias: number for alias, number in pending.state.aliases.items() if number in state.versions})
    state.aliases = aliases
    return state


def _swap_model_files(previous: Optional[dict[str, Any]], folder: Path, files: dict[str, str]) -> list[Any]:
    """Return the operations that replace the previous root version's files with those of ``folder``."""
    new_paths = {_repo_path(relative): relative for relative in files}
    operations: list[Any] = []
    if previous is not None:
        for relative in sorted(previous["files"]):
            if _repo_path(relative) not in new_paths:
                operations.append(CommitOperationDelete(_repo_path(relative)))
    for path, relative in sorted(new_paths.items()):
        operations.append(CommitOperationAdd(path, str(folder / relative)))
    return operations


def _audit_operations(number: int, staged: dict[str, Optional[bytes]], base_versions: dict[int, dict[str, Any]]) -> list[Any]:
    """Return the operations that write (or, for None, delete) the staged audit files of one version."""
    operations: list[Any] = []
    for file_name, data in sorted(staged.items()):
        path = f"{AUDIT_FOLDER}/{number}/{file_name}"
        if data is not None:
            operations.append(CommitOperationAdd(path, data))
        elif base_versions.get(number, {}).get("attested"):
            # A delete of an absent file fails the whole commit, so delete only
            # an attestation that the branch had before this push.
            operations.append(CommitOperationDelete(path))
    return operations


def _base_model(folder: Path, tags: dict[str, str], state: _State) -> Optional[str]:
    """Find the model's base: a ``base_model`` tag, the folder's own model card, or the parent version's base."""
    if tags.get("base_model"):
        return tags["base_model"]
    readme = folder / CARD
    if readme.is_file():
        try:
            base = (metadata_load(readme) or {}).get("base_model")
        except (ValueError, OSError) as exc:
            logger.warning("Cannot read the metadata of %s: %s", readme, exc)
            base = None
        if isinstance(base, str):
            return base
    parent = tags.get("guardrail.parent_version")
    if parent and parent.isdigit() and int(parent) in state.versions:
        return state.versions[int(parent)].get("base_model")
    return None


def _model_card(repo_id: str, state: _State, number: int) -> str:
    """Return the README.md model card of the root version."""
    entry = state.versions[number]
    aliases = sorted(alias for alias, target in state.aliases.items() if target == number)
    guardrail = {
        "version": number,
        "status": entry["status"],
        "decision": entry["tags"].get("guardrail.decision"),
        "audit_digest": entry.get("audit_digest"),
        "model_digest": entry["model_digest"],
        "aliases": aliases,
    }
    metadata: dict[str, Any] = {"library_name": "transformers", "tags": ["guardrail", f"guardrail-{entry['status']}"], "guardrail": guardrail}
    if entry.get("base_model"):
        metadata["base_model"] = entry["base_model"]
        metadata["base_model_relation"] = "finetune"
    front_matter = ModelCardData(**metadata).to_yaml()
    lines = [
        "---",
        front_matter,
        "---",
        "",
        f"# {entry['name']} version {number}",
        "",
        f"Registered by guardrail with status **{entry['status']}**"
        + (f" after a gate decision of **{guardrail['decision']}**." if guardrail["decision"] else "."),
        "",
        f"- model digest: `{entry['model_digest']}`",
        f"- audit record digest: `{entry.get('audit_digest') or 'none'}` (record in `{AUDIT_FOLDER}/{number}/audit.json`)",
        f"- aliases: {', '.join(aliases) or 'none'}",
        "",
        f"Load this version with `from_pretrained(\"{repo_id}\", revision=\"v{number}\")`.",
        f"`{REGISTRY_FILE}` lists every version with its status and aliases.",
        "",
    ]
    return "\n".join(lines)


def _json_bytes(document: Any) -> bytes:
    return json.dumps(document, indent=2, sort_keys=True).encode("utf-8")

