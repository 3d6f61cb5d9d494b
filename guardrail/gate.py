"""The safety gate: evaluate, patch when needed, verify, register, audit.

The gate sits between "fine-tune finished" and "model promoted":

1. evaluate the candidate (and the reference, when given) against the policy;
2. if the candidate passes, register it as approved;
3. if it fails and the policy action is ``patch``, run the one-shot realignment,
   then verify the patched model (full re-evaluation, benign KL, save and
   reload); if verified, register it as approved and mark the candidate
   quarantined;
4. otherwise block: the candidate is marked quarantined and nothing is approved.

The gate is a sequence of steps that share a :class:`GateState` saved as
``state.json`` in a work folder. Each step takes the state's path, loads the
models it needs from their folders, and saves the state again, so the
Prefect tasks and Kubeflow components in ``pipelines/`` call the same steps
as :func:`run_gate`, passing paths and never live models.

An audit record is written for every run, including runs that stop on an
error. When the policy names ``audit.signing_key``, each record is also signed
as an in-toto attestation (see :mod:`guardrail.attestation`). Registry writes
happen only in the last step, in one transaction, so an error anywhere leaves
the registry as it was.

Examples:
    >>> from guardrail.gate import run_gate
    >>> from guardrail.policy import load_policy
    >>> result = run_gate("models/my-finetune", load_policy("policies/default.yaml"), reference="models/aligned")
    >>> result.decision, result.exit_code
    ('patched', 3)
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, Field

from guardrail import __version__, attestation, attestation_checks, audit, lineage, signing
from guardrail.errors import AuditError, GuardrailError
from guardrail.evaluation import ProgressCallback, check_thresholds, decoding_settings, evaluate_model, load_probes
from guardrail.hashing import sha256_json
from guardrail.loading import LoadedModel, check_reference, load_model
from guardrail.policy import SafetyPolicy
from guardrail.realignment import realign, screen_targets
from guardrail.registry import Registry, open_registry, parse_reference
from guardrail.files import atomic_write_text
from guardrail.report import ModelEvaluation
from guardrail.verification import save_and_reload, verify

logger = logging.getLogger(__name__)

APPROVED = "approved"
PATCHED = "patched"
BLOCKED = "blocked"
ERROR = "error"
QUARANTINED = "quarantined"

EXIT_CODES = {APPROVED: 0, BLOCKED: 1, ERROR: 2, PATCHED: 3}

#: Actions :func:`decide_step` can return.
ACTION_APPROVE, ACTION_PATCH, ACTION_BLOCK = "approve", "patch", "block"

#: Called with a short description of each gate stage as it starts.
StageCallback = Callable[[str], None]

STATE_FILE = "state.json"


class GateState(BaseModel):
    """Everything the gate steps hand to each other, saved as JSON between steps."""

    run_id: str
    work_dir: str
    policy: dict[str, Any]
    policy_source: Optional[str] = None
    candidate: str
    candidate_path: str
    reference: Optional[str] = None
    reference_path: Optional[str] = None
    model_name: str
    cache_dir: Optional[str] = None
    record: dict[str, Any]
    evaluations: dict[str, str] = Field(default_factory=dict, description="Role to evaluation JSON file.")
    action: Optional[str] = None
    decision: Optional[str] = None
    reason: Optional[str] = None
    failed_checks: list[str] = Field(default_factory=list)
    patched_folder: Optional[str] = None
    audit_path: Optional[str] = Field(None, description="Set once the run's audit record is written.")
    started_epoch_seconds: float = Field(default_factory=time.time)

    @property
    def path(self) -> Path:
        return Path(self.work_dir) / STATE_FILE

    def rules(self) -> SafetyPolicy:
        """Return the policy as a validated object."""
        return SafetyPolicy.model_validate(self.policy)

    def save(self) -> Path:
        atomic_write_text(self.path, self.model_dump_json(indent=2))
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> "GateState":
        path = Path(path)
        if path.is_dir():
            path = path / STATE_FILE
        if not path.is_file():
            raise GuardrailError(f"gate state {path} not found; run the gate's start step first")
        return cls.model_validate_json(path.read_text(encoding="utf-8"))

    def evaluation(self, role: str) -> Optional[ModelEvaluation]:
        """Return a finished evaluation ("candidate", "reference" or "patched"), if any."""
        path = self.evaluations.get(role)
        return ModelEvaluation.model_validate_json(Path(path).read_text(encoding="utf-8")) if path else None


@dataclass
class GateResult:
    """The gate's decision, its reason, and the audit record behind it."""

    decision: str
    reason: str
    record: dict[str, Any]
    audit_path: Path
    registered: dict[str, int] = field(default_factory=dict)
    attestation_path: Optional[Path] = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.decision]


