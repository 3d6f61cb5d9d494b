"""A local stand-in for the Hugging Face Hub HTTP API, used by the Hub registry tests.

It is not the Hub. It runs ``http.server`` in a thread on 127.0.0.1 and
implements only the endpoints that huggingface_hub 2.x calls for the
registry's operations, with the behaviour the registry relies on:

* ``POST /api/repos/create``: creates a model repo with an initial commit
  holding ``.gitattributes``; 409 when it exists;
* ``POST /api/validate-yaml``: checks that a README's front matter is YAML;
* ``GET /api/models/<repo>[/revision/<rev>]``: the repo id, head sha and files;
* ``GET /api/models/<repo>/refs``, ``POST .../branch/<name>``,
  ``POST .../tag/<rev>`` and ``DELETE .../tag/<name>``: branches and tags;
* ``GET /api/models/<repo>/tree/<rev>``: the file list with git blob ids;
* ``POST /api/models/<repo>/preupload/<rev>``: always returns upload mode
  ``regular``, so file contents travel base64-encoded inside the commit (no
  LFS, no Xet);
* ``POST /api/models/<repo>/commit/<rev>``: applies an NDJSON commit and
  returns 412 when its ``parentCommit`` is not the branch head;
* ``HEAD``/``GET /<repo>/resolve/<rev>/<path>``: file metadata and content.

Errors carry the ``X-Error-Code`` header that huggingface_hub maps to its
exception types. With ``token`` set, every request must send it as a bearer
token. :meth:`HubStandIn.fail_next` makes the next matching request fail, so
tests can cut a push short.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_id(content: bytes) -> str:
    """Return the git blob id of a file's content, as the Hub reports it for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    sha: str
    parent: Optional[str]
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Optional[Commit]:
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and revision in self.commits:
            sha = revision
        return self.commits.get(sha) if sha else None


class HubError(Exception):
    """An error response: status, message and the optional X-Error-Code."""

    def __init__(self, status: int, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?P<rest>/.*)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")


