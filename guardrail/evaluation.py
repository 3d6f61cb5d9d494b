"""Evaluation: ask a model the probe sets, judge the responses, compare with the policy.

Examples:
    >>> from guardrail import evaluation, loading, policy
    >>> rules = policy.load_policy("policies/default.yaml")
    >>> candidate = loading.load_model("models/my-finetune", rules.loading)
    >>> report = evaluation.evaluate(candidate, rules)
    >>> report.passed
    False
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any, Callable, Optional

from guardrail import __version__
from guardrail.generation import generate
from guardrail.judging import Judge, build_judges
from guardrail.loading import LoadedModel
from guardrail.metrics import wilson_interval
from guardrail.policy import SafetyPolicy, Thresholds
from guardrail.probes import ProbeSet, load_probe_set
from guardrail.report import Check, EvaluationReport, ModelEvaluation, ProbeResult, Rate, SetResult

logger = logging.getLogger(__name__)

#: Called with (set name, prompts finished, prompts in the set).
ProgressCallback = Callable[[str, int, int], None]


def load_probes(policy: SafetyPolicy) -> tuple[ProbeSet, ProbeSet]:
    """Load the policy's harmful and benign probe sets."""
    harmful = load_probe_set(policy.probes.harmful, "harmful", policy.probes.seed)
    benign = load_probe_set(policy.probes.benign, "benign", policy.probes.seed)
    return harmful, benign


def rate(count: int, total: int) -> Rate:
    """Return a :class:`Rate` with its Wilson 95 % interval."""
    low, high = wilson_interval(count, total)
    return Rate(count=count, total=total, rate=count / total if total else 0.0, ci_low=low, ci_high=high)


def run_probe_set(
    loaded: LoadedModel,
    probes: ProbeSet,
    judge: Judge,
    policy: SafetyPolicy,
    progress: Optional[ProgressCallback] = None,
) -> SetResult:
    """Generate responses to one probe set and judge them."""
    finished = 0

    def on_batch(count: int) -> None:
        nonlocal finished
        finished += count
        if progress is not None:
            progress(probes.name, finished, len(probes))

    outputs = generate(loaded.model, loaded.tokenizer, probes.prompts(), policy.generation, on_batch=on_batch)
    verdicts = judge.judge_many(probes.prompts(), [output.text for output in outputs])
    results = [
        ProbeResult(
            id=probe.id,
            category=probe.category,
            borderline=probe.borderline,
            prompt=probe.prompt,
            response=output.text,
            num_tokens=output.num_tokens,
            stop_reason=output.stop_reason,
            refused=verdict.refused,
            rule=verdict.rule,
            evidence=verdict.evidence,
        )
        for probe, output, verdict in zip(probes.probes, outputs, verdicts)
    ]
    return summarize(probes, results)


def summarize(probes: ProbeSet, results: list[ProbeResult]) -> SetResult:
    """Compute overall, per-category and borderline refusal rates."""
    by_category: dict[str, list[bool]] = defaultdict(list)
    for result in results:
        by_category[result.category].append(result.refused)
    borderline = [result.refused for result in results if result.borderline]
    return SetResult(
        name=probes.name,
        source=probes.source,
        digest=probes.digest,
        refusal=rate(sum(result.refused for result in results), len(results)),
        per_category={category: rate(sum(flags), len(flags)) for category, flags in sorted(by_category.items())},
        borderline_refusal=rate(sum(borderline), len(borderline)) if borderline else None,
        results=results,
    )


def evaluate_model(
    loaded: LoadedModel,
    policy: SafetyPolicy,
    probes: Optional[tuple[ProbeSet, ProbeSet]] = None,
    progress: Optional[ProgressCallback] = None,
) -> ModelEvaluation:
    """Measure refusal on harmful probes and over-refusal on benign probes for one model."""
    harmful, benign = probes or load_probes(policy)
    harmful_judge, benign_judge = build_judges(policy.judge)
    started = time.perf_counter()
    harmful_result = run_probe_set(loaded, harmful, harmful_judge, policy, progress)
    benign_result = run_probe_set(loaded, benign, benign_judge, policy, progress)
    evaluation = ModelEvaluation(
        model=loaded.describe(),
        harmful=harmful_result,
        benign=benign_result,
        wall_seconds=round(time.perf_counter() - started, 2),
    )
    logger.info(
        "Evaluated %s: refusal %.1f%%, over-refusal %.1f%% in %.1f s",
        loaded.reference,
        100 * evaluation.refusal_rate,
        100 * evaluation.over_refusal_rate,
        evaluation.wall_seconds,
    )
    return evaluation


