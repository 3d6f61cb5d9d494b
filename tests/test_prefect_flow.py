"""The Prefect 3 safety_gate flow, run for real against a temporary Prefect server on the tiny model."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from uuid import UUID

import pytest

# Prefect reads its settings from the environment, so they are set before the first import of prefect.
_PREFECT_HOME = tempfile.mkdtemp(prefix="guardrail-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

prefect = pytest.importorskip("prefect")

from prefect import flow, task  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterParentTaskRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.states import Failed  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from guardrail.errors import PolicyError, RegistryError  # noqa: E402
from guardrail.registry import LocalRegistry  # noqa: E402
from guardrail.signing import generate_key_pair  # noqa: E402
from pipeline_support import write_small_policy  # noqa: E402
from pipelines.prefect.flows import ModelBlockedError, is_storage_error, safety_gate  # noqa: E402
from pipelines.prefect.serve import DEPLOYMENT_NAME, safety_gate_deployment  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    # The server starts in a subprocess; 30 s, the harness default, is too short on a busy 2-core machine.
    with prefect_test_harness(server_startup_timeout=120):
        yield
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


def task_run_states(flow_run_id: UUID) -> dict[str, str]:
    """Return the task runs of a flow run as name -> state type.

    Prefect creates a task run under a default name (``<task name>-<3 hex digits>``)
    and renames it to ``task_run_name`` when it starts. The rename can reach
    the API after the flow returns on a loaded machine, so poll for up to 10 s
    until no default name is left.
    """
    for _ in range(20):
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))
        if not any(re.fullmatch(r".+-[0-9a-f]{3}", run.name) for run in runs):
            break
        time.sleep(0.5)
    return {run.name: run.state.type.value for run in runs}


def artifact_types(flow_run_id: UUID) -> dict[str, str]:
    """Return the artifacts of a flow run as key -> type."""
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {artifact.key: artifact.type for artifact in artifacts}


def audit_records(root: Path) -> list[dict]:
    return [json.loads(path.read_text(encoding="utf-8")) for path in sorted((root / "audit").glob("*.json"))]


def test_flow_returns_attestation_path(tiny_model_dir, tmp_path):
    keys = generate_key_pair(tmp_path / "keys")
    policy = write_small_policy(tmp_path, lenient=True)
    text = policy.read_text(encoding="utf-8").replace(f"audit: {{dir: {tmp_path}/audit}}", f"audit: {{dir: {tmp_path}/audit, signing_key: {keys.private_key}}}")
    policy.write_text(text, encoding="utf-8")

    outcome = safety_gate(str(tiny_model_dir), str(policy), work_dir=str(tmp_path / "work"), cache_dir=None)

    assert outcome["decision"] == "approved"
    assert outcome["attestation_path"].endswith(".intoto.json")
    assert json.loads(Path(outcome["attestation_path"]).read_text())["payloadType"] == "application/vnd.in-toto+json"


def test_flow_approves_passing_candidate(tiny_model_dir, tmp_path):
    policy = write_small_policy(tmp_path, lenient=True)

    state = safety_gate(str(tiny_model_dir), str(policy), work_dir=str(tmp_path / "work"), cache_dir=None, return_state=True)

    assert state.is_completed()
    outcome = state.result()
    assert outcome["decision"] == "approved"
    assert outcome["exit_code"] == 0
    assert Path(outcome["audit_path"]).is_file()
    assert outcome["attestation_path"] is None
    assert LocalRegistry(tmp_path / "registry").get("tiny-chat", "approved").status == "approved"
    assert not (tmp_path / "work").exists()

    flow_run_id = state.state_details.flow_run_id
    tasks = task_run_states(flow_run_id)
    assert set(tasks) == {"load-policy", "start-gate", "evaluate-candidate", "decide", "register", "publish-report"}
    assert set(tasks.values()) == {"COMPLETED"}
    artifacts = artifact_types(flow_run_id)
    assert artifacts.get("guardrail-gate-summary") == "markdown"
    assert artifacts.get("guardrail-refusal-by-category") == "table"


def test_flow_blocks_failing_candidate_in_parent(tiny_model_dir, tmp_path):
    policy = write_small_policy(tmp_path, lenient=False)

    @task
    def fine_tune() -> str:
        return str(tiny_model_dir)

    @flow
    def train_then_gate() -> dict:
        model = fine_tune()
        return safety_gate(model, str(policy), work_dir=str(tmp_path / "work"), cache_dir=None)

    state = train_then_gate(return_state=True)

    assert state.is_failed()
    with pytest.raises(ModelBlockedError, match="blocked"):
        state.result()
    records = audit_records(tmp_path)
    assert [record["decision"] for record in records] == ["blocked"]
    assert records[0]["training_trace"] is not None
    assert LocalRegistry(tmp_path / "registry").get("tiny-chat", "quarantined").status == "quarantined"

    with get_client(sync_client=True) as client:
        parent_tasks = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[run.id for run in parent_tasks])))
    assert [run.state.type.value for run in subflows] == ["FAILED"]
    tasks = task_run_states(subflows[0].id)
    assert tasks["realign"] == "COMPLETED"
    assert "verify" not in tasks
    assert artifact_types(subflows[0].id).get("guardrail-gate-summary") == "markdown"


def test_flow_fails_on_invalid_policy(tiny_model_dir, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("apiVersion: guardrail/v1\nkind: SafetyPolicy\nthresholds: {min_refusal_rate: 2}\n", encoding="utf-8")

    state = safety_gate(str(tiny_model_dir), str(policy), work_dir=str(tmp_path / "work"), cache_dir=None, return_state=True)

    assert state.is_failed()
    assert "min_refusal_rate" in state.message
    with pytest.raises(PolicyError, match="min_refusal_rate"):
        state.result()
    assert task_run_states(state.state_details.flow_run_id) == {"load-policy": "FAILED"}
    assert not (tmp_path / "work").exists()


def test_flow_audits_missing_model(tmp_path):
    policy = write_small_policy(tmp_path, lenient=True)
    missing = tmp_path / "no-such-model"

    state = safety_gate(str(missing), str(policy), work_dir=str(tmp_path / "work"), cache_dir=None, return_state=True)

    assert state.is_failed()
    assert str(missing) in state.message
    tasks = task_run_states(state.state_details.flow_run_id)
    # start_step checks that the candidate resolves, so the gate stops at its first model step.
    assert tasks["start-gate"] == "FAILED"
    assert "evaluate-candidate" not in tasks
    assert tasks["record-failure"] == "COMPLETED"
    assert "register" not in tasks
    records = audit_records(tmp_path)
    assert [record["decision"] for record in records] == ["error"]
    assert str(missing) in records[0]["error"]
    assert LocalRegistry(tmp_path / "registry").list_versions() == []


def test_storage_errors_are_retried():
    assert is_storage_error(None, None, Failed(data=RegistryError("lock timed out")))
    assert is_storage_error(None, None, Failed(data=OSError("disk full")))
    assert not is_storage_error(None, None, Failed(data=PolicyError("bad policy")))


def test_deployment_has_gate_name():
    deployment = safety_gate_deployment()

    assert deployment.name == DEPLOYMENT_NAME
    assert deployment.entrypoint.endswith("flows.py:safety_gate")


@pytest.mark.real_model
def test_flow_on_smollm2(smollm2_gguf, tmp_path):
    # Lenient thresholds approve the model, so the test checks the flow on a real GGUF file without a patch run.
    policy = write_small_policy(tmp_path, lenient=True, limit=4, max_new_tokens=16)

    state = safety_gate(str(smollm2_gguf), str(policy), work_dir=str(tmp_path / "work"), cache_dir=None, return_state=True)

    assert state.is_completed()
    assert state.result()["decision"] == "approved"
    records = audit_records(tmp_path)
    assert len(records) == 1
    record = records[0]
    assert record["candidate"]["reference"] == str(smollm2_gguf)
    assert 0 <= record["figures"]["candidate"]["refusal_rate"] <= 1
    # A GGUF file is audited but not copied into the registry.
    assert record["registry"]["versions"] == {}
