"""Tests for the MLflow registry against a real ``mlflow server`` on 127.0.0.1.

The server runs once per test session, with a SQLite backend store and a
proxied artifact store in a temporary folder. Each test uses its own model
name, so tests share the server without seeing each other's versions.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from typer.testing import CliRunner  # noqa: E402
from test_gate import patchable_policy, tiny_policy  # noqa: E402
from test_registry import make_model  # noqa: E402

from guardrail import audit  # noqa: E402
from guardrail.cli import app  # noqa: E402
from guardrail.errors import PolicyError, RegistryError  # noqa: E402
from guardrail.gate import APPROVED, PATCHED, QUARANTINED, run_gate  # noqa: E402
from guardrail.policy import RegistrySettings, SafetyPolicy, parse_policy  # noqa: E402
from guardrail.registry import open_registry  # noqa: E402
from guardrail.registry_mlflow import AUDIT_TAG, DIGEST_TAG, STATUS_TAG, TAG_VALUE_LIMIT_BYTES, MlflowRegistry  # noqa: E402
from guardrail.signing import KeyPair, generate_key_pair  # noqa: E402

SERVER_START_TIMEOUT_S = 180
SERVER_STOP_TIMEOUT_S = 15
PASSWORD_SENTINEL = "pw-sentinel-5d1c9e"
TOKEN_SENTINEL = "tok-sentinel-a8f27b"

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def group_alive(group_id: int) -> bool:
    """Return True while any process of the group exists, zombies included."""
    try:
        os.killpg(group_id, 0)
    except ProcessLookupError:
        return False
    return True


def stop_server_group(process: subprocess.Popen) -> None:
    """Stop the server's whole process group: SIGTERM, a grace period, then SIGKILL.

    Signalling only the server process can leave its children (uvicorn, and
    the huey consumers of MLflow jobs) running or defunct after the session.
    """
    group_id = process.pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group_id, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + SERVER_STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            # Reap the leader, which is this process's child, so that it does not stay a zombie.
            # Its orphaned children are reaped by init.
            process.poll()
            if not group_alive(group_id):
                return
            time.sleep(0.1)
        logger.warning("mlflow server group %d still running %d s after %s", group_id, SERVER_STOP_TIMEOUT_S, sig.name)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> dict:
    """Start ``mlflow server`` once for the session and stop its whole process group at the end."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = folder / "server.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", str(folder / "artifacts"),
    ]  # fmt: skip
    # The registry uses no MLflow jobs. With jobs on, MLflow 3.17 starts seven busy huey
    # consumer processes. On a 2-core machine a gate test took 13.6 s with them and 3.0 s without.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        # A session of its own makes the server the leader of a new process group,
        # so stop_server_group can signal its children (uvicorn, and huey when jobs are on) too.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=folder, start_new_session=True)
    try:
        while not _healthy(url):
            if process.poll() is not None or time.perf_counter() - started > SERVER_START_TIMEOUT_S:
                tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
                pytest.fail(f"mlflow server did not become healthy at {url} (exit code {process.poll()}); log tail:\n{tail}")
            time.sleep(0.25)
        logger.info("mlflow server healthy at %s after %.1f s", url, time.perf_counter() - started)
        yield {"url": url, "artifacts": folder / "artifacts", "startup_seconds": time.perf_counter() - started}
    finally:
        stop_server_group(process)


@pytest.fixture
def name() -> str:
    return f"chat-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def registry(mlflow_server, tmp_path) -> MlflowRegistry:
    return MlflowRegistry(mlflow_server["url"], cache_dir=tmp_path / "cache")


def client(mlflow_server) -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_server["url"], registry_uri=mlflow_server["url"])


def runs_of(mlflow_server, name: str) -> list:
    """Return the active runs guardrail created for one model name."""
    experiment = client(mlflow_server).get_experiment_by_name("guardrail")
    return client(mlflow_server).search_runs([experiment.experiment_id], filter_string=f"tags.`guardrail.model` = '{name}'")


def test_register_get_by_version_and_alias(registry, mlflow_server, name, tmp_path):
    model = make_model(tmp_path / "m1", 1.0)

    version = registry.register(name, model, status="candidate", tags={"team": "a"}, aliases=("candidate",))

    assert version.version == 1
    assert version.status == "candidate"
    assert version.aliases == ["candidate"]
    assert version.tags == {"team": "a"}
    assert set(version.files) == {"model.safetensors", "config.json"}
    assert registry.get(name, "1").model_digest == version.model_digest
    assert registry.get(name, "candidate").version == 1
    assert registry.get(name).version == 1
    stored = client(mlflow_server).get_model_version(name, "1")
    assert stored.tags[STATUS_TAG] == "candidate"
    assert stored.tags[DIGEST_TAG] == version.model_digest
    assert stored.source.endswith("/model")
    assert client(mlflow_server).get_model_version_by_alias(name, "candidate").version == "1"


