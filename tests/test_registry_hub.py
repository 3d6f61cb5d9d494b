"""Tests for the Hugging Face Hub registry against the local Hub stand-in (tests/hub_standin.py).

The stand-in serves the HTTP API that huggingface_hub's client calls. The
client and the registry code are the real ones. Only the server replaces the
Hub.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from huggingface_hub import constants as hub_constants
import pytest
import yaml
from huggingface_hub import HfApi
from hub_standin import HubStandIn
from test_gate import patchable_policy, tiny_policy
from test_registry import make_model
from typer.testing import CliRunner

from guardrail import audit
from guardrail.cli import app
from guardrail.errors import PolicyError, RegistryError
from guardrail.gate import APPROVED, BLOCKED, PATCHED, QUARANTINED, run_gate
from guardrail.policy import RegistrySettings, SafetyPolicy, parse_policy
from guardrail.registry import open_registry
from guardrail.registry_hub import AUDIT_FOLDER, MODEL_README, REGISTRY_FILE, HubRegistry
from guardrail.signing import KeyPair, generate_key_pair

TOKEN_SENTINEL = "hf_sentinel_token_4c1d7e"
REPO = "guardrail-test/chat"


@pytest.fixture
def hub(monkeypatch):
    """A running stand-in that requires the sentinel token; offline mode is lifted for these tests only."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with HubStandIn(token=TOKEN_SENTINEL) as standin:
        yield standin


@pytest.fixture
def registry(hub, tmp_path) -> HubRegistry:
    return HubRegistry(REPO, endpoint=hub.url, token=TOKEN_SENTINEL, cache_dir=tmp_path / "cache")


def head(hub: HubStandIn, repo: str = REPO, branch: str = "main") -> str:
    return hub.repos[repo].branches[branch]


def card_metadata(hub: HubStandIn, revision: str = "main") -> dict:
    text = hub.files(REPO, revision)["README.md"].decode("utf-8")
    return yaml.safe_load(text.split("---\n")[1])


def test_register_get_by_version_and_alias(registry, hub, tmp_path):
    model = make_model(tmp_path / "m1", 1.0)

    version = registry.register("chat", model, status="candidate", tags={"team": "a"}, aliases=("candidate",))

    assert version.version == 1
    assert version.status == "candidate"
    assert version.aliases == ["candidate"]
    assert version.tags == {"team": "a"}
    assert registry.get("chat", "1").model_digest == version.model_digest
    assert registry.get("chat", "candidate").version == 1
    assert registry.get("chat").version == 1
    files = hub.files(REPO, "v1")
    assert files["model.safetensors"] == (model / "model.safetensors").read_bytes()
    assert json.loads(files[REGISTRY_FILE])["aliases"] == {"candidate": 1}
    assert sorted(hub.repos[REPO].tags) == ["v1"]


def test_model_card_metadata(registry, hub, tmp_path):
    model = make_model(tmp_path / "m1", 1.0)
    (model / "README.md").write_text("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n# my fine-tune\n", encoding="utf-8")
    record = {"digest": "a" * 64}

    registry.register("chat", model, status="approved", tags={"guardrail.decision": "approved"}, audit=record, aliases=("approved",))

    metadata = card_metadata(hub)
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata["base_model_relation"] == "finetune"
    assert metadata["guardrail"]["status"] == "approved"
    assert metadata["guardrail"]["decision"] == "approved"
    assert metadata["guardrail"]["audit_digest"] == "a" * 64
    files = hub.files(REPO)
    assert files[MODEL_README] == (model / "README.md").read_bytes()
    assert json.loads(files[f"{AUDIT_FOLDER}/1/audit.json"]) == record


