"""The KFP v2 pipeline: the committed YAML matches the code, and kfp.local runs each branch on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

kfp = pytest.importorskip("kfp")

from kfp import local  # noqa: E402

from guardrail.registry import LocalRegistry  # noqa: E402
from pipeline_support import write_small_policy  # noqa: E402
from pipelines.kfp.pipeline import COMPONENTS, COMPONENTS_FOLDER, PIPELINE_YAML, compile_all, safety_gate_pipeline  # noqa: E402

# kfp.local warns on every task that it does not use the project image, and that display names have no effect locally.
pytestmark = [
    pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner:UserWarning"),
]

# Fields that change with the kfp release that compiled the file, not with the pipeline.
VOLATILE_KEYS = {"sdkVersion"}


def load_compiled(path: Path) -> dict:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {key: value for key, value in document.items() if key not in VOLATILE_KEYS}


def run_pipeline(root: Path, candidate: Path, policy: Path) -> set[str]:
    """Run the pipeline under kfp.local and return the names of the tasks that finished."""
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "kfp"))
    safety_gate_pipeline(candidate=str(candidate), policy_path=str(policy), work_dir=str(root / "work"))
    return tasks_run(root)


def tasks_run(root: Path) -> set[str]:
    """Return the names of the tasks that finished; kfp.local writes each one's executor_output.json."""
    return {output.parent.name for output in (root / "kfp").glob("*/*/executor_output.json")}


def audit_records(root: Path) -> list[dict]:
    return [json.loads(path.read_text(encoding="utf-8")) for path in sorted((root / "audit").glob("*.json"))]


def exit_task_output(root: Path) -> str:
    [output] = (root / "kfp").glob("*/audit-on-exit/executor_output.json")
    return json.loads(output.read_text(encoding="utf-8"))["parameterValues"]["Output"]


def test_committed_pipeline_yaml_is_current(tmp_path):
    compile_all(tmp_path / "pipeline.yaml", tmp_path / "components")

    assert load_compiled(PIPELINE_YAML) == load_compiled(tmp_path / "pipeline.yaml"), "run `python -m pipelines.kfp.pipeline`"
    for name in COMPONENTS:
        committed = COMPONENTS_FOLDER / f"{name}.yaml"
        assert committed.is_file(), f"{committed} is missing; run `python -m pipelines.kfp.pipeline`"
        assert load_compiled(committed) == load_compiled(tmp_path / "components" / f"{name}.yaml"), f"{committed} is stale"


def test_component_yaml_loads():
    from kfp.components import load_component_from_file

    component = load_component_from_file(str(COMPONENTS_FOLDER / "evaluate.yaml"))

    assert component.name == "evaluate"
    assert set(component.component_spec.inputs) == {"state_path", "role"}
    assert set(component.component_spec.outputs) == {"metrics", "Output"}


def test_pipeline_approves_through_direct_branch(tiny_model_dir, tmp_path):
    policy = write_small_policy(tmp_path, lenient=True)

    ran = run_pipeline(tmp_path, tiny_model_dir, policy)

    assert "realign" not in ran
    assert "verify" not in ran
    assert {"start-gate", "decide", "register-2", "report", "audit-on-exit"} <= ran
    records = audit_records(tmp_path)
    assert [record["decision"] for record in records] == ["approved"]
    assert records[0]["training_trace"] is None
    assert LocalRegistry(tmp_path / "registry").get("tiny-chat", "approved").status == "approved"
    summary = next((tmp_path / "kfp").glob("*/report/summary"))
    assert "APPROVED" in summary.read_text(encoding="utf-8")


def test_pipeline_blocks_through_patch_branch(tiny_model_dir, tmp_path):
    policy = write_small_policy(tmp_path, lenient=False)

    with pytest.raises(RuntimeError, match="require-approval"):
        run_pipeline(tmp_path, tiny_model_dir, policy)

    ran = tasks_run(tmp_path)
    assert {"realign", "verify", "register", "report"} <= ran
    assert "register-2" not in ran
    records = audit_records(tmp_path)
    assert [record["decision"] for record in records] == ["blocked"]
    assert records[0]["training_trace"] is not None
    assert LocalRegistry(tmp_path / "registry").get("tiny-chat", "quarantined").status == "quarantined"
    assert exit_task_output(tmp_path) == records[0]["run_id"]


def test_exit_task_audits_missing_model(tmp_path):
    policy = write_small_policy(tmp_path, lenient=True)

    with pytest.raises(RuntimeError, match="start-gate"):
        run_pipeline(tmp_path, tmp_path / "no-such-model", policy)

    records = audit_records(tmp_path)
    assert [record["decision"] for record in records] == ["error"]
    assert str(tmp_path / "no-such-model") in records[0]["error"]
    assert exit_task_output(tmp_path) == records[0]["run_id"]
    assert LocalRegistry(tmp_path / "registry").list_versions() == []


def test_invalid_policy_fails_first_task(tiny_model_dir, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("apiVersion: guardrail/v1\nkind: SafetyPolicy\nthresholds: {min_refusal_rate: 2}\n", encoding="utf-8")

    with pytest.raises(RuntimeError, match="start-gate"):
        run_pipeline(tmp_path, tiny_model_dir, policy)

    assert exit_task_output(tmp_path) == ""
    assert not (tmp_path / "work").exists()