def test_model_path_downloads_verified_copy(registry, name, tmp_path):
    model = make_model(tmp_path / "m1", 1.0)
    registry.register(name, model, status="candidate", tags={}, aliases=("candidate",))

    path = registry.model_path(name, "candidate")

    assert sorted(entry.name for entry in path.iterdir()) == ["config.json", "model.safetensors"]
    assert (path / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert registry.model_path(name, "1") == path


def test_model_path_rejects_altered_artifact(registry, mlflow_server, name, tmp_path):
    registry.register(name, make_model(tmp_path / "m1", 1.0), status="candidate", tags={})
    run_id = client(mlflow_server).get_model_version(name, "1").run_id
    stored = next(mlflow_server["artifacts"].rglob(f"{run_id}/artifacts/model/model.safetensors"))
    stored.write_bytes(stored.read_bytes()[:-4] + b"XXXX")

    with pytest.raises(RegistryError, match=r"does not match the digests.*changed: \['model.safetensors'\]"):
        registry.model_path(name, "1")

    assert not list(registry.cache_dir.rglob("model.safetensors"))


def test_list_versions_with_status(registry, name, tmp_path):
    registry.register(name, make_model(tmp_path / "m1", 1.0), status="quarantined", tags={}, aliases=("quarantined",))
    registry.register(name, make_model(tmp_path / "m2", 2.0), status="approved", tags={}, aliases=("approved",))

    versions = registry.list_versions(name)

    assert [(entry.version, entry.status, entry.aliases) for entry in versions] == [(1, "quarantined", ["quarantined"]), (2, "approved", ["approved"])]
    assert {entry.name for entry in registry.list_versions()} >= {name}


def test_same_digest_not_uploaded_again(registry, mlflow_server, name, tmp_path):
    first = registry.register(name, make_model(tmp_path / "a", 1.0), status="candidate", tags={"run": "1"}, aliases=("candidate",))

    again = registry.register(name, make_model(tmp_path / "b", 1.0), status="approved", tags={"run": "2"}, aliases=("approved",))

    assert again.version == first.version == 1
    assert again.status == "approved"
    assert again.tags == {"run": "2"}
    assert again.aliases == ["approved", "candidate"]
    assert [entry.version for entry in registry.list_versions(name)] == [1]
    assert len(runs_of(mlflow_server, name)) == 1


def test_aliases_move(registry, name, tmp_path):
    registry.register(name, make_model(tmp_path / "m1", 1.0), status="approved", tags={}, aliases=("approved", "candidate"))
    registry.register(name, make_model(tmp_path / "m2", 2.0), status="candidate", tags={}, aliases=("candidate",))

    assert registry.get(name, "candidate").version == 2
    assert registry.get(name, "1").aliases == ["approved"]
    registry.set_alias(name, "approved", 2)
    assert registry.get(name, "approved").version == 2
    assert registry.get(name, "1").aliases == []
    with pytest.raises(RegistryError, match="no version 7"):
        registry.set_alias(name, "approved", 7)


@pytest.mark.parametrize(("selector", "message"), [("9", "no version 9"), ("missing", "no alias 'missing'")])
def test_unknown_selector(registry, name, tmp_path, selector, message):
    registry.register(name, make_model(tmp_path / "m1"), status="candidate", tags={}, aliases=("candidate",))
    with pytest.raises(RegistryError, match=message):
        registry.get(name, selector)


@pytest.mark.parametrize("selector", ["latest", "1", "approved"])
def test_unknown_model(registry, selector):
    with pytest.raises(RegistryError, match="'ghost-model' is not in MLflow registry"):
        registry.get("ghost-model", selector)


def test_transaction_rolls_back(registry, mlflow_server, name, tmp_path):
    registry.register(name, make_model(tmp_path / "m1", 1.0), status="approved", tags={"team": "a"}, aliases=("approved", "candidate"))
    registry.attach_audit(name, 1, {"digest": "a" * 64, "run_id": "before"}, attestation={"payload": "old"})
    before = client(mlflow_server).get_model_version(name, "1").tags

    with pytest.raises(RuntimeError, match="boom"):
        with registry.transaction(name):
            registry.register(name, make_model(tmp_path / "m2", 2.0), status="candidate", tags={}, aliases=("candidate",))
            registry.set_status(name, 1, "quarantined", aliases=("quarantined",), tags={"reason": "test"})
            registry.attach_audit(name, 1, {"digest": "d" * 64, "run_id": "inside"})
            assert registry.get(name, "candidate").version == 2
            assert registry.attestation(name, "1") is None
            raise RuntimeError("boom")

    assert [entry.version for entry in registry.list_versions(name)] == [1]
    assert client(mlflow_server).get_model_version(name, "1").tags == before
    assert registry.get(name, "1").aliases == ["approved", "candidate"]
    assert registry.get(name, "candidate").version == 1
    assert registry.audit_record(name, "1") == {"digest": "a" * 64, "run_id": "before"}
    assert registry.attestation(name, "1") == {"payload": "old"}
    assert len(runs_of(mlflow_server, name)) == 1


def test_transaction_rollback_removes_new_model(registry, name, tmp_path):
    with pytest.raises(RuntimeError):
        with registry.transaction(name):
            registry.register(name, make_model(tmp_path / "m1", 1.0), status="candidate", tags={}, aliases=("candidate",))
            raise RuntimeError("boom")

    assert registry.list_versions(name) == []
    with pytest.raises(RegistryError, match="is not in MLflow registry"):
        registry.get(name)


def test_transaction_commits(registry, name, tmp_path):
    with registry.transaction(name):
        registry.register(name, make_model(tmp_path / "m1", 1.0), status="candidate", tags={}, aliases=("candidate",))
        registry.register(name, make_model(tmp_path / "m2", 2.0), status="approved", tags={}, aliases=("approved",))
    assert [entry.version for entry in registry.list_versions(name)] == [1, 2]
    assert registry.get(name, "approved").version == 2


def test_large_audit_record_is_artifact(registry, mlflow_server, name, tmp_path):
    record = {"digest": "b" * 64, "training_trace": ["epoch " * 50] * 40}
    assert len(json.dumps(record)) > TAG_VALUE_LIMIT_BYTES

    registry.register(name, make_model(tmp_path / "m1"), status="approved", tags={}, audit=record, aliases=("approved",))

    tags = client(mlflow_server).get_model_version(name, "1").tags
    assert tags[AUDIT_TAG] == "b" * 64
    assert max(len(value.encode("utf-8")) for value in tags.values()) <= TAG_VALUE_LIMIT_BYTES
    assert registry.audit_record(name, "approved") == record
    assert registry.get(name, "approved").audit_digest == "b" * 64


def test_oversized_tag_rejected_before_writes(registry, name, tmp_path):
    with pytest.raises(RegistryError, match=f"over the {TAG_VALUE_LIMIT_BYTES}-byte limit"):
        registry.register(name, make_model(tmp_path / "m1"), status="candidate", tags={"notes": "x" * (TAG_VALUE_LIMIT_BYTES + 1)})
    assert registry.list_versions(name) == []


def test_attach_audit_and_attestation(registry, name, tmp_path):
    registry.register(name, make_model(tmp_path / "m1"), status="candidate", tags={})
    registry.attach_audit(name, 1, {"digest": "a" * 64}, attestation={"payloadType": "application/vnd.in-toto+json"})
    assert registry.get(name, "1").tags["guardrail.audit_digest"] == "a" * 64
    assert registry.attestation(name, "1") == {"payloadType": "application/vnd.in-toto+json"}

    registry.attach_audit(name, 1, {"digest": "c" * 64})

    assert registry.audit_record(name, "1") == {"digest": "c" * 64}
    assert registry.attestation(name, "1") is None


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "a..b", "white space"])
def test_invalid_names_rejected(registry, tmp_path, bad):
    model = make_model(tmp_path / "m1")
    with pytest.raises(RegistryError, match="invalid model name"):
        registry.register(bad, model, status="candidate", tags={})
    with pytest.raises(RegistryError, match="invalid alias"):
        registry.register("chat-valid", model, status="candidate", tags={}, aliases=(bad,))
    with pytest.raises(RegistryError, match="invalid model name"):
        registry.get(bad, "1")