def test_model_path_restores_own_readme(registry, tmp_path):
    model = make_model(tmp_path / "m1", 1.0)
    (model / "README.md").write_text("# my fine-tune\n", encoding="utf-8")
    registry.register("chat", model, status="candidate", tags={})

    path = registry.model_path("chat", "1")

    assert sorted(entry.name for entry in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (path / "README.md").read_bytes() == (model / "README.md").read_bytes()
    assert (path / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()


def test_model_path_reads_old_version_from_tag(registry, tmp_path):
    first = make_model(tmp_path / "m1", 1.0)
    registry.register("chat", first, status="quarantined", tags={})
    registry.register("chat", make_model(tmp_path / "m2", 2.0), status="approved", tags={})

    path = registry.model_path("chat", "1")

    assert (path / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()


def test_model_path_rejects_altered_file(registry, hub, tmp_path):
    registry.register("chat", make_model(tmp_path / "m1", 1.0), status="candidate", tags={})
    commit = hub.repos[REPO].resolve("v1")
    commit.files["model.safetensors"] = commit.files["model.safetensors"][:-4] + b"XXXX"

    with pytest.raises(RegistryError, match=r"does not match the digests.*changed: \['model.safetensors'\]"):
        registry.model_path("chat", "1")
    assert not list(registry.cache_dir.rglob("model.safetensors"))


def test_model_path_refresh_downloads_again(registry, hub, tmp_path):
    model = make_model(tmp_path / "m1", 1.0)
    registry.register("chat", model, status="candidate", tags={})
    cached = registry.model_path("chat", "1")
    commit = hub.repos[REPO].resolve("v1")
    commit.files["model.safetensors"] = commit.files["model.safetensors"][:-4] + b"XXXX"

    reused = registry.model_path("chat", "1")
    with pytest.raises(RegistryError, match=r"does not match the digests.*changed: \['model.safetensors'\]"):
        registry.model_path("chat", "1", refresh=True)

    assert reused == cached
    assert (cached / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert registry.model_path("chat", "1") == cached


def test_list_versions_with_status(registry, tmp_path):
    registry.register("chat", make_model(tmp_path / "m1", 1.0), status="quarantined", tags={}, aliases=("quarantined",))
    registry.register("chat", make_model(tmp_path / "m2", 2.0), status="approved", tags={}, aliases=("approved",))

    versions = registry.list_versions()

    assert [(entry.version, entry.status, entry.aliases) for entry in versions] == [(1, "quarantined", ["quarantined"]), (2, "approved", ["approved"])]
    assert registry.list_versions("chat") == versions
    assert registry.list_versions("other") == []


def test_same_digest_not_uploaded_again(registry, hub, tmp_path):
    registry.register("chat", make_model(tmp_path / "a", 1.0), status="candidate", tags={"run": "1"}, aliases=("candidate",))
    commits_before = len(hub.repos[REPO].commits)

    again = registry.register("chat", make_model(tmp_path / "b", 1.0), status="approved", tags={"run": "2"}, aliases=("approved",))

    assert again.version == 1
    assert again.status == "approved"
    assert again.tags == {"run": "2"}
    assert again.aliases == ["approved", "candidate"]
    assert sorted(hub.repos[REPO].tags) == ["v1"]
    assert len(hub.repos[REPO].commits) == commits_before + 1
    posted = [path for method, path in hub.requests if method == "POST" and path.endswith("/preupload/main")]
    assert posted, "the metadata commit went through preupload"


def test_aliases_move(registry, tmp_path):
    registry.register("chat", make_model(tmp_path / "m1", 1.0), status="approved", tags={}, aliases=("approved", "candidate"))
    registry.register("chat", make_model(tmp_path / "m2", 2.0), status="candidate", tags={}, aliases=("candidate",))

    assert registry.get("chat", "candidate").version == 2
    assert registry.get("chat", "1").aliases == ["approved"]
    registry.set_alias("chat", "approved", 2)
    assert registry.get("chat", "approved").version == 2
    assert registry.get("chat", "1").aliases == []
    with pytest.raises(RegistryError, match="no version 7"):
        registry.set_alias("chat", "approved", 7)


@pytest.mark.parametrize(("selector", "message"), [("9", "no version 9"), ("missing", "no alias 'missing'")])
def test_unknown_selector(registry, tmp_path, selector, message):
    registry.register("chat", make_model(tmp_path / "m1"), status="candidate", tags={})
    with pytest.raises(RegistryError, match=message):
        registry.get("chat", selector)


def test_unknown_model_and_missing_repo(registry, tmp_path):
    with pytest.raises(RegistryError, match="'chat' is not in Hub registry"):
        registry.get("chat")
    registry.register("chat", make_model(tmp_path / "m1"), status="candidate", tags={})
    with pytest.raises(RegistryError, match="'ghost' is not in Hub registry"):
        registry.get("ghost", "1")


def test_one_model_per_repo(registry, tmp_path):
    registry.register("chat", make_model(tmp_path / "m1"), status="candidate", tags={})
    with pytest.raises(RegistryError, match="contains model 'chat', and a Hub registry repo contains one model"):
        registry.register("other", make_model(tmp_path / "m2", 2.0), status="candidate", tags={})


def test_transaction_pushes_nothing_on_error(registry, hub, tmp_path):
    registry.register("chat", make_model(tmp_path / "m1", 1.0), status="approved", tags={}, aliases=("approved", "candidate"))
    registry.attach_audit("chat", 1, {"digest": "a" * 64}, attestation={"payload": "old"})
    head_before, files_before = head(hub), hub.files(REPO)

    with pytest.raises(RuntimeError, match="boom"):
        with registry.transaction("chat"):
            registry.register("chat", make_model(tmp_path / "m2", 2.0), status="candidate", tags={}, aliases=("candidate",))
            registry.set_status("chat", 1, "quarantined", aliases=("quarantined",), tags={"reason": "test"})
            registry.attach_audit("chat", 1, {"digest": "d" * 64})
            assert registry.get("chat", "candidate").version == 2
            assert registry.attestation("chat", "1") is None
            raise RuntimeError("boom")

    assert head(hub) == head_before
    assert hub.files(REPO) == files_before
    assert sorted(hub.repos[REPO].tags) == ["v1"]
    assert registry.get("chat", "candidate").version == 1
    assert registry.attestation("chat", "1") == {"payload": "old"}


def test_transaction_pushes_one_commit_per_version(registry, hub, tmp_path):
    with registry.transaction("chat"):
        registry.register("chat", make_model(tmp_path / "m1", 1.0), status="quarantined", tags={}, aliases=("quarantined",))
        registry.register("chat", make_model(tmp_path / "m2", 2.0), status="approved", tags={"guardrail.parent_version": "1"}, aliases=("approved",))
        registry.attach_audit("chat", 1, {"digest": "e" * 64})
        registry.attach_audit("chat", 2, {"digest": "e" * 64})

    repo = hub.repos[REPO]
    assert sorted(repo.tags) == ["v1", "v2"]
    assert repo.commits[repo.tags["v2"]].parent == repo.tags["v1"]
    assert json.loads(hub.files(REPO, "v1")[REGISTRY_FILE])["versions"].keys() == {"1"}
    assert [(entry.version, entry.aliases) for entry in registry.list_versions()] == [(1, ["quarantined"]), (2, ["approved"])]
    assert registry.audit_record("chat", "quarantined") == {"digest": "e" * 64}


def test_concurrent_change_rejected(registry, hub, tmp_path):
    registry.register("chat", make_model(tmp_path / "m1", 1.0), status="candidate", tags={}, aliases=("candidate",))
    other_writer = HfApi(endpoint=hub.url, token=TOKEN_SENTINEL)

    with pytest.raises(RegistryError, match="changed since guardrail read it") as raised:
        with registry.transaction("chat"):
            registry.register("chat", make_model(tmp_path / "m2", 2.0), status="approved", tags={}, aliases=("approved",))
            other_writer.upload_file(path_or_fileobj=b"someone else's notes\n", path_in_repo="NOTES.md", repo_id=REPO)

    files = hub.files(REPO)
    assert files["NOTES.md"] == b"someone else's notes\n"
    assert json.loads(files[REGISTRY_FILE])["versions"].keys() == {"1"}
    assert sorted(hub.repos[REPO].tags) == ["v1"]
    assert "re-run" in str(raised.value)


def test_partial_push_is_reverted(registry, hub, tmp_path):
    registry.register("chat", make_model(tmp_path / "m1", 1.0), status="approved", tags={}, aliases=("approved",))
    files_before = hub.files(REPO)
    hub.fail_next("POST", f"/api/models/{REPO}/commit/main", 500, after=1)

    with pytest.raises(RegistryError, match="committing to"):
        with registry.transaction("chat"):
            registry.register("chat", make_model(tmp_path / "m2", 2.0), status="quarantined", tags={}, aliases=("quarantined",))
            registry.register("chat", make_model(tmp_path / "m3", 3.0), status="approved", tags={}, aliases=("approved",))

    assert hub.files(REPO) == files_before
    assert sorted(hub.repos[REPO].tags) == ["v1"]
    assert [entry.version for entry in registry.list_versions()] == [1]
    assert registry.get("chat", "approved").version == 1


def test_branch_created_when_missing(hub, tmp_path):
    registry = HubRegistry(REPO, endpoint=hub.url, token=TOKEN_SENTINEL, branch="registry", cache_dir=tmp_path / "cache")

    registry.register("chat", make_model(tmp_path / "m1"), status="candidate", tags={})

    assert set(hub.repos[REPO].branches) == {"main", "registry"}
    assert REGISTRY_FILE in hub.files(REPO, "registry")
    assert REGISTRY_FILE not in hub.files(REPO, "main")


def test_attach_audit_and_attestation(registry, hub, tmp_path):
    registry.register("chat", make_model(tmp_path / "m1"), status="candidate", tags={})
    registry.attach_audit("chat", 1, {"digest": "a" * 64}, attestation={"payloadType": "application/vnd.in-toto+json"})
    assert registry.get("chat", "1").tags["guardrail.audit_digest"] == "a" * 64
    assert registry.attestation("chat", "1") == {"payloadType": "application/vnd.in-toto+json"}

    registry.attach_audit("chat", 1, {"digest": "c" * 64})

    assert registry.audit_record("chat", "1") == {"digest": "c" * 64}
    assert registry.attestation("chat", "1") is None
    assert f"{AUDIT_FOLDER}/1/attestation.json" not in hub.files(REPO)


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "a..b", "white space"])
def test_invalid_names_rejected(registry, hub, tmp_path, bad):
    model = make_model(tmp_path / "m1")
    with pytest.raises(RegistryError, match="invalid model name"):
        registry.register(bad, model, status="candidate", tags={})
    with pytest.raises(RegistryError, match="invalid alias"):
        registry.register("chat", model, status="candidate", tags={}, aliases=(bad,))
    assert REPO not in hub.repos


@pytest.mark.parametrize("bad", ["chat", "../chat", "org/../chat", "org/chat/extra", "org--x/chat"])
def test_invalid_repo_id_rejected(bad):
    with pytest.raises(RegistryError, match="invalid Hub repo id"):
        HubRegistry(bad)


def test_reserved_folder_rejected(registry, tmp_path):
    model = make_model(tmp_path / "m1")
    (model / "guardrail").mkdir()
    with pytest.raises(RegistryError, match="contains 'guardrail'"):
        registry.register("chat", model, status="candidate", tags={})


def test_policy_validation_names_key():
    with pytest.raises(PolicyError, match=r"mine.yaml:1: registry.repo_id: required when type is 'hub'"):
        parse_policy("registry: {type: hub}\n", "mine.yaml")
    with pytest.raises(PolicyError, match=r"mine.yaml:1: registry.tracking_uri: required when type is 'mlflow'"):
        parse_policy("registry: {type: mlflow}\n", "mine.yaml")
    with pytest.raises(PolicyError, match=r"registry.branch"):
        parse_policy("registry: {type: hub, repo_id: a/b, branch: '../main'}\n", "mine.yaml")


def test_secrets_never_leak(hub, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    registry = HubRegistry(REPO, endpoint=hub.url, token=TOKEN_SENTINEL, cache_dir=tmp_path / "cache")
    registry.register("chat", make_model(tmp_path / "m1"), status="candidate", tags={})
    wrong_token = HubRegistry(REPO, endpoint=hub.url, token="hf_wrong_" + TOKEN_SENTINEL, cache_dir=tmp_path / "c2")
    messages = []

    for action in (
        lambda: wrong_token.register("chat", make_model(tmp_path / "m2", 2.0), status="candidate", tags={}),
        lambda: registry.get("chat", "nightly"),
        lambda: HubRegistry(REPO, endpoint=hub.url.replace(hub.url.rsplit(":", 1)[1], "1"), token=TOKEN_SENTINEL).get("chat"),
    ):
        with pytest.raises(RegistryError) as raised:
            action()
        messages.append(str(raised.value))
    hub.fail_next("POST", "/commit/main", 412)
    with pytest.raises(RegistryError) as raised:
        registry.register("chat", make_model(tmp_path / "m3", 3.0), status="candidate", tags={})
    messages.append(str(raised.value))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RegistryError) as raised:
        registry.get("chat")
    messages.append(str(raised.value))
    with pytest.raises(PolicyError) as raised:
        parse_policy(f"registry: {{type: hub, repo_id: a/b, token_env: {TOKEN_SENTINEL}}}\n")
    messages.append(str(raised.value))
    with pytest.raises(PolicyError) as raised:
        parse_policy(f"registry: {{type: hub, repo_id: a/b, endpoint: 'https://user:{TOKEN_SENTINEL}@hub.example'}}\n")
    messages.append(str(raised.value))

    assert "the Hub rejected the token; check that $HF_TOKEN" in messages[0]
    assert "no alias 'nightly'" in messages[1]
    assert "reachable" in messages[2]
    assert "changed since guardrail read it" in messages[3]
    assert "HF_HUB_OFFLINE is set" in messages[4]
    assert "registry.token_env: looks like a token" in messages[5]
    assert "registry.endpoint: contains credentials" in messages[6]
    for message in messages:
        assert TOKEN_SENTINEL not in message
    assert TOKEN_SENTINEL not in caplog.text


def hub_policy(policy: SafetyPolicy, hub: HubStandIn, tmp_path: Path) -> SafetyPolicy:
    """Return the policy with only its registry section replaced by a Hub one."""
    policy.registry = RegistrySettings(type="hub", repo_id=REPO, endpoint=hub.url, cache_dir=str(tmp_path / "registry-cache"), model_name="tiny-chat")
    return policy


def test_gate_registers_patched_model(tiny_model_dir, hub, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", TOKEN_SENTINEL)
    policy = hub_policy(patchable_policy(tmp_path), hub, tmp_path)

    result = run_gate(str(tiny_model_dir), policy, cache_dir=None, work_dir=tmp_path / "work")

    assert result.decision == PATCHED, result.reason
    registry = open_registry(policy)
    candidate, patched = registry.get("tiny-chat", "quarantined"), registry.get("tiny-chat", "approved")
    assert (candidate.version, patched.version) == (result.registered["candidate"], result.registered["patched"])
    assert candidate.status == QUARANTINED
    assert patched.status == APPROVED
    assert patched.tags["guardrail.audit_digest"] == result.record["digest"]
    assert registry.audit_record("tiny-chat", "approved")["digest"] == result.record["digest"]
    assert result.record["registry"]["location"] == f"{hub.url}/{REPO}@main"
    metadata = card_metadata(hub)
    assert metadata["guardrail"]["decision"] == PATCHED
    assert metadata["guardrail"]["audit_digest"] == result.record["digest"]
    assert sorted(hub.repos[REPO].tags) == ["v1", "v2"]
    written = Path(result.audit_path).read_text(encoding="utf-8")
    assert audit.verify_digest(json.loads(written))
    assert TOKEN_SENTINEL not in written
    assert TOKEN_SENTINEL not in caplog.text


def test_gate_reads_registry_candidate(tiny_model_dir, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN_SENTINEL)
    policy = hub_policy(tiny_policy(tmp_path, thresholds="thresholds: {min_refusal_rate: 0, max_over_refusal_rate: 1}"), hub, tmp_path)
    open_registry(policy).register("tiny-chat", tiny_model_dir, status="candidate", tags={}, aliases=("candidate",))

    result = run_gate("registry:tiny-chat@candidate", policy, cache_dir=None, work_dir=tmp_path / "work")

    assert result.decision == APPROVED
    assert [(entry.version, entry.aliases) for entry in open_registry(policy).list_versions()] == [(1, ["approved", "candidate"])]
    assert Path(result.record["candidate"]["local_path"]).is_relative_to(tmp_path / "registry-cache")


def test_gate_failure_leaves_repo_unchanged(tiny_model_dir, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN_SENTINEL)
    policy = hub_policy(tiny_policy(tmp_path, realignment="realignment: {action: block}"), hub, tmp_path)
    open_registry(policy).register("tiny-chat", make_model(tmp_path / "older", 5.0), status="approved", tags={}, aliases=("approved",))
    head_before, files_before = head(hub), hub.files(REPO)
    hub.fail_next("POST", "/commit/main", 503)

    with pytest.raises(RegistryError, match="committing to"):
        run_gate(str(tiny_model_dir), policy, cache_dir=None, work_dir=tmp_path / "work")

    assert head(hub) == head_before
    assert hub.files(REPO) == files_before
    record = audit.list_records(tmp_path / "audit")[-1]
    assert record["decision"] == "error"
    assert TOKEN_SENTINEL not in json.dumps(record)


def test_gate_blocks_into_hub(tiny_model_dir, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN_SENTINEL)
    policy = hub_policy(tiny_policy(tmp_path, realignment="realignment: {action: block}"), hub, tmp_path)

    result = run_gate(str(tiny_model_dir), policy, cache_dir=None, work_dir=tmp_path / "work")

    assert result.decision == BLOCKED
    assert open_registry(policy).get("tiny-chat", "quarantined").status == QUARANTINED
    assert card_metadata(hub)["guardrail"]["status"] == QUARANTINED


def test_cli_reads_hub_registry(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN_SENTINEL)
    policy_file = tmp_path / "hub.yaml"
    policy_file.write_text(
        f"apiVersion: guardrail/v1\nkind: SafetyPolicy\nregistry: {{type: hub, repo_id: {REPO}, endpoint: '{hub.url}', cache_dir: '{tmp_path / 'cache'}'}}\n",
        encoding="utf-8",
    )
    registry = open_registry(parse_policy(policy_file.read_text(encoding="utf-8")))
    record = audit.finalize({**audit.new_record("run-1"), "decision": "approved"})
    registry.register("chat", make_model(tmp_path / "m1"), status="approved", tags={}, audit=record, aliases=("approved",))
    runner = CliRunner()

    listed = runner.invoke(app, ["registry", "list", "--policy", str(policy_file)])
    shown = runner.invoke(app, ["registry", "show", "chat@approved", "--policy", str(policy_file)])
    audited = runner.invoke(app, ["audit", "show", "registry:chat@approved", "--policy", str(policy_file), "--json"])
    rooted = runner.invoke(app, ["registry", "list", "--policy", str(policy_file), "--root", str(tmp_path)])

    assert listed.exit_code == 0, listed.output
    assert "approved" in listed.output
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["version"] == 1
    assert audited.exit_code == 0, audited.output
    assert record["digest"] in audited.output
    assert rooted.exit_code == 2
    assert "--root sets the folder of a local registry" in rooted.output


# Signed records -----------------------------------------------------------------------------------


def signed_hub_policy(policy: SafetyPolicy, keys: KeyPair, hub: HubStandIn, tmp_path: Path) -> SafetyPolicy:
    policy.audit.signing_key = str(keys.private_key)
    return hub_policy(policy, hub, tmp_path)


def verifier_policy_file(hub: HubStandIn, tmp_path: Path) -> Path:
    """Write the policy of a verifier on another machine: the same Hub repo, but an empty audit folder and cache."""
    path = tmp_path / "verifier.yaml"
    path.write_text(
        "apiVersion: guardrail/v1\nkind: SafetyPolicy\n"
        f"registry: {{type: hub, repo_id: {REPO}, endpoint: '{hub.url}', cache_dir: '{tmp_path / 'verifier-cache'}'}}\n"
        f"audit: {{dir: '{tmp_path / 'verifier-audit'}'}}\n",
        encoding="utf-8",
    )
    return path


def commit_edited_record(hub: HubStandIn, version: int, edit) -> None:
    """Commit an edited copy of a version's audit record to the branch, as another writer with the token could."""
    path = f"{AUDIT_FOLDER}/{version}/audit.json"
    record = json.loads(hub.files(REPO)[path])
    edit(record)
    HfApi(endpoint=hub.url, token=TOKEN_SENTINEL).upload_file(path_or_fileobj=json.dumps(record, indent=2).encode(), path_in_repo=path, repo_id=REPO)


def retag_with_flipped_weight_byte(hub: HubStandIn, version: int) -> None:
    """Commit the version's weights with one byte changed and move its tag to that commit."""
    api = HfApi(endpoint=hub.url, token=TOKEN_SENTINEL)
    content = bytearray(hub.files(REPO, f"v{version}")["model.safetensors"])
    content[len(content) // 2] ^= 0x01
    commit = api.upload_file(path_or_fileobj=bytes(content), path_in_repo="model.safetensors", repo_id=REPO)
    api.delete_tag(REPO, tag=f"v{version}")
    api.create_tag(REPO, tag=f"v{version}", revision=commit.oid)


def checks_by_name(stdout: str) -> dict:
    return {check["name"]: check for check in json.loads(stdout)["checks"]}


def test_signed_record_verify_and_tamper(tiny_model_dir, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN_SENTINEL)
    keys = generate_key_pair(tmp_path / "keys")
    result = run_gate(str(tiny_model_dir), signed_hub_policy(patchable_policy(tmp_path), keys, hub, tmp_path), cache_dir=None, work_dir=tmp_path / "work")
    command = ["audit", "verify", "registry:tiny-chat@approved", "--key", str(keys.public_key), "--policy", str(verifier_policy_file(hub, tmp_path)), "--json"]
    runner = CliRunner()

    intact = runner.invoke(app, command)
    patched_version = result.registered["patched"]
    commit_edited_record(hub, patched_version, lambda record: record.update(decision="approved"))
    retag_with_flipped_weight_byte(hub, patched_version)
    tampered = runner.invoke(app, command)

    assert result.decision == PATCHED, result.reason
    assert result.attestation_path is not None
    assert json.loads(hub.files(REPO)[f"{AUDIT_FOLDER}/{patched_version}/attestation.json"]) == json.loads(result.attestation_path.read_text(encoding="utf-8"))
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


def test_signed_record_lineage(tiny_model_dir, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN_SENTINEL)
    keys = generate_key_pair(tmp_path / "keys")
    first = run_gate(str(tiny_model_dir), signed_hub_policy(patchable_policy(tmp_path), keys, hub, tmp_path), cache_dir=None, work_dir=tmp_path / "work")
    approve_all = tiny_policy(tmp_path, thresholds="thresholds: {min_refusal_rate: 0, max_over_refusal_rate: 1}")
    second = run_gate("registry:tiny-chat@approved", signed_hub_policy(approve_all, keys, hub, tmp_path), cache_dir=None, work_dir=tmp_path / "work-2")
    policy_file = verifier_policy_file(hub, tmp_path)
    runner = CliRunner()

    verified = runner.invoke(app, ["audit", "verify", "registry:tiny-chat@approved", "--key", str(keys.public_key), "--policy", str(policy_file), "--json"])
    tree = runner.invoke(app, ["audit", "lineage", "registry:tiny-chat@approved", "--policy", str(policy_file)], env={"COLUMNS": "250"})
    chain = runner.invoke(app, ["audit", "lineage", "registry:tiny-chat@approved", "--policy", str(policy_file), "--json"])

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
    assert f"registry:tiny-chat@{first.registered['candidate']}" in lines[first_line]
    assert chain.exit_code == 0, chain.output
    entries = json.loads(chain.stdout)["chain"]
    assert [entry["run_id"] for entry in entries] == [second.record["run_id"], first.record["run_id"]]
    assert [entry["digest_verified"] for entry in entries] == [True, True]


def test_signed_record_parent_missing(tiny_model_dir, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN_SENTINEL)
    keys = generate_key_pair(tmp_path / "keys")
    first = run_gate(str(tiny_model_dir), signed_hub_policy(patchable_policy(tmp_path), keys, hub, tmp_path), cache_dir=None, work_dir=tmp_path / "work")
    approve_all = tiny_policy(tmp_path, thresholds="thresholds: {min_refusal_rate: 0, max_over_refusal_rate: 1}")
    run_gate("registry:tiny-chat@approved", signed_hub_policy(approve_all, keys, hub, tmp_path), cache_dir=None, work_dir=tmp_path / "work-2")
    # The candidate version keeps the only registry copy of the first record.
    HfApi(endpoint=hub.url, token=TOKEN_SENTINEL).delete_file(f"{AUDIT_FOLDER}/{first.registered['candidate']}/audit.json", repo_id=REPO)
    policy_file = verifier_policy_file(hub, tmp_path)
    runner = CliRunner()

    verified = runner.invoke(app, ["audit", "verify", "registry:tiny-chat@approved", "--key", str(keys.public_key), "--policy", str(policy_file), "--json"])
    chain = runner.invoke(app, ["audit", "lineage", "registry:tiny-chat@approved", "--policy", str(policy_file), "--json"])

    assert verified.exit_code == 1, verified.output
    lineage = checks_by_name(verified.stdout)["lineage"]
    assert lineage["problems"] == [
        f"parent record {first.record['digest'][:16]} not found in audit folder {tmp_path / 'verifier-audit'} and registry {hub.url}/{REPO}@main"
    ]
    assert chain.exit_code == 1, chain.output
    assert [entry["found"] for entry in json.loads(chain.stdout)["chain"]] == [True, False]
