"""The safety gate: evaluate, patch when needed, verify, register, audit.

The gate sits between "fine-tune finished" and "model promoted":

1. evaluate the candidate (and the reference, when given) against the policy;
2. if the candidate passes, register it as approved;
3. if it fails and the policy says ``patch``, run the one-shot realignment,
   then verify the patched model (full re-evaluation, benign KL, save and
   reload); if verified, register it as approved and mark the candidate
   quarantined;
4. otherwise block: the candidate is marked quarantined and nothing is approved.

An audit record is written for every run, including runs that fail with an
error. Registry writes happen only at the end, after every measurement, so
an error anywhere leaves the registry as it was.

Examples:
    >>> from guardrail.gate import run_gate
    >>> from guardrail.policy import load_policy
    >>> result = run_gate("models/my-finetune", load_policy("policies/default.yaml"), reference="models/aligned")
    >>> result.decision, result.exit_code
    ('patched', 3)
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from guardrail import audit
from guardrail.errors import GuardrailError, RegistryError
from guardrail.evaluation import ProgressCallback, check_thresholds, decoding_settings, evaluate_model, load_probes
from guardrail.hashing import sha256_json
from guardrail.loading import LoadedModel, load_model
from guardrail.policy import SafetyPolicy
from guardrail.realignment import RealignmentResult, realign, screen_targets
from guardrail.registry import LocalRegistry, parse_reference
from guardrail.report import ModelEvaluation
from guardrail.verification import VerificationResult, save_and_reload, verify

logger = logging.getLogger(__name__)

APPROVED = "approved"
PATCHED = "patched"
BLOCKED = "blocked"
ERROR = "error"
QUARANTINED = "quarantined"

EXIT_CODES = {APPROVED: 0, BLOCKED: 1, ERROR: 2, PATCHED: 3}

#: Called with a short description of each gate stage as it starts.
StageCallback = Callable[[str], None]


@dataclass
class RegistrationPlan:
    """What the gate will write to the registry once every measurement is done."""

    name: str
    candidate_folder: Path
    approved: bool
    patched_folder: Optional[Path] = None


@dataclass
class GateResult:
    """What the gate decided, and where the evidence is."""

    decision: str
    reason: str
    record: dict[str, Any]
    audit_path: Path
    candidate_evaluation: Optional[ModelEvaluation] = None
    reference_evaluation: Optional[ModelEvaluation] = None
    realignment: Optional[RealignmentResult] = None
    verification: Optional[VerificationResult] = None
    registered: dict[str, int] = field(default_factory=dict)
    plan: Optional["RegistrationPlan"] = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.decision]


def open_registry(policy: SafetyPolicy) -> LocalRegistry:
    """Open the registry named in the policy."""
    return LocalRegistry(policy.registry.path)


def resolve_reference(reference: str, policy: SafetyPolicy) -> tuple[str, Optional[dict[str, Any]]]:
    """Turn ``registry:<name>@<selector>`` into a model folder; return other references unchanged.

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
            "version": audit.__version__,
        }
    )
    path = Path(cache_dir) / "evaluations" / f"{key}.json"
    if path.is_file():
        logger.info("Reusing cached evaluation of %s (%s)", loaded.reference, key[:12])
        evaluation = ModelEvaluation.model_validate_json(path.read_text(encoding="utf-8"))
        evaluation.model = loaded.describe()
        return evaluation
    evaluation = evaluate_model(loaded, policy, (harmful, benign), progress)
    from guardrail.report import atomic_write_text

    atomic_write_text(path, evaluation.model_dump_json())
    return evaluation