def test_open_registry_from_policy(mlflow_server, tmp_path):
    policy = parse_policy(
        f"apiVersion: guardrail/v1\nkind: SafetyPolicy\nregistry: {{type: mlflow, tracking_uri: '{mlflow_server['url']}', cache_dir: '{tmp_path}'}}\n"
    )
    registry = open_registry(policy)
    assert isinstance(registry, MlflowRegistry)
    assert registry.location == mlflow_server["url"]


def test_unreachable_server_fails_fast(tmp_path, monkeypatch):
    # Without this check the client retries a refused connection for minutes.
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    url = f"http://127.0.0.1:{_free_port()}"

    with pytest.raises(RegistryError) as raised:
        MlflowRegistry(url, cache_dir=tmp_path / "cache")

    assert f"tracking server at {url} is not reachable" in str(raised.value)
    assert "fix registry.tracking_uri" in str(raised.value)


def test_secrets_never_leak(mlflow_server, name, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "guardrail-ci")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD_SENTINEL)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    registry = MlflowRegistry(mlflow_server["url"], cache_dir=tmp_path / "cache")
    messages = []

    registry.register(name, make_model(tmp_path / "m1"), status="candidate", tags={}, aliases=("candidate",))
    for action in (
        lambda: registry.get("ghost-model", "approved"),
        lambda: registry.get(name, "nightly"),
        lambda: registry.register(name, make_model(tmp_path / "m2", 2.0), status="candidate", tags={"huge": "x" * 6000}),
        lambda: MlflowRegistry(f"http://127.0.0.1:{_free_port()}", cache_dir=tmp_path / "c2").get(name, "1"),
        lambda: MlflowRegistry(f"http://guardrail-ci:{PASSWORD_SENTINEL}@127.0.0.1:5000"),
    ):
        with pytest.raises(RegistryError) as raised:
            action()
        messages.append(str(raised.value))
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN_SENTINEL)
    with pytest.raises(RegistryError) as raised:
        MlflowRegistry(f"http://127.0.0.1:{_free_port()}", cache_dir=tmp_path / "c3").list_versions()
    messages.append(str(raised.value))
    with pytest.raises(PolicyError) as raised:
        parse_policy(f"registry: {{type: mlflow, tracking_uri: 'http://u:{PASSWORD_SENTINEL}@127.0.0.1:5000'}}\n")
    messages.append(str(raised.value))

    assert "is not in MLflow registry" in messages[0]
    assert "no alias 'nightly'" in messages[1]
    assert "is not reachable" in messages[3]
    assert "fix registry.tracking_uri" in messages[3]
    assert "contains a user name or password" in messages[4]
    assert "registry.tracking_uri: contains credentials" in messages[6]
    for message in messages:
        assert PASSWORD_SENTINEL not in message
        assert TOKEN_SENTINEL not in message
    assert PASSWORD_SENTINEL not in caplog.text
    assert TOKEN_SENTINEL not in caplog.text


