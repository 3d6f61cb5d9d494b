"""``safety_gate``: the guardrail gate as a Prefect 3 flow.

Each task calls one step of ``guardrail.gate`` and passes the path of the
gate state (``<work_dir>/state.json``) to the next, so tasks exchange paths
and JSON values and never live models. Call ``safety_gate`` as a subflow
after a fine-tuning flow. It returns the outcome when the candidate is
approved or patched, and it raises ``ModelBlockedError`` when the gate
blocks, so both the subflow and its parent end Failed.

Task caching is off (``NO_CACHE``), because every step rewrites the same
state file. guardrail's own evaluation cache (``cache_dir``) is keyed on the
model digest and the policy, and skips repeated evaluations.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from guardrail import audit
from guardrail.errors import GuardrailError, RegistryError
from guardrail.gate import (
    ACTION_PATCH,
    BLOCKED,
    STATE_FILE,
    decide_step,
    evaluate_step,
    fail_step,
    finish_step,
    patch_step,
    start_step,
    verify_step,
)
from guardrail.policy import SafetyPolicy, load_policy

FLOW_NAME = "guardrail-safety-gate"


class ModelBlockedError(Exception):
    """The gate blocked the candidate; the audit record contains the reason."""


def is_storage_error(task: Any, task_run: Any, state: Any) -> bool:
    """Return True when a failed task run raised a registry or file-system error, which a retry may fix."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, (RegistryError, OSError))


@task(name="load-policy", task_run_name="load-policy", cache_policy=NO_CACHE)
def validate_policy(policy_path: str) -> dict[str, Any]:
    """Load and validate the policy file; return it as JSON."""
    return load_policy(policy_path).model_dump(mode="json")


@task(name="start-gate", task_run_name="start-gate", cache_policy=NO_CACHE)
def start_gate(candidate: str, policy: dict[str, Any], policy_path: str, reference: Optional[str], work_dir: str, cache_dir: Optional[str]) -> str:
    """Open the gate state in ``work_dir`` and return its path."""
    state_path = start_step(
        candidate,
        SafetyPolicy.model_validate(policy),
        reference,
        work_dir=Path(work_dir),
        policy_source=policy_path,
        cache_dir=Path(cache_dir) if cache_dir else None,
    )
    return str(state_path)


@task(name="evaluate", task_run_name="evaluate-{role}", cache_policy=NO_CACHE)
def evaluate(state_path: str, role: str) -> str:
    """Evaluate the candidate or the reference; return the state's path."""
    return str(evaluate_step(state_path, role))


@task(name="decide", task_run_name="decide", cache_policy=NO_CACHE)
def decide(state_path: str) -> str:
    """Compare the candidate with the policy; return "approve", "patch" or "block"."""
    return decide_step(state_path)


@task(name="realign", task_run_name="realign", cache_policy=NO_CACHE)
def realign(state_path: str) -> bool:
    """Patch the candidate with one safety example; return True when a patched model was saved."""
    return patch_step(state_path)


@task(name="verify", task_run_name="verify", cache_policy=NO_CACHE)
def verify(state_path: str) -> bool:
    """Verify the patched model; return True when it meets every threshold."""
    return verify_step(state_path)


@task(name="register", task_run_name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=is_storage_error)
def register(state_path: str) -> dict[str, Any]:
    """Write the decision to the registry and write the audit record; return the outcome as JSON.

    Retried on registry and file-system errors only. finish_step rolls the
    registry back on a failure, so a retry starts from the same registry.
    """
    result = finish_step(state_path)
    return {
        "run_id": result.record["run_id"],
        "decision": result.decision,
        "reason": result.reason,
        "exit_code": result.exit_code,
        "audit_path": str(result.audit_path),
        "attestation_path": str(result.attestation_path) if result.attestation_path else None,
        "registered": result.registered,
    }