def resolve_reference(reference: str, policy: SafetyPolicy) -> tuple[str, Optional[dict[str, Any]]]:
    """Turn ``registry:<name>@<selector>`` into a local model folder; return other references unchanged.

    MLflow and Hub registries download the version into ``registry.cache_dir`` first.

    Returns:
        The loadable reference and, for registry references, the version's audit record.
    """
    parsed = parse_reference(reference)
    if parsed is None:
        return reference, None
    registry = open_registry(policy)
    name, selector = parsed
    return str(registry.model_path(name, selector)), registry.audit_record(name, selector)


def model_name_for(candidate_reference: str, policy: SafetyPolicy) -> str:
    """Pick the registered model name: the policy's, the registry reference's, or the folder's name."""
    if policy.registry.model_name:
        return policy.registry.model_name
    parsed = parse_reference(candidate_reference)
    if parsed is not None:
        return parsed[0]
    stem = Path(candidate_reference.rstrip("/")).name.removesuffix(".gguf") or "model"
    return re.sub(r"[^A-Za-z0-9._-]", "-", stem).strip(".-") or "model"


def cached_evaluation(loaded: LoadedModel, policy: SafetyPolicy, cache_dir: Optional[Path], progress: Optional[ProgressCallback]) -> ModelEvaluation:
    """Evaluate a model, reusing a cached result for the same model, probes and settings.

    The cache key covers the model digest and every policy section that
    changes the figures, so a cached verdict can never attach to another model.
    """
    if cache_dir is None:
        return evaluate_model(loaded, policy, progress=progress)
    harmful, benign = load_probes(policy)
    key = sha256_json(
        {
            "model": loaded.digests.model,
            "generation": policy.generation.model_dump(mode="json"),
            "judge": policy.judge.model_dump(mode="json"),
            "dtype": policy.loading.dtype,
            "probes": [harmful.digest, benign.digest],
            "version": __version__,
        }
    )
    path = Path(cache_dir) / "evaluations" / f"{key}.json"
    if path.is_file():
        logger.info("Reusing cached evaluation of %s (%s)", loaded.reference, key[:12])
        evaluation = ModelEvaluation.model_validate_json(path.read_text(encoding="utf-8"))
        evaluation.model = loaded.describe()
        return evaluation
    evaluation = evaluate_model(loaded, policy, (harmful, benign), progress)
    atomic_write_text(path, evaluation.model_dump_json())
    return evaluation


def figures(evaluation: ModelEvaluation, kl: Optional[float] = None) -> dict[str, Any]:
    """Return the headline figures of an evaluation for the audit record."""
    result = {
        "refusal_rate": evaluation.refusal_rate,
        "attack_success_rate": evaluation.attack_success_rate,
        "over_refusal_rate": evaluation.over_refusal_rate,
        "refusal_ci": [evaluation.harmful.refusal.ci_low, evaluation.harmful.refusal.ci_high],
        "over_refusal_ci": [evaluation.benign.refusal.ci_low, evaluation.benign.refusal.ci_high],
        "per_category": {name: rate.rate for name, rate in evaluation.harmful.per_category.items()},
        "wall_seconds": evaluation.wall_seconds,
    }
    if kl is not None:
        result["benign_kl"] = kl
    return result


def _timed(state: GateState, name: str, started: float) -> None:
    state.record["timings"][name] = round(time.perf_counter() - started, 2)