def mlflow_policy(policy: SafetyPolicy, mlflow_server: dict, tmp_path: Path, model_name: str) -> SafetyPolicy:
    """Return the policy with only its registry section replaced by an MLflow one."""
    policy.registry = RegistrySettings(
        type="mlflow", tracking_uri=mlflow_server["url"], cache_dir=str(tmp_path / "registry-cache"), model_name=model_name
    )
    return policy


def test_gate_registers_patched_model(tiny_model_dir, mlflow_server, name, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "guardrail-ci")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD_SENTINEL)
    policy = mlflow_policy(patchable_policy(tmp_path), mlflow_server, tmp_path, name)

    result = run_gate(str(tiny_model_dir), policy, cache_dir=None, work_dir=tmp_path / "work")

    assert result.decision == PATCHED, result.reason
    registry = open_registry(policy)
    candidate, patched = registry.get(name, "quarantined"), registry.get(name, "approved")
    assert (candidate.version, patched.version) == (result.registered["candidate"], result.registered["patched"])
    assert candidate.status == QUARANTINED
    assert patched.status == APPROVED
    assert patched.tags["guardrail.parent_version"] == str(candidate.version)
    assert patched.tags["guardrail.decision"] == PATCHED
    assert patched.tags["guardrail.run_id"] == result.record["run_id"]
    assert registry.audit_record(name, "approved")["digest"] == result.record["digest"]
    assert result.record["registry"]["location"] == mlflow_server["url"]
    written = Path(result.audit_path).read_text(encoding="utf-8")
    assert audit.verify_digest(json.loads(written))
    assert PASSWORD_SENTINEL not in written
    assert PASSWORD_SENTINEL not in caplog.text