def reference_is_unsafe(reference: ModelEvaluation, thresholds: Thresholds) -> bool:
    """Return True when the reference itself misses the minimum refusal rate."""
    return reference.refusal_rate < thresholds.min_refusal_rate


def check_thresholds(
    candidate: ModelEvaluation,
    thresholds: Thresholds,
    reference: Optional[ModelEvaluation] = None,
) -> tuple[list[Check], Optional[str]]:
    """Compare a model's figures with the policy's thresholds.

    Checks against the reference are skipped when the reference is itself
    unsafe, because a drop from an unsafe baseline tells nothing about safety.

    Returns:
        The checks, and a note about the reference when it was not usable.
    """
    checks = [
        Check(
            name="harmful_refusal_rate",
            value=candidate.refusal_rate,
            limit=thresholds.min_refusal_rate,
            comparison=">=",
            passed=candidate.refusal_rate >= thresholds.min_refusal_rate,
        ),
        Check(
            name="benign_over_refusal_rate",
            value=candidate.over_refusal_rate,
            limit=thresholds.max_over_refusal_rate,
            comparison="<=",
            passed=candidate.over_refusal_rate <= thresholds.max_over_refusal_rate,
        ),
    ]
    if reference is None:
        return checks, None

    if reference_is_unsafe(reference, thresholds):
        note = (
            f"The reference model refuses only {100 * reference.refusal_rate:.1f}% of harmful probes, below the "
            f"policy minimum of {100 * thresholds.min_refusal_rate:.1f}%; it is itself unsafe, so the comparison "
            "with it was skipped. Use a safety-aligned reference."
        )
        logger.warning(note)
        return checks, note

    drop = reference.refusal_rate - candidate.refusal_rate
    increase = candidate.over_refusal_rate - reference.over_refusal_rate
    checks += [
        Check(
            name="refusal_drop_vs_reference",
            value=drop,
            limit=thresholds.max_refusal_drop,
            comparison="<=",
            passed=drop <= thresholds.max_refusal_drop + 1e-12,
            detail=f"reference {100 * reference.refusal_rate:.1f}%",
        ),
        Check(
            name="over_refusal_increase_vs_reference",
            value=increase,
            limit=thresholds.max_over_refusal_increase,
            comparison="<=",
            passed=increase <= thresholds.max_over_refusal_increase + 1e-12,
            detail=f"reference {100 * reference.over_refusal_rate:.1f}%",
        ),
    ]
    return checks, None


def decoding_settings(policy: SafetyPolicy) -> dict[str, Any]:
    """Return the decoding settings recorded in reports."""
    return {
        "strategy": "greedy",
        "max_new_tokens": policy.generation.max_new_tokens,
        "batch_size": policy.generation.batch_size,
        "system_prompt": policy.generation.system_prompt,
    }


def evaluate(
    candidate: LoadedModel,
    policy: SafetyPolicy,
    reference: Optional[LoadedModel] = None,
    progress: Optional[ProgressCallback] = None,
    reference_evaluation: Optional[ModelEvaluation] = None,
) -> EvaluationReport:
    """Evaluate a candidate, and optionally a reference, against a policy.

    Args:
        candidate: The model under test.
        policy: The safety policy.
        reference: A safety-aligned model to compare with, such as the model before fine-tuning.
        progress: Progress callback, see :data:`ProgressCallback`.
        reference_evaluation: A finished evaluation of the reference, reused instead of re-running it.

    Returns:
        The report; ``report.passed`` is True when every check passes.
    """
    probes = load_probes(policy)
    candidate_evaluation = evaluate_model(candidate, policy, probes, progress)
    if reference is not None and reference_evaluation is None:
        reference_evaluation = evaluate_model(reference, policy, probes, progress)

    checks, note = check_thresholds(candidate_evaluation, policy.thresholds, reference_evaluation)
    return EvaluationReport(
        guardrail_version=__version__,
        policy={"name": policy.metadata.name, "digest": policy.digest()},
        decoding=decoding_settings(policy),
        judge=policy.judge.model_dump(mode="json"),
        candidate=candidate_evaluation,
        reference=reference_evaluation,
        reference_note=note,
        checks=checks,
        passed=all(check.passed for check in checks),
    )
