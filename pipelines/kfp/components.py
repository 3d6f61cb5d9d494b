"""Kubeflow Pipelines v2 components, one per gate step.

Each component is a lightweight Python component that imports
``guardrail.gate`` inside its body and calls one step. The components run in
``GUARDRAIL_IMAGE``, which already contains guardrail and kfp, so
``install_kfp_package=False`` keeps them from installing anything at start-up.

The gate state travels between components as a path string, not as an
artifact. The state (``<work_dir>/state.json``) stores absolute paths to
its evaluations and to the patched model, so a copy of the work folder in
another place would still point at the original folder. The local registry
and the audit folder named in the policy also have to be on storage that
every component can read and write. On a cluster, mount one ReadWriteMany volume at the same
path in every task (``kfp.kubernetes.mount_pvc``) and put the work folder,
the policy, the models, the registry and the audit folder on it. Under
``kfp.local.SubprocessRunner`` every component shares the local file system,
so any local path works.

The typed outputs are copies for the KFP UI and lineage: the patched model
folder as ``dsl.Model``, the figures as ``dsl.Metrics`` and the audit
summary as ``dsl.Markdown``.
"""

import functools

from kfp import dsl
from kfp.dsl import Markdown, Metrics, Model, Output, PipelineTaskFinalStatus

#: Container image with guardrail installed; built from the repository's Dockerfile.
GUARDRAIL_IMAGE = "ghcr.io/guardrail-ml/guardrail:0.1.0"

component = functools.partial(dsl.component, base_image=GUARDRAIL_IMAGE, install_kfp_package=False)


@component
def start_gate(candidate: str, policy_path: str, work_dir: str, reference: str = "", cache_dir: str = "") -> str:
    """Load and validate the policy, open the gate state in ``work_dir`` and return the state's path.

    An empty ``reference`` means no reference model; an empty ``cache_dir`` disables the evaluation cache.
    """
    from pathlib import Path

    from guardrail.errors import GuardrailError
    from guardrail.gate import STATE_FILE, fail_step, start_step
    from guardrail.policy import load_policy

    policy = load_policy(policy_path)
    try:
        state_path = start_step(
            candidate,
            policy,
            reference or None,
            work_dir=Path(work_dir),
            policy_source=policy_path,
            cache_dir=Path(cache_dir) if cache_dir else None,
        )
    except GuardrailError as exc:
        # start_step saves the state before it resolves registry references.
        if (Path(work_dir) / STATE_FILE).is_file():
            fail_step(Path(work_dir) / STATE_FILE, str(exc))
        raise
    return str(state_path)


@component
def evaluate(state_path: str, role: str, metrics: Output[Metrics]) -> str:
    """Evaluate the candidate or the reference, log its figures and return the state's path.

    The reference evaluation does nothing when the gate has no reference, so
    the pipeline can always run it and keep the steps in order.
    """
    from guardrail.errors import GuardrailError
    from guardrail.gate import GateState, evaluate_step, fail_step

    if role == "reference" and GateState.load(state_path).reference_path is None:
        print("The gate has no reference model; skipping the reference evaluation")
        return state_path
    try:
        evaluate_step(state_path, role)
    except GuardrailError as exc:
        fail_step(state_path, str(exc))
        raise
    figures = GateState.load(state_path).record["figures"][role]
    metrics.log_metric("refusal_rate", figures["refusal_rate"])
    metrics.log_metric("over_refusal_rate", figures["over_refusal_rate"])
    return state_path


@component
def decide(state_path: str) -> bool:
    """Compare the candidate with the policy; return True when the gate should patch it."""
    from guardrail.errors import GuardrailError
    from guardrail.gate import ACTION_PATCH, decide_step, fail_step

    try:
        return decide_step(state_path) == ACTION_PATCH
    except GuardrailError as exc:
        fail_step(state_path, str(exc))
        raise