def test_gate_reads_registry_candidate(tiny_model_dir, mlflow_server, name, tmp_path):
    policy = mlflow_policy(tiny_policy(tmp_path, thresholds="thresholds: {min_refusal_rate: 0, max_over_refusal_rate: 1}"), mlflow_server, tmp_path, name)
    open_registry(policy).register(name, tiny_model_dir, status="candidate", tags={}, aliases=("candidate",))

    result = run_gate(f"registry:{name}@candidate", policy, cache_dir=None, work_dir=tmp_path / "work")

    assert result.decision == APPROVED
    versions = open_registry(policy).list_versions(name)
    assert [(entry.version, entry.aliases) for entry in versions] == [(1, ["approved", "candidate"])]
    assert Path(result.record["candidate"]["local_path"]).is_relative_to(tmp_path / "registry-cache")


def test_gate_failure_leaves_registry_unchanged(tiny_model_dir, mlflow_server, name, tmp_path, monkeypatch):
    policy = mlflow_policy(tiny_policy(tmp_path, realignment="realignment: {action: block}"), mlflow_server, tmp_path, name)
    registry = open_registry(policy)
    registry.register(name, make_model(tmp_path / "older", 5.0), status="approved", tags={}, aliases=("approved", "quarantined"))
    before = [(entry.version, entry.status, entry.aliases, entry.tags) for entry in registry.list_versions(name)]
    real_set_tag = MlflowClient.set_model_version_tag

    def reject_audit_tag(self, model, version, key, value):
        # Raise the error a server returns for a tag it cannot store. The gate's versions exist by then.
        if key == AUDIT_TAG:
            raise MlflowException("INVALID_PARAMETER_VALUE: tag rejected by the test")
        return real_set_tag(self, model, version, key, value)

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", reject_audit_tag)
    with pytest.raises(RegistryError, match="tag rejected by the test"):
        run_gate(str(tiny_model_dir), policy, cache_dir=None, work_dir=tmp_path / "work")
    monkeypatch.undo()

    assert [(entry.version, entry.status, entry.aliases, entry.tags) for entry in registry.list_versions(name)] == before
    assert len(runs_of(mlflow_server, name)) == 1
    assert audit.list_records(tmp_path / "audit")[-1]["decision"] == "error"


# Signed records -----------------------------------------------------------------------------------


def signed_mlflow_policy(policy: SafetyPolicy, keys: KeyPair, mlflow_server: dict, tmp_path: Path, model_name: str) -> SafetyPolicy:
    policy.audit.signing_key = str(keys.private_key)
    return mlflow_policy(policy, mlflow_server, tmp_path, model_name)


def verifier_policy_file(mlflow_server: dict, tmp_path: Path) -> Path:
    """Write the policy of a verifier on another machine: the same MLflow server, but an empty audit folder and cache."""
    path = tmp_path / "verifier.yaml"
    path.write_text(
        "apiVersion: guardrail/v1\nkind: SafetyPolicy\n"
        f"registry: {{type: mlflow, tracking_uri: '{mlflow_server['url']}', cache_dir: '{tmp_path / 'verifier-cache'}'}}\n"
        f"audit: {{dir: '{tmp_path / 'verifier-audit'}'}}\n",
        encoding="utf-8",
    )
    return path


def replace_audit_artifact(mlflow_server: dict, name: str, version: int, edit, folder: Path) -> None:
    """Download a version's audit/audit.json into ``folder``, edit it and log it back, as another writer to the run could."""
    mlflow = client(mlflow_server)
    run_id = mlflow.get_model_version(name, str(version)).run_id
    local = Path(mlflow.download_artifacts(run_id, "audit/audit.json", dst_path=str(folder)))
    record = json.loads(local.read_text(encoding="utf-8"))
    edit(record)
    local.write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
    mlflow.log_artifact(run_id, str(local), "audit")