def start_step(
    candidate: str,
    policy: SafetyPolicy,
    reference: Optional[str] = None,
    *,
    work_dir: Path,
    policy_source: Optional[str] = None,
    cache_dir: Optional[Path] = None,
) -> Path:
    """Open a gate run: check the signing key, resolve the model references, start the audit record, save the state.

    Raises:
        GuardrailError: A registry reference does not resolve, or the policy's
            signing key cannot be loaded.
    """
    run_id = audit.new_run_id()
    record = audit.new_record(run_id)
    record["policy"] = {"name": policy.metadata.name, "digest": policy.digest(), "source": policy_source}
    record["decoding"] = {**decoding_settings(policy), "dtype": policy.loading.dtype}
    record["judge"] = policy.judge.model_dump(mode="json")
    harmful, benign = load_probes(policy)
    record["probes"] = {"harmful": harmful.describe(), "benign": benign.describe()}

    state = GateState(
        run_id=run_id,
        work_dir=str(work_dir),
        policy=policy.model_dump(mode="json"),
        policy_source=policy_source,
        candidate=candidate,
        candidate_path=candidate,
        reference=reference,
        model_name=model_name_for(candidate, policy),
        cache_dir=str(cache_dir) if cache_dir else None,
        record=record,
    )
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    state.save()
    # Fail on a bad key now, before any evaluation, and not only when the run is over.
    signing_key = _signing_key(policy)

    candidate_path, candidate_audit = resolve_reference(candidate, policy)
    check_reference(candidate_path)
    if policy.audit.require_signature and candidate_audit is not None and signing_key is not None:
        _check_candidate_signature(candidate, candidate_audit, policy, signing_key)
    state.candidate_path = candidate_path
    state.record["parent"] = lineage.parent_for(candidate, candidate_path, candidate_audit)
    if reference is not None:
        state.reference_path, _ = resolve_reference(reference, policy)
        check_reference(state.reference_path)
    return state.save()


def evaluate_step(state_path: str | Path, role: str, progress: Optional[ProgressCallback] = None) -> Path:
    """Evaluate the candidate or the reference and store the evaluation next to the state."""
    if role not in ("candidate", "reference"):
        raise GuardrailError(f"invalid evaluation role {role!r}; use 'candidate' or 'reference'")
    state = GateState.load(state_path)
    policy = state.rules()
    path = state.candidate_path if role == "candidate" else state.reference_path
    if path is None:
        raise GuardrailError("the gate has no reference model; pass one to the start step")

    started = time.perf_counter()
    loaded = load_model(path, policy.loading)
    loaded.reference = state.candidate if role == "candidate" else str(state.reference)
    evaluation = cached_evaluation(loaded, policy, Path(state.cache_dir) if state.cache_dir else None, progress)
    evaluation_path = Path(state.work_dir) / "evaluations" / f"{role}.json"
    atomic_write_text(evaluation_path, evaluation.model_dump_json())

    state.evaluations[role] = str(evaluation_path)
    state.record[role] = loaded.describe()
    state.record["figures"][role] = figures(evaluation)
    _timed(state, f"evaluate_{role}", started)
    return state.save()


def decide_step(state_path: str | Path) -> str:
    """Compare the candidate with the policy and choose an action: approve, patch or block."""
    state = GateState.load(state_path)
    policy = state.rules()
    candidate_evaluation = state.evaluation("candidate")
    if candidate_evaluation is None:
        raise GuardrailError("the candidate has not been evaluated; run the evaluate step first")
    checks, note = check_thresholds(candidate_evaluation, policy.thresholds, state.evaluation("reference"))
    state.record["checks"]["candidate"] = [check.model_dump() for check in checks]
    if note:
        state.record["reference_note"] = note
    state.failed_checks = [check.name for check in checks if not check.passed]

    if not state.failed_checks:
        state.action, state.decision, state.reason = ACTION_APPROVE, APPROVED, "the candidate meets every threshold"
    elif policy.realignment.action == "block":
        state.action, state.decision = ACTION_BLOCK, BLOCKED
        state.reason = f"the candidate failed {', '.join(state.failed_checks)}; the policy blocks without patching"
    else:
        state.action, state.decision = ACTION_PATCH, BLOCKED
        state.reason = f"the candidate failed {', '.join(state.failed_checks)}; patching"
    state.save()
    logger.info("Gate decision for %s: %s", state.candidate, state.action)
    return state.action


