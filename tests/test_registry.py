"""Tests for the local model registry on real folders with real safetensors files."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from guardrail.errors import RegistryError
from guardrail.hashing import sha256_file
from guardrail.registry import LocalRegistry, parse_reference, validate_name


def make_model(folder: Path, value: float = 0.0) -> Path:
    """Write a small model folder: one safetensors file whose content depends on ``value``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"weight": torch.full((4, 4), value)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "value": value}), encoding="utf-8")
    return folder


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Return every file under ``root`` (except the lock) with its bytes, for exact comparison."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != ".lock"
    }


def tree_dirs(root: Path) -> list[str]:
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_dir())


@pytest.fixture
def registry(tmp_path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "registry", lock_timeout=30)


def test_register_first_version(registry, tmp_path):
    model = make_model(tmp_path / "m1", 1.0)
    version = registry.register("chat", model, status="candidate", tags={"team": "a"}, aliases=("candidate",))
    assert version.version == 1
    assert version.status == "candidate"
    assert version.aliases == ["candidate"]
    assert version.tags == {"team": "a"}
    assert version.files["model.safetensors"] == sha256_file(model / "model.safetensors")
    assert set(version.files) == {"model.safetensors", "config.json"}
    assert len(version.model_digest) == 64
    stored = registry.model_path("chat", "1")
    assert (stored / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()


def test_register_missing_folder(registry, tmp_path):
    with pytest.raises(RegistryError, match="not found"):
        registry.register("chat", tmp_path / "absent", status="candidate", tags={})
    assert registry.list_versions() == []


def test_aliases_move(registry, tmp_path):
    registry.register("chat", make_model(tmp_path / "m1", 1.0), status="approved", tags={}, aliases=("approved", "candidate"))
    registry.register("chat", make_model(tmp_path / "m2", 2.0), status="candidate", tags={}, aliases=("candidate",))
    assert registry.get("chat", "candidate").version == 2
    assert registry.get("chat", "approved").version == 1
    assert registry.get("chat", "1").aliases == ["approved"]
    registry.set_alias("chat", "approved", 2)
    assert registry.get("chat", "approved").version == 2
    assert registry.get("chat", "1").aliases == []
    aliases = json.loads((registry.root / "chat" / "aliases.json").read_text(encoding="utf-8"))
    assert aliases == {"approved": 2, "candidate": 2}


def test_set_alias_unknown_version(registry, tmp_path):
    registry.register("chat", make_model(tmp_path / "m1"), status="candidate", tags={})
    with pytest.raises(RegistryError, match="no version 7"):
        registry.set_alias("chat", "approved", 7)


def test_get_by_number_alias_latest(registry, tmp_path):
    for index in range(3):
        registry.register("chat", make_model(tmp_path / f"m{index}", float(index)), status="candidate", tags={}, aliases=("first",) if index == 0 else ())
    assert registry.get("chat", "2").version == 2
    assert registry.get("chat", "first").version == 1
    assert registry.get("chat", "latest").version == 3
    assert registry.get("chat").version == 3
    assert registry.model_path("chat", "latest") == registry.root / "chat" / "versions" / "3" / "model"


@pytest.mark.parametrize(("selector", "message"), [("9", "no version 9"), ("missing", "no alias 'missing'")])
def test_get_unknown_selector(registry, tmp_path, selector, message):
    registry.register("chat", make_model(tmp_path / "m1"), status="candidate", tags={})
    with pytest.raises(RegistryError, match=message):
        registry.get("chat", selector)


def test_get_unknown_model(registry):
    with pytest.raises(RegistryError, match="'ghost' is not in registry"):
        registry.get("ghost")


def test_same_content_reuses_version(registry, tmp_path):
    first = registry.register("chat", make_model(tmp_path / "a", 1.0), status="candidate", tags={"run": "1"}, aliases=("candidate",))
    again = registry.register("chat", make_model(tmp_path / "b", 1.0), status="approved", tags={"run": "2"}, aliases=("approved",))
    assert again.version == first.version == 1
    assert again.status == "approved"
    assert again.tags == {"run": "2"}
    assert again.aliases == ["approved", "candidate"]
    assert [entry.version for entry in registry.list_versions("chat")] == [1]


def test_same_content_other_name(registry, tmp_path):
    model = make_model(tmp_path / "a", 1.0)
    registry.register("chat", model, status="candidate", tags={})
    other = registry.register("chat-2", model, status="candidate", tags={})
    assert other.version == 1
    assert [entry.name for entry in registry.list_versions()] == ["chat", "chat-2"]


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", ".hidden", "a..b", "x" * 129, "white space", "a\\b"])
def test_invalid_name_raises(registry, tmp_path, name):
    model = make_model(tmp_path / "m1")
    with pytest.raises(RegistryError, match="invalid model name"):
        registry.register(name, model, status="candidate", tags={})
    assert not (tmp_path / "x").exists()
    assert registry.list_versions() == []


def test_invalid_alias_raises(registry, tmp_path):
    with pytest.raises(RegistryError, match="invalid alias"):
        registry.register("chat", make_model(tmp_path / "m1"), status="candidate", tags={}, aliases=("../approved",))
    assert registry.list_versions() == []


def test_validate_name_accepts():
    assert validate_name("SmolLM2-135M_v1.2") == "SmolLM2-135M_v1.2"


def test_parse_reference():
    assert parse_reference("registry:chat@approved") == ("chat", "approved")
    assert parse_reference("registry:chat") == ("chat", "latest")
    assert parse_reference("org/model") is None
    with pytest.raises(RegistryError):
        parse_reference("registry:../chat@1")


def test_transaction_rolls_back(registry, tmp_path):
    registry.register("chat", make_model(tmp_path / "m1", 1.0), status="approved", tags={}, aliases=("approved", "candidate"))
    files_before = tree_bytes(registry.root)
    dirs_before = tree_dirs(registry.root)

    with pytest.raises(RuntimeError, match="boom"):
        with registry.transaction("chat"):
            registry.register("chat", make_model(tmp_path / "m2", 2.0), status="candidate", tags={}, aliases=("candidate",))
            registry.set_status("chat", 1, "quarantined", aliases=("quarantined",), tags={"reason": "test"})
            registry.attach_audit("chat", 1, {"digest": "d" * 64, "run_id": "r"})
            assert registry.get("chat", "candidate").version == 2
            raise RuntimeError("boom")

    assert tree_bytes(registry.root) == files_before
    assert tree_dirs(registry.root) == dirs_before
    assert registry.get("chat", "latest").version == 1
    assert registry.audit_record("chat", "1") is None


def test_transaction_commits(registry, tmp_path):
    with registry.transaction("chat"):
        registry.register("chat", make_model(tmp_path / "m1", 1.0), status="candidate", tags={}, aliases=("candidate",))
        registry.register("chat", make_model(tmp_path / "m2", 2.0), status="approved", tags={}, aliases=("approved",))
    assert [entry.version for entry in registry.list_versions("chat")] == [1, 2]
    assert registry.get("chat", "approved").version == 2


def test_attach_audit(registry, tmp_path):
    registry.register("chat", make_model(tmp_path / "m1"), status="candidate", tags={})
    record = {"digest": "a" * 64, "run_id": "run-1"}
    registry.attach_audit("chat", 1, record)
    version = registry.get("chat", "1")
    assert version.audit_digest == "a" * 64
    assert version.tags["guardrail.audit_digest"] == "a" * 64
    assert version.status == "candidate"
    assert registry.audit_record("chat", "1") == record


def test_failed_copy_unchanged(registry, tmp_path, monkeypatch):
    registry.register("chat", make_model(tmp_path / "m1", 1.0), status="approved", tags={}, aliases=("approved",))
    files_before = tree_bytes(registry.root)
    dirs_before = tree_dirs(registry.root)

    def failing_copytree(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copytree", failing_copytree)
    with pytest.raises(RegistryError, match="No space left on device"):
        registry.register("chat", make_model(tmp_path / "m2", 2.0), status="candidate", tags={}, aliases=("approved",))

    assert tree_bytes(registry.root) == files_before
    assert tree_dirs(registry.root) == dirs_before
    assert registry.get("chat", "approved").version == 1


def test_vanishing_model_folder(registry, tmp_path, monkeypatch):
    """A model folder deleted between the digest and the copy fails cleanly."""
    registry.register("chat", make_model(tmp_path / "m1", 1.0), status="approved", tags={}, aliases=("approved",))
    files_before = tree_bytes(registry.root)
    dirs_before = tree_dirs(registry.root)
    model = make_model(tmp_path / "m2", 2.0)
    real_copytree = shutil.copytree

    def copy_after_delete(source, destination, *args, **kwargs):
        shutil.rmtree(model)
        return real_copytree(source, destination, *args, **kwargs)

    monkeypatch.setattr(shutil, "copytree", copy_after_delete)
    with pytest.raises(RegistryError, match="the registry is unchanged"):
        registry.register("chat", model, status="candidate", tags={}, aliases=("approved",))

    assert tree_bytes(registry.root) == files_before
    assert tree_dirs(registry.root) == dirs_before


def test_lock_timeout(tmp_path):
    from filelock import FileLock

    root = tmp_path / "registry"
    root.mkdir()
    holder = FileLock(str(root / ".lock"))
    holder.acquire()
    try:
        # A second FileLock object on the same path in this process does not
        # re-enter the first one's lock, so it times out like another process.
        registry = LocalRegistry(root, lock_timeout=0.2)
        with pytest.raises(RegistryError, match="locked by another writer"):
            registry.register("chat", make_model(tmp_path / "m1"), status="candidate", tags={})
    finally:
        holder.release()


def _register_three(root: str, models: list[str], results) -> None:
    registry = LocalRegistry(root, lock_timeout=60)
    for model in models:
        version = registry.register("chat", Path(model), status="candidate", tags={"model": model}, aliases=("candidate",))
        results.put((model, version.version))


def test_concurrent_processes(tmp_path):
    root = tmp_path / "registry"
    groups = [[str(make_model(tmp_path / f"p{worker}-{index}", float(10 * worker + index))) for index in range(3)] for worker in range(2)]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_register_three, args=(str(root), group, results)) for group in groups]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]

    outcomes = dict(results.get(timeout=5) for _ in range(6))
    registry = LocalRegistry(root)
    versions = registry.list_versions("chat")
    assert [entry.version for entry in versions] == [1, 2, 3, 4, 5, 6]
    assert sorted(outcomes.values()) == [1, 2, 3, 4, 5, 6]
    assert len({entry.model_digest for entry in versions}) == 6
    assert {entry.tags["model"]: entry.version for entry in versions} == outcomes
    aliases = json.loads((root / "chat" / "aliases.json").read_text(encoding="utf-8"))
    assert aliases["candidate"] in range(1, 7)
    assert not [path for path in (root / "chat" / "versions").iterdir() if path.name.startswith(".")]