@task(name="record-failure", task_run_name="record-failure", cache_policy=NO_CACHE)
def record_failure(state_path: str, error: str) -> str:
    """Write the audit record of a run that stopped on an error; return its path."""
    return str(fail_step(state_path, error))


@task(name="publish-report", task_run_name="publish-report", cache_policy=NO_CACHE)
def publish_report(audit_path: str) -> None:
    """Publish the audit summary as a Markdown artifact and the per-category refusal rates as a table artifact."""
    record = audit.read_record(audit_path)
    markdown = f"{audit.summary_markdown(record)}\n\nAudit record: `{audit_path}`\n"
    create_markdown_artifact(markdown, key="guardrail-gate-summary", description=f"guardrail gate run {record['run_id']}")
    create_table_artifact(
        per_category_rows(record),
        key="guardrail-refusal-by-category",
        description="Refusal rate on harmful probes per harm category, for each evaluated model",
    )


def per_category_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Return one row per harm category with the refusal rate of each evaluated model."""
    figures = record.get("figures") or {}
    roles = [role for role in ("reference", "candidate", "patched") if role in figures]
    categories = sorted({category for role in roles for category in figures[role]["per_category"]})
    return [{"category": category, **{role: figures[role]["per_category"].get(category) for role in roles}} for category in categories]


@flow(name=FLOW_NAME, log_prints=True)
def safety_gate(
    candidate: str,
    policy_path: str,
    reference: Optional[str] = None,
    work_dir: Optional[str] = None,
    cache_dir: Optional[str] = ".guardrail/cache",
    keep_work_dir: bool = False,
) -> dict[str, Any]:
    """Evaluate, patch when needed, verify, register and audit a candidate model.

    Args:
        candidate: Model folder, ``.gguf`` file, adapter, Hub repo id or ``registry:<name>@<alias>``.
        policy_path: Policy YAML file.
        reference: Safety-aligned model to compare with (same forms as ``candidate``).
        work_dir: Folder for the gate state and the patched model before registration;
            defaults to a new folder under ``.guardrail/work``.
        cache_dir: Folder for cached evaluations; None disables the cache.
        keep_work_dir: Keep the work folder afterwards, for debugging.

    Returns:
        The outcome: run_id, decision ("approved" or "patched"), reason, exit_code, audit_path, registered.

    Raises:
        GuardrailError: Bad input or environment; the audit record is written first when the gate state exists.
        ModelBlockedError: The gate blocked the candidate.
    """
    logger = get_run_logger()
    folder = Path(work_dir) if work_dir else Path(".guardrail/work") / audit.new_run_id()
    try:
        outcome = _run_steps(candidate, policy_path, reference, folder, cache_dir)
    except GuardrailError as exc:
        # start_step saves the state before it resolves registry references,
        # so a state file can exist even when the start task failed.
        if (folder / STATE_FILE).is_file():
            audit_path = record_failure(str(folder / STATE_FILE), str(exc))
            logger.error("The gate stopped on an error: %s; audit record %s", exc, audit_path)
        raise
    finally:
        if not keep_work_dir:
            shutil.rmtree(folder, ignore_errors=True)

    publish_report(outcome["audit_path"])
    logger.info("Gate decision: %s (%s); audit record %s", outcome["decision"], outcome["reason"], outcome["audit_path"])
    if outcome["decision"] == BLOCKED:
        raise ModelBlockedError(f"the gate blocked {candidate}: {outcome['reason']}; audit record {outcome['audit_path']}")
    return outcome


def _run_steps(candidate: str, policy_path: str, reference: Optional[str], folder: Path, cache_dir: Optional[str]) -> dict[str, Any]:
    """Call the gate steps in the order run_gate uses."""
    policy = validate_policy(policy_path)
    state_path = start_gate(candidate, policy, policy_path, reference, str(folder), cache_dir)
    if reference is not None:
        evaluate(state_path, "reference")
    evaluate(state_path, "candidate")
    if decide(state_path) == ACTION_PATCH and realign(state_path):
        verify(state_path)
    return register(state_path)