def flip_stored_weight_byte(mlflow_server: dict, name: str, version: int) -> None:
    run_id = client(mlflow_server).get_model_version(name, str(version)).run_id
    weights = next(mlflow_server["artifacts"].rglob(f"{run_id}/artifacts/model/model.safetensors"))
    content = bytearray(weights.read_bytes())
    content[len(content) // 2] ^= 0x01
    weights.write_bytes(bytes(content))


def checks_by_name(stdout: str) -> dict:
    """Index the checks of ``audit verify --json`` by name. MLflow prints its download progress to stderr, so only stdout is parsed."""
    return {check["name"]: check for check in json.loads(stdout)["checks"]}


def test_signed_record_verify_and_tamper(tiny_model_dir, mlflow_server, name, tmp_path):
    keys = generate_key_pair(tmp_path / "keys")
    policy = signed_mlflow_policy(patchable_policy(tmp_path), keys, mlflow_server, tmp_path, name)
    result = run_gate(str(tiny_model_dir), policy, cache_dir=None, work_dir=tmp_path / "work")
    command = ["audit", "verify", f"registry:{name}@approved", "--key", str(keys.public_key), "--policy", str(verifier_policy_file(mlflow_server, tmp_path)), "--json"]
    runner = CliRunner()

    intact = runner.invoke(app, command)
    patched_version = result.registered["patched"]
    replace_audit_artifact(mlflow_server, name, patched_version, lambda record: record.update(decision="approved"), tmp_path / "edited")
    flip_stored_weight_byte(mlflow_server, name, patched_version)
    tampered = runner.invoke(app, command)

    assert result.decision == PATCHED, result.reason
    assert result.attestation_path is not None
    assert intact.exit_code == 0, intact.output
    assert [check["passed"] for check in checks_by_name(intact.stdout).values()] == [True] * 5
    assert tampered.exit_code == 1, tampered.output
    checks = checks_by_name(tampered.stdout)
    assert checks["signature"]["passed"]
    assert not checks["audit record"]["passed"]
    assert any("was changed after it was written" in problem for problem in checks["audit record"]["problems"])
    assert any(problem.endswith("differs from the signed predicate at: decision") for problem in checks["audit record"]["problems"])
    assert not checks["model files"]["passed"]
    assert f"version {patched_version}" in checks["model files"]["detail"]
    assert "changed: ['model.safetensors']" in checks["model files"]["detail"]


def test_signed_record_lineage(tiny_model_dir, mlflow_server, name, tmp_path, monkeypatch):
    keys = generate_key_pair(tmp_path / "keys")
    first = run_gate(str(tiny_model_dir), signed_mlflow_policy(patchable_policy(tmp_path), keys, mlflow_server, tmp_path, name), cache_dir=None, work_dir=tmp_path / "work")
    approve_all = tiny_policy(tmp_path, thresholds="thresholds: {min_refusal_rate: 0, max_over_refusal_rate: 1}")
    second = run_gate(f"registry:{name}@approved", signed_mlflow_policy(approve_all, keys, mlflow_server, tmp_path, name), cache_dir=None, work_dir=tmp_path / "work-2")
    policy_file = verifier_policy_file(mlflow_server, tmp_path)
    runner = CliRunner()
    # The parent's reference names the model, so no search should list every model on the shared server.
    all_model_searches = []
    real_search = MlflowClient.search_registered_models

    def counting_search(self, *args, **kwargs):
        all_model_searches.append(args or kwargs)
        return real_search(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "search_registered_models", counting_search)

    verified = runner.invoke(app, ["audit", "verify", f"registry:{name}@approved", "--key", str(keys.public_key), "--policy", str(policy_file), "--json"])
    tree = runner.invoke(app, ["audit", "lineage", f"registry:{name}@approved", "--policy", str(policy_file)], env={"COLUMNS": "250"})
    chain = runner.invoke(app, ["audit", "lineage", f"registry:{name}@approved", "--policy", str(policy_file), "--json"])

    assert first.decision == PATCHED, first.reason
    assert second.decision == APPROVED, second.reason
    assert second.record["parent"]["digest"] == first.record["digest"]
    assert verified.exit_code == 0, verified.output
    assert checks_by_name(verified.stdout)["lineage"]["detail"].startswith("1 parent record(s) found and verified")
    assert tree.exit_code == 0, tree.output
    lines = tree.stdout.splitlines()
    assert lines[0].startswith(f"base model {tiny_model_dir}")
    first_line = next(index for index, line in enumerate(lines) if first.record["run_id"] in line)
    second_line = next(index for index, line in enumerate(lines) if second.record["run_id"] in line)
    assert 0 < first_line < second_line
    assert f"registry:{name}@{first.registered['candidate']}" in lines[first_line]
    assert chain.exit_code == 0, chain.output
    entries = json.loads(chain.stdout)["chain"]
    assert [entry["run_id"] for entry in entries] == [second.record["run_id"], first.record["run_id"]]
    assert [entry["digest_verified"] for entry in entries] == [True, True]
    assert all_model_searches == []