def patch_step(state_path: str | Path) -> bool:
    """Patch the candidate; when an epoch passes the screen, save it and prove the saved copy is identical.

    Returns:
        True when a patched model was saved to ``<work_dir>/patched``.
    """
    state = GateState.load(state_path)
    policy = state.rules()
    reference_evaluation = state.evaluation("reference")
    started = time.perf_counter()

    candidate = load_model(state.candidate_path, policy.loading)
    targets = screen_targets(
        policy,
        reference_evaluation.refusal_rate if reference_evaluation else None,
        reference_evaluation.over_refusal_rate if reference_evaluation else None,
    )
    realignment = realign(candidate.model, candidate.tokenizer, policy, targets)
    state.record["training_trace"] = realignment.trace()
    state.record["safety_example"] = realignment.example.model_dump() if realignment.example else None

    if realignment.success:
        folder = Path(state.work_dir) / "patched"
        _, difference = save_and_reload(realignment.model, candidate.tokenizer, folder, policy)
        state.patched_folder = str(folder)
        state.record["verification"] = {"reload_max_abs_logit_diff": difference}
    else:
        state.decision = BLOCKED
        state.reason = f"the candidate failed {', '.join(state.failed_checks)} and the patch did not pass the screen: {realignment.reason}"
    _timed(state, "patch", started)
    state.save()
    return realignment.success


def verify_step(state_path: str | Path, progress: Optional[ProgressCallback] = None) -> bool:
    """Re-evaluate the saved patched model on the full probe sets and measure its drift from the candidate.

    Returns:
        True when the patched model meets every threshold, the KL limit included.
    """
    state = GateState.load(state_path)
    if state.patched_folder is None:
        raise GuardrailError("there is no patched model to verify; run the patch step first")
    policy = state.rules()
    started = time.perf_counter()

    candidate = load_model(state.candidate_path, policy.loading)
    patched = load_model(state.patched_folder, policy.loading)
    patched.kind = "patched"
    verification = verify(candidate, patched, state.evaluation("candidate"), state.evaluation("reference"), policy, progress)

    evaluation_path = Path(state.work_dir) / "evaluations" / "patched.json"
    atomic_write_text(evaluation_path, verification.evaluation.model_dump_json())
    state.evaluations["patched"] = str(evaluation_path)
    state.record["verification"] = {**(state.record.get("verification") or {}), **verification.summary()}
    state.record["figures"]["patched"] = figures(verification.evaluation, verification.benign_kl)
    state.record["checks"]["patched"] = [check.model_dump() for check in verification.checks]
    state.record["patched"] = patched.describe()

    if verification.passed:
        state.decision = PATCHED
        state.reason = f"the candidate failed {', '.join(state.failed_checks)}; the patched model passed verification"
    else:
        failed = ", ".join(check.name for check in verification.checks if not check.passed)
        state.decision = BLOCKED
        state.reason = f"the patch passed the screen but failed verification on the full probe sets: {failed}"
    _timed(state, "verify", started)
    state.save()
    return verification.passed


def finish_step(state_path: str | Path) -> GateResult:
    """Write the decision to the registry in one transaction and write the audit record.

    Approved: the candidate gets the approved alias. Patched: the candidate is
    quarantined and the patched model gets the approved alias. Blocked: the
    candidate is quarantined. The finalized audit record is stored with each
    version written. Any failure rolls the registry back to its state before
    this step. A candidate that is not a model folder (a GGUF file, say) is
    audited but not copied into the registry.
    """
    state = GateState.load(state_path)
    if state.decision is None:
        raise GuardrailError("the gate has not decided yet; run the decide step first")
    if state.decision == ERROR or state.audit_path is not None:
        raise GuardrailError(f"gate run {state.run_id} already ended ({state.decision}); start a new run")
    policy = state.rules()
    record = state.record
    record["decision"], record["reason"] = state.decision, state.reason
    record["timings"]["total"] = round(time.time() - state.started_epoch_seconds, 2)
    lineage.complete_parent(record)
    _plot_patch_trace(record, Path(policy.audit.dir), state.run_id)

    registry = open_registry(policy)
    registered, envelope = _register(registry, policy, state)
    audit_path = audit.write_record(record, Path(policy.audit.dir))
    attestation_path = attestation.write_envelope(envelope, Path(policy.audit.dir), state.run_id) if envelope else None
    state.audit_path = str(audit_path)
    state.save()
    return GateResult(state.decision, state.reason or "", record, audit_path, registered, attestation_path)


def _plot_patch_trace(record: dict[str, Any], audit_dir: Path, run_id: str) -> None:
    """Draw refusal per patch epoch next to the audit record, and name the file in the record.

    The plot is a convenience for reports, so a missing matplotlib or a
    drawing error is logged and the gate goes on.
    """
    if not record.get("training_trace"):
        return
    from guardrail.plots import plot_patch_trace

    path = audit_dir / f"{run_id}.patch.png"
    try:
        plot_patch_trace(record["training_trace"], path)
    except (GuardrailError, OSError, ValueError) as exc:
        logger.warning("Could not draw the patch plot %s: %s", path, exc)
        return
    record["plots"] = {"patch_trace": path.name}