def figures(evaluation: ModelEvaluation, kl: Optional[float] = None) -> dict[str, Any]:
    figures = {
        "refusal_rate": evaluation.refusal_rate,
        "attack_success_rate": evaluation.attack_success_rate,
        "over_refusal_rate": evaluation.over_refusal_rate,
        "refusal_ci": [evaluation.harmful.refusal.ci_low, evaluation.harmful.refusal.ci_high],
        "over_refusal_ci": [evaluation.benign.refusal.ci_low, evaluation.benign.refusal.ci_high],
        "per_category": {name: rate.rate for name, rate in evaluation.harmful.per_category.items()},
        "wall_seconds": evaluation.wall_seconds,
    }
    if kl is not None:
        figures["benign_kl"] = kl
    return figures


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
) -> GateResult:
    """Run the safety gate on a candidate model.

    Args:
        candidate: Model reference: folder, ``.gguf`` file, adapter, Hub repo id, or ``registry:<name>@<alias>``.
        policy: The validated policy.
        reference: Safety-aligned model to compare with (same forms as ``candidate``).
        policy_source: Path of the policy file, recorded in the audit.
        work_dir: Where the patched model is saved before registration; defaults to ``.guardrail/work/<run id>``.
        cache_dir: Folder for cached evaluations; None disables the cache.
        progress: Evaluation progress callback.
        on_stage: Called with a short description as each stage starts.

    Returns:
        The decision with its audit record. Errors caused by input are
        recorded with decision ``error`` and re-raised.

    Raises:
        GuardrailError: Bad input or environment; the audit record is written first.
    """
    run_id = audit.new_run_id()
    record = audit.new_record(run_id)
    record["policy"] = {"name": policy.metadata.name, "digest": policy.digest(), "source": policy_source}
    record["decoding"] = decoding_settings(policy)
    record["judge"] = policy.judge.model_dump(mode="json")
    work_dir = Path(work_dir) if work_dir else Path(".guardrail/work") / run_id
    stage = on_stage or (lambda message: logger.info("%s", message))
    timings: dict[str, float] = record["timings"]
    started = time.perf_counter()

    try:
        result = _gate(candidate, reference, policy, record, work_dir, cache_dir, progress, stage, timings)
        record["decision"], record["reason"] = result.decision, result.reason
        timings["total"] = round(time.perf_counter() - started, 2)
        stage("Registering and writing the audit record")
        _register(open_registry(policy), policy, record, result)
    except GuardrailError as exc:
        record.pop("digest", None)
        record["registry"] = None
        record["decision"], record["reason"], record["error"] = ERROR, "the gate stopped on an error", str(exc)
        timings["total"] = round(time.perf_counter() - started, 2)
        audit.write_record(audit.finalize(record), Path(policy.audit.dir))
        raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    result.audit_path = audit.write_record(record, Path(policy.audit.dir))
    return result


def _timed(timings: dict[str, float], name: str, started: float) -> None:
    timings[name] = round(time.perf_counter() - started, 2)


def _gate(
    candidate_reference: str,
    reference: Optional[str],
    policy: SafetyPolicy,
    record: dict[str, Any],
    work_dir: Path,
    cache_dir: Optional[Path],
    progress: Optional[ProgressCallback],
    stage: StageCallback,
    timings: dict[str, float],
) -> GateResult:
    name = model_name_for(candidate_reference, policy)

    stage(f"Loading candidate {candidate_reference}")
    candidate_path, candidate_audit = resolve_reference(candidate_reference, policy)
    candidate = load_model(candidate_path, policy.loading)
    candidate.reference = candidate_reference
    record["candidate"] = candidate.describe()
    record["parent_digest"] = (candidate_audit or {}).get("digest")
    harmful, benign = load_probes(policy)
    record["probes"] = {"harmful": harmful.describe(), "benign": benign.describe()}

    reference_evaluation = None
    if reference is not None:
        stage(f"Evaluating reference {reference}")
        clock = time.perf_counter()
        reference_path, _ = resolve_reference(reference, policy)
        reference_model = load_model(reference_path, policy.loading)
        reference_model.reference = reference
        record["reference"] = reference_model.describe()
        reference_evaluation = cached_evaluation(reference_model, policy, cache_dir, progress)
        record["figures"]["reference"] = figures(reference_evaluation)
        del reference_model
        _timed(timings, "evaluate_reference", clock)

    stage("Evaluating candidate")
    clock = time.perf_counter()
    candidate_evaluation = cached_evaluation(candidate, policy, cache_dir, progress)
    checks, note = check_thresholds(candidate_evaluation, policy.thresholds, reference_evaluation)
    record["figures"]["candidate"] = figures(candidate_evaluation)
    record["checks"]["candidate"] = [check.model_dump() for check in checks]
    if note:
        record["reference_note"] = note
    _timed(timings, "evaluate_candidate", clock)
    result = GateResult(decision=BLOCKED, reason="", record=record, audit_path=Path(), candidate_evaluation=candidate_evaluation, reference_evaluation=reference_evaluation)

    if all(check.passed for check in checks):
        result.decision, result.reason = APPROVED, "the candidate meets every threshold"
        result.plan = RegistrationPlan(name, Path(candidate_path), approved=True)
        return result

    failed = ", ".join(check.name for check in checks if not check.passed)
    if policy.realignment.action == "block":
        result.reason = f"the candidate failed {failed}; the policy blocks without patching"
        result.plan = RegistrationPlan(name, Path(candidate_path), approved=False)
        return result

    stage("Patching with one safety example")
    clock = time.perf_counter()
    realignment, patched_folder, reload_difference = patch_step(candidate, policy, reference_evaluation, work_dir / "patched")
    result.realignment = realignment
    record_patch(record, realignment)
    _timed(timings, "patch", clock)
    if patched_folder is None:
        result.reason = f"the candidate failed {failed} and the patch did not pass the screen: {realignment.reason}"
        result.plan = RegistrationPlan(name, Path(candidate_path), approved=False)
        return result

    stage("Verifying the patched model")
    clock = time.perf_counter()
    patched = load_model(patched_folder, policy.loading)
    verification = verify(candidate, patched, candidate_evaluation, reference_evaluation, policy, progress)
    result.verification = verification
    record_verification(record, verification, reload_difference)
    _timed(timings, "verify", clock)
    if not verification.passed:
        failed_after = ", ".join(check.name for check in verification.checks if not check.passed)
        result.reason = f"the patch passed the screen but failed verification on the full probe sets: {failed_after}"
        result.plan = RegistrationPlan(name, Path(candidate_path), approved=False)
        return result

    result.decision = PATCHED
    result.reason = f"the candidate failed {failed}; the patched model passed verification"
    result.plan = RegistrationPlan(name, Path(candidate_path), approved=False, patched_folder=patched_folder)
    return result