class HubStandIn:
    """The stand-in server; use it as a context manager or call :meth:`start` and :meth:`stop`.

    Args:
        token: Bearer token every request must carry; None accepts any request.
    """

    def __init__(self, token: Optional[str] = None) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        #: Pending injected failures: [method, path fragment, status, matching requests still to let through].
        self._failures: list[list[Any]] = []
        self._counter = 0
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        assert self._server is not None, "the stand-in is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubStandIn":
        standin = self

        class Handler(_Handler):
            server_state = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "HubStandIn":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def fail_next(self, method: str, path_fragment: str, status: int = 500, *, after: int = 0) -> None:
        """Make a ``method`` request whose path contains ``path_fragment`` fail with ``status``.

        The first ``after`` matching requests are served normally; the one after them fails.
        """
        with self._lock:
            self._failures.append([method, path_fragment, status, after])

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Return the files of a revision, for assertions."""
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None, f"{repo_id} has no revision {revision}"
        return dict(commit.files)

    # Request handling, called by the handler under the lock.

    def _new_commit(self, repo: Repo, parent: Optional[str], message: str, files: dict[str, bytes]) -> Commit:
        self._counter += 1
        sha = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{message}\n{self._counter}".encode("utf-8")).hexdigest()
        commit = Commit(sha, parent, message, files)
        repo.commits[sha] = commit
        return commit

    def _take_failure(self, method: str, path: str) -> Optional[int]:
        for index, failure in enumerate(self._failures):
            fail_method, fragment, status, remaining = failure
            if fail_method == method and fragment in path:
                if remaining > 0:
                    failure[3] = remaining - 1
                    return None
                del self._failures[index]
                return status
        return None

    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Handle one request and return its status, headers and body."""
        parts = urlsplit(raw_path)
        path, query = parts.path, parse_qs(parts.query)
        with self._lock:
            self.requests.append((method, path))
            status = self._take_failure(method, path)
            if status is not None:
                return _json_response(status, {"error": f"injected failure {status}"})
            if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
                error = {"X-Error-Message": "Invalid credentials in Authorization header"}
                return _json_response(401, {"error": "Invalid credentials in Authorization header"}, error)
            try:
                return self._route(method, path, query, body)
            except HubError as exc:
                extra = {"X-Error-Code": exc.code} if exc.code else {}
                return _json_response(exc.status, {"error": exc.message}, extra)

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> tuple[int, dict[str, str], bytes]:
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        match = _RESOLVE.match(path)
        if match and method in ("GET", "HEAD"):
            return self._resolve_file(method, match["repo"], unquote(match["revision"]), unquote(match["path"]))
        match = _API.match(path)
        if match is None:
            raise HubError(404, f"no stand-in route for {method} {path}")
        repo = self._repo(match["repo"])
        rest = match["rest"] or ""
        segments = [unquote(segment) for segment in rest.split("/")[1:]]
        if method == "GET" and not segments:
            return self._model_info(repo, "main")
        if method == "GET" and segments[:1] == ["revision"] and len(segments) == 2:
            return self._model_info(repo, segments[1])
        if method == "GET" and segments == ["refs"]:
            return self._refs(repo)
        if method == "GET" and segments[:1] == ["tree"] and len(segments) >= 2:
            return self._tree(repo, segments[1])
        if method == "POST" and segments[:1] == ["branch"] and len(segments) == 2:
            return self._create_branch(repo, segments[1], json.loads(body or b"{}"))
        if method == "POST" and segments[:1] == ["tag"] and len(segments) == 2:
            return self._create_tag(repo, segments[1], json.loads(body))
        if method == "DELETE" and segments[:1] == ["tag"] and len(segments) == 2:
            return self._delete_tag(repo, segments[1])
        if method == "POST" and segments[:1] == ["preupload"] and len(segments) == 2:
            return self._preupload(repo, segments[1], json.loads(body))
        if method == "POST" and segments[:1] == ["commit"] and len(segments) == 2:
            return self._commit(repo, segments[1], body)
        raise HubError(404, f"no stand-in route for {method} {path}")

    def _create_repo(self, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        if payload.get("type", "model") != "model":
            raise HubError(400, "the stand-in only serves model repos")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.repos:
            return _json_response(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        repo = Repo(repo_id)
        commit = self._new_commit(repo, None, "initial commit", {".gitattributes": GITATTRIBUTES})
        repo.branches["main"] = commit.sha
        self.repos[repo_id] = repo
        return _json_response(200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        content = payload.get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        if match is None:
            return _json_response(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as exc:
            return _json_response(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
        if not isinstance(metadata, dict):
            return _json_response(400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
        relation = metadata.get("base_model_relation")
        if relation is not None and relation not in ("adapter", "merge", "quantized", "finetune"):
            return _json_response(400, {"errors": [{"message": f"invalid base_model_relation {relation!r}"}]})
        return _json_response(200, {"errors": [], "warnings": []})

    def _model_info(self, repo: Repo, revision: str) -> tuple[int, dict[str, str], bytes]:
        commit = self._revision(repo, revision)
        siblings = [{"rfilename": path, "size": len(content), "blobId": git_blob_id(content)} for path, content in sorted(commit.files.items())]
        now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        return _json_response(200, {"id": repo.repo_id, "sha": commit.sha, "siblings": siblings, "private": False, "lastModified": now})

    def _refs(self, repo: Repo) -> tuple[int, dict[str, str], bytes]:
        def refs(kind: str, mapping: dict[str, str]) -> list[dict[str, str]]:
            return [{"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha} for name, sha in sorted(mapping.items())]

        return _json_response(200, {"branches": refs("heads", repo.branches), "converts": [], "tags": refs("tags", repo.tags)})

    def _tree(self, repo: Repo, revision: str) -> tuple[int, dict[str, str], bytes]:
        commit = self._revision(repo, revision)
        entries = [{"type": "file", "path": path, "size": len(content), "oid": git_blob_id(content)} for path, content in sorted(commit.files.items())]
        return _json_response(200, entries)

    def _create_branch(self, repo: Repo, branch: str, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._revision(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.sha
        return _json_response(200, {})

    def _create_tag(self, repo: Repo, revision: str, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        tag = payload["tag"]
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = self._revision(repo, revision).sha
        return _json_response(200, {})

    def _delete_tag(self, repo: Repo, tag: str) -> tuple[int, dict[str, str], bytes]:
        if repo.tags.pop(tag, None) is None:
            raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
        return _json_response(200, {})

    def _preupload(self, repo: Repo, revision: str, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        commit = self._revision(repo, revision)
        answers = []
        for item in payload["files"]:
            existing = commit.files.get(item["path"])
            answer = {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False}
            if existing is not None:
                answer["oid"] = git_blob_id(existing)
            answers.append(answer)
        return _json_response(200, {"files": answers, "commitOid": commit.sha})

    def _commit(self, repo: Repo, branch: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        head = repo.branches[branch]
        parent = header.get("parentCommit")
        if parent is not None and not head.startswith(parent):
            raise HubError(412, f"A commit has happened since. Please refresh and try again. (parent {parent} is not the head {head} of {branch})")
        files = dict(repo.commits[head].files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: content for path, content in files.items() if not path.startswith(prefix)}
            else:
                raise HubError(400, f"the stand-in does not support {key!r} operations; its preupload returns 'regular'")
        commit = self._new_commit(repo, head, header.get("summary", ""), files)
        repo.branches[branch] = commit.sha
        return _json_response(200, {"commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.sha}", "commitOid": commit.sha, "pullRequestUrl": None})

    def _resolve_file(self, method: str, repo_id: str, revision: str, path: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(repo_id)
        commit = self._revision(repo, revision)
        content = commit.files.get(path)
        if content is None:
            error = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit.sha}
            return _json_response(404, {"error": f"Entry not found: {path}"}, error)
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{git_blob_id(content)}"',
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(content)),
        }
        return 200, headers, b"" if method == "HEAD" else content


def _json_response(status: int, document: Any, extra_headers: Optional[dict[str, str]] = None) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps(document).encode("utf-8")
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(extra_headers or {})}
    return status, headers, body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: HubStandIn

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without TCP_NODELAY the
        # client's delayed ACK stalls every response by tens of milliseconds.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {key.lower(): value for key, value in self.headers.items()}
        status, response_headers, response_body = self.server_state.handle(method, self.path, headers, body)
        self.send_response(status)
        for key, value in response_headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(response_body)

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        self._serve("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature fixed by the base class
        """Keep the test output quiet; :attr:`HubStandIn.requests` records every request."""