def _register(registry: Registry, policy: SafetyPolicy, state: GateState) -> tuple[dict[str, int], Optional[dict[str, Any]]]:
    """Register the decision, finalize the record and sign it; return the versions written and the envelope."""
    record = state.record
    candidate_folder = Path(state.candidate_path)
    tags = {"guardrail.decision": str(state.decision), "guardrail.run_id": state.run_id}
    record["registry"] = {"type": policy.registry.type, "location": registry.location, "name": state.model_name, "versions": {}}
    if not (candidate_folder / "config.json").is_file():
        logger.warning("Candidate %s is not a model folder; it is audited but not registered", candidate_folder)
        audit.finalize(record)
        return {}, _attest(record, _model_paths(state), policy)

    registered: dict[str, int] = {}
    approved = state.decision == APPROVED
    with registry.transaction(state.model_name):
        status = APPROVED if approved else QUARANTINED
        alias = policy.registry.approved_alias if approved else policy.registry.quarantined_alias
        candidate_version = registry.register(state.model_name, candidate_folder, status=status, tags=tags, aliases=(alias,))
        registered["candidate"] = candidate_version.version
        if state.decision == PATCHED:
            patched_tags = {**tags, "guardrail.parent_version": str(candidate_version.version)}
            patched_version = registry.register(
                state.model_name, Path(str(state.patched_folder)), status=APPROVED, tags=patched_tags, aliases=(policy.registry.approved_alias,)
            )
            registered["patched"] = patched_version.version
        record["registry"]["versions"] = dict(registered)
        audit.finalize(record)
        # Signed inside the transaction, so a key that fails now rolls the registry back.
        envelope = _attest(record, _model_paths(state), policy)
        for version in registered.values():
            registry.attach_audit(state.model_name, version, record, attestation=envelope)
    return registered, envelope


def _signing_key(policy: SafetyPolicy) -> Optional[Ed25519PrivateKey]:
    """Load the policy's signing key, or return None when the policy signs nothing."""
    return signing.load_private_key(policy.audit.signing_key) if policy.audit.signing_key else None


def _attest(record: dict[str, Any], model_paths: dict[str, Optional[Path]], policy: SafetyPolicy) -> Optional[dict[str, Any]]:
    """Sign a finalized record when the policy names a signing key; return the DSSE envelope."""
    key = _signing_key(policy)
    return attestation.attest_record(record, model_paths, key) if key is not None else None


def _attest_error_record(record: dict[str, Any], model_paths: dict[str, Optional[Path]], policy: SafetyPolicy) -> Optional[Path]:
    """Sign and write the envelope of an error record; a signing failure is logged, so the original error stays the one raised."""
    try:
        envelope = _attest(record, model_paths, policy)
    except (AuditError, OSError) as exc:
        logger.warning("Audit record %s of the failed run is not signed: %s", record["run_id"], exc)
        return None
    return attestation.write_envelope(envelope, Path(policy.audit.dir), record["run_id"]) if envelope else None


def _model_paths(state: GateState) -> dict[str, Optional[Path]]:
    """Return the model of each role the attestation covers: the registered ones, else the candidate."""
    candidate = Path(state.candidate_path)
    if not candidate.exists():
        # A Hub candidate is read from its snapshot folder in the local cache.
        local = (state.record.get("candidate") or {}).get("local_path")
        candidate = Path(local) if local else None
    versions = (state.record.get("registry") or {}).get("versions") or {}
    if not versions:
        return {"candidate": candidate}
    patched = Path(state.patched_folder) if "patched" in versions and state.patched_folder else None
    return {"candidate": candidate if "candidate" in versions else None, "patched": patched}


def _check_candidate_signature(candidate: str, candidate_audit: dict[str, Any], policy: SafetyPolicy, signing_key: Ed25519PrivateKey) -> None:
    """Reject a registry candidate whose audit record is not signed by the policy's key.

    Raises:
        AuditError: The version has no attestation, or it does not verify
            against the version's audit record.
    """
    # NOTE: only the policy's own key is trusted, so after a key rotation a version signed with the old key
    # is rejected until it is gated again.
    name, selector = parse_reference(candidate) or ("", "")
    envelope = open_registry(policy).attestation(name, selector)
    if envelope is None:
        raise AuditError(
            f"{candidate} has an audit record but no attestation, and audit.require_signature rejects unsigned registry "
            "candidates; gate the model that produced it again with audit.signing_key set, or set require_signature: false"
        )
    problems = attestation_checks.record_signature_problems(envelope, candidate_audit, signing_key.public_key(), candidate)
    if problems:
        raise AuditError(f"{candidate} failed the signature check that audit.require_signature asks for: {'; '.join(problems)}")