def patch_step(
    candidate: LoadedModel,
    policy: SafetyPolicy,
    reference_evaluation: Optional[ModelEvaluation],
    out_folder: Path,
) -> tuple[RealignmentResult, Optional[Path], Optional[float]]:
    """Patch a candidate and, when an epoch passes the screen, save it and prove the saved copy is identical.

    Returns:
        The realignment result, the folder of the saved patched model (None
        when the patch failed), and the logit difference of the reload check.
    """
    targets = screen_targets(
        policy,
        reference_evaluation.refusal_rate if reference_evaluation else None,
        reference_evaluation.over_refusal_rate if reference_evaluation else None,
    )
    realignment = realign(candidate.model, candidate.tokenizer, policy, targets)
    if not realignment.success:
        return realignment, None, None
    _, difference = save_and_reload(realignment.model, candidate.tokenizer, out_folder, policy)
    return realignment, out_folder, difference


def record_patch(record: dict[str, Any], realignment: RealignmentResult) -> None:
    """Add the safety example and the training trace to an audit record."""
    record["training_trace"] = realignment.trace()
    record["safety_example"] = realignment.example.model_dump() if realignment.example else None


def record_verification(record: dict[str, Any], verification: VerificationResult, reload_difference: Optional[float]) -> None:
    """Add the patched model's identity, figures and checks to an audit record."""
    record["verification"] = {**verification.summary(), "reload_max_abs_logit_diff": reload_difference}
    record["figures"]["patched"] = figures(verification.evaluation, verification.benign_kl)
    record["checks"]["patched"] = [check.model_dump() for check in verification.checks]
    record["patched"] = verification.patched.describe()


def _register(registry: LocalRegistry, policy: SafetyPolicy, record: dict[str, Any], result: GateResult) -> None:
    """Write the decision to the registry in one transaction, and finalize the audit record.

    Approved: the candidate gets the approved alias. Patched: the candidate is
    quarantined and the patched model gets the approved alias. Blocked: the
    candidate is quarantined. The finalized audit record is stored with each
    version written. Any failure rolls the registry back to its state before
    the gate. A candidate that is not a model folder (a GGUF file, say) is
    audited but not copied into the registry.
    """
    plan = result.plan
    aliases = policy.registry
    tags = {"guardrail.decision": result.decision, "guardrail.run_id": record["run_id"]}
    record["registry"] = {"type": policy.registry.type, "path": str(registry.root), "name": plan.name, "versions": {}}
    if not (plan.candidate_folder / "config.json").is_file():
        logger.warning("Candidate %s is not a model folder; it is audited but not registered", plan.candidate_folder)
        audit.finalize(record)
        return

    with registry.transaction(plan.name):
        status = APPROVED if plan.approved else QUARANTINED
        alias = aliases.approved_alias if plan.approved else aliases.quarantined_alias
        candidate_version = registry.register(plan.name, plan.candidate_folder, status=status, tags=tags, aliases=(alias,))
        result.registered["candidate"] = candidate_version.version
        if plan.patched_folder is not None:
            patched_tags = {**tags, "guardrail.parent_version": str(candidate_version.version)}
            patched_version = registry.register(plan.name, plan.patched_folder, status=APPROVED, tags=patched_tags, aliases=(aliases.approved_alias,))
            result.registered["patched"] = patched_version.version
        record["registry"]["versions"] = dict(result.registered)
        audit.finalize(record)
        for version in result.registered.values():
            registry.attach_audit(plan.name, version, record)