@component
def realign(state_path: str, patched_model: Output[Model]) -> bool:
    """Patch the candidate with one safety example; return True when a patched model was saved.

    A saved patched model is also copied into the ``patched_model`` artifact.
    """
    import shutil

    from guardrail.errors import GuardrailError
    from guardrail.gate import GateState, fail_step, patch_step

    try:
        saved = patch_step(state_path)
    except GuardrailError as exc:
        fail_step(state_path, str(exc))
        raise
    if saved:
        state = GateState.load(state_path)
        shutil.copytree(str(state.patched_folder), patched_model.path)
        patched_model.metadata["gate_run_id"] = state.run_id
    return saved


@component
def verify(state_path: str, patch_saved: bool, metrics: Output[Metrics]) -> bool:
    """Verify the patched model and log its figures; return True when it meets every threshold.

    When the patch step saved no model (``patch_saved`` False) there is nothing
    to verify: the state already records the decision blocked, and this returns False.
    """
    from guardrail.errors import GuardrailError
    from guardrail.gate import GateState, fail_step, verify_step

    if not patch_saved:
        print("The patch step saved no model; nothing to verify")
        return False
    try:
        passed = verify_step(state_path)
    except GuardrailError as exc:
        fail_step(state_path, str(exc))
        raise
    figures = GateState.load(state_path).record["figures"]["patched"]
    metrics.log_metric("refusal_rate", figures["refusal_rate"])
    metrics.log_metric("over_refusal_rate", figures["over_refusal_rate"])
    metrics.log_metric("benign_kl", figures["benign_kl"])
    return passed


@component
def register(state_path: str) -> str:
    """Write the decision to the registry, write the audit record and return the decision.

    Unlike the other steps, a failure here is not audited in the component:
    the task is retried, and fail_step would overwrite the decision that the
    retry registers. The exit task audits the run if every attempt fails.
    """
    from guardrail.gate import finish_step

    result = finish_step(state_path)
    print(f"Gate decision: {result.decision} ({result.reason}); audit record {result.audit_path}")
    return result.decision


@component
def report(state_path: str, decision: str, summary: Output[Markdown], metrics: Output[Metrics]) -> str:
    """Publish the audit summary as Markdown and the final model's figures as metrics; return the decision."""
    from guardrail.audit import summary_markdown
    from guardrail.gate import GateState

    record = GateState.load(state_path).record
    with open(summary.path, "w", encoding="utf-8") as handle:
        handle.write(summary_markdown(record))
    final = "patched" if decision == "patched" else "candidate"
    figures = record["figures"][final]
    metrics.log_metric("refusal_rate", figures["refusal_rate"])
    metrics.log_metric("over_refusal_rate", figures["over_refusal_rate"])
    return decision


@component
def require_approval(decision: str) -> None:
    """Fail the task when the gate blocked the model, so the run ends as failed and nothing downstream deploys it."""
    if decision == "blocked":
        raise RuntimeError("the gate blocked the candidate; see the audit record and the gate summary")
    print(f"Gate decision: {decision}")


@component
def audit_on_exit(work_dir: str, status: PipelineTaskFinalStatus) -> str:
    """Exit task: audit a run that stopped before any step wrote its audit record.

    The step components audit their own GuardrailErrors with the library's
    message. This task covers the rest (a failed register step, a killed
    pod), and records the engine's error message, which kfp.local 2.17
    reduces to "Task exit-handler-1 failed.".

    Returns the gate run id, or an empty string when the run failed before a
    gate state existed (an invalid policy, say), because without the policy
    there is no audit folder to write to.
    """
    from pathlib import Path

    from guardrail.gate import STATE_FILE, GateState, fail_step

    state_file = Path(work_dir) / STATE_FILE
    if not state_file.is_file():
        print(f"No gate state at {state_file}; the run failed before the gate started ({status.state}): {status.error_message}")
        return ""
    state = GateState.load(state_file)
    if state.audit_path is not None:
        print(f"Gate run {state.run_id} already audited with decision {state.decision}: {state.audit_path}")
        return state.run_id
    error = status.error_message or f"pipeline task {status.pipeline_task_name} ended {status.state}"
    path = fail_step(state_file, error)
    print(f"Gate run {state.run_id} stopped on an error; audit record {path}")
    return state.run_id