def fail_step(state_path: str | Path, error: str) -> Path:
    """Record a gate run that stopped on an error; the registry is not touched.

    The record is signed when the policy names a signing key that can be
    loaded; otherwise it is written unsigned and a warning is logged.
    """
    state = GateState.load(state_path)
    policy = state.rules()
    record = state.record
    record.pop("digest", None)
    record["registry"] = None
    record["decision"], record["reason"], record["error"] = ERROR, "the gate stopped on an error", error
    record["timings"]["total"] = round(time.time() - state.started_epoch_seconds, 2)
    lineage.complete_parent(record)
    path = audit.write_record(audit.finalize(record), Path(policy.audit.dir))
    _attest_error_record(record, _model_paths(state), policy)
    state.decision = ERROR
    state.audit_path = str(path)
    state.save()
    return path


def run_gate(
    candidate: str,
    policy: SafetyPolicy,
    reference: Optional[str] = None,
    *,
    policy_source: Optional[str] = None,
    work_dir: Optional[Path] = None,
    cache_dir: Optional[Path] = Path(".guardrail/cache"),
    progress: Optional[ProgressCallback] = None,
    on_stage: Optional[StageCallback] = None,
    keep_work_dir: bool = False,
) -> GateResult:
    """Run every gate step in order on a candidate model.

    Args:
        candidate: Model reference: folder, ``.gguf`` file, adapter, Hub repo id, or ``registry:<name>@<alias>``.
        policy: The validated policy.
        reference: Safety-aligned model to compare with (same forms as ``candidate``).
        policy_source: Path of the policy file, recorded in the audit.
        work_dir: Folder for the gate state and the patched model before registration;
            defaults to a new folder under ``.guardrail/work``.
        cache_dir: Folder for cached evaluations; None disables the cache.
        progress: Evaluation progress callback.
        on_stage: Called with a short description as each stage starts.
        keep_work_dir: Keep the work folder afterwards, for debugging.

    Returns:
        The decision with its audit record.

    Raises:
        GuardrailError: Bad input or environment; the audit record is written first.
    """
    stage = on_stage or (lambda message: logger.info("%s", message))
    work_dir = Path(work_dir) if work_dir else Path(".guardrail/work") / audit.new_run_id()
    state_path: Optional[Path] = None
    try:
        stage(f"Resolving candidate {candidate}")
        state_path = start_step(candidate, policy, reference, work_dir=work_dir, policy_source=policy_source, cache_dir=cache_dir)
        if reference is not None:
            stage(f"Evaluating reference {reference}")
            evaluate_step(state_path, "reference", progress)
        stage(f"Evaluating candidate {candidate}")
        evaluate_step(state_path, "candidate", progress)
        if decide_step(state_path) == ACTION_PATCH:
            stage("Patching with one safety example")
            if patch_step(state_path):
                stage("Verifying the patched model")
                verify_step(state_path, progress)
        stage("Registering and writing the audit record")
        return finish_step(state_path)
    except GuardrailError as exc:
        if state_path is not None:
            fail_step(state_path, str(exc))
        else:
            audit_failure(candidate, policy, policy_source, str(exc))
        raise
    finally:
        if not keep_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)


def audit_failure(candidate: str, policy: SafetyPolicy, policy_source: Optional[str], error: str) -> Path:
    """Audit a run that failed before its state existed (an unresolvable registry reference, say)."""
    record = audit.new_record(audit.new_run_id())
    record["policy"] = {"name": policy.metadata.name, "digest": policy.digest(), "source": policy_source}
    record["candidate"] = {"reference": candidate}
    record["decision"], record["reason"], record["error"] = ERROR, "the gate stopped on an error", error
    path = audit.write_record(audit.finalize(record), Path(policy.audit.dir))
    _attest_error_record(record, {"candidate": Path(candidate) if Path(candidate).exists() else None}, policy)
    return path
