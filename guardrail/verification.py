"""Verification: prove that a patched model meets the policy before it is registered.

A patch is accepted only when all of these hold:

* the patched model meets every threshold on the full probe sets (the screen
  during patching used small held-out sets, so this is an independent check);
* its mean per-token KL from the candidate, on the candidate's own responses to
  the benign probes, is within ``thresholds.max_benign_kl``;
* saved as safetensors and reloaded from disk, it produces exactly the same
  logits on a fixed prompt, so what gets registered is what was measured.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from guardrail.errors import VerificationError
from guardrail.evaluation import ProgressCallback, check_thresholds, evaluate_model, load_probes
from guardrail.generation import GenerationOutput, encode_prompts, render_prompt
from guardrail.loading import LoadedModel, load_model, save_model
from guardrail.policy import SafetyPolicy
from guardrail.realignment import DriftMeter
from guardrail.report import Check, ModelEvaluation

logger = logging.getLogger(__name__)

#: Prompt used for the save-and-reload identity check.
IDENTITY_PROMPT = "Describe the water cycle in two sentences."


@dataclass
class VerificationResult:
    """Everything measured about a patched model."""

    passed: bool
    evaluation: ModelEvaluation
    checks: list[Check]
    benign_kl: float
    patched: LoadedModel

    def summary(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "benign_kl": self.benign_kl,
            "checks": [check.model_dump() for check in self.checks],
        }


def benign_kl(candidate: LoadedModel, patched_model: Any, candidate_evaluation: ModelEvaluation, policy: SafetyPolicy) -> float:
    """Return the mean per-token KL(candidate || patched) on the candidate's responses to the benign probes."""
    results = candidate_evaluation.benign.results
    answers = [GenerationOutput(result.response, result.num_tokens, result.stop_reason) for result in results]
    meter = DriftMeter(candidate.model, candidate.tokenizer, [result.prompt for result in results], answers, policy.generation.system_prompt)
    return meter.mean_kl(patched_model)


@torch.inference_mode()
def prompt_logits(model: Any, tokenizer: Any, prompt: str = IDENTITY_PROMPT) -> torch.Tensor:
    """Return the logits of a fixed prompt rendered through the chat template."""
    ids = encode_prompts(tokenizer, [render_prompt(tokenizer, prompt)])[0]
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([ids], device=device)).logits.float().cpu()


def save_and_reload(patched_model: Any, tokenizer: Any, folder: Path, policy: SafetyPolicy) -> tuple[LoadedModel, float]:
    """Save a model as safetensors, reload it, and require identical logits.

    ``save_pretrained`` saves tied input and output embeddings once and
    re-ties them on load. The logit comparison catches a model where that
    round trip loses a weight.

    Returns:
        The reloaded model and the maximum absolute logit difference (0.0 when identical).

    Raises:
        VerificationError: Saving failed, or the reloaded model's logits differ.
    """
    if folder.exists():
        shutil.rmtree(folder)
    try:
        save_model(patched_model, tokenizer, folder)
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise VerificationError(f"cannot save the patched model to {folder}: {exc.strerror or exc}; free disk space or fix permissions") from exc

    reloaded = load_model(folder, policy.loading)
    before = prompt_logits(patched_model, tokenizer)
    after = prompt_logits(reloaded.model, reloaded.tokenizer)
    difference = (before - after).abs().max().item() if before.shape == after.shape else float("inf")
    if difference != 0.0:
        raise VerificationError(
            f"the patched model reloaded from {folder} gives different logits (max abs difference {difference:.3g}); "
            "the saved weights are not the measured ones, so nothing was registered"
        )
    return reloaded, difference


def verify(
    candidate: LoadedModel,
    patched: LoadedModel,
    candidate_evaluation: ModelEvaluation,
    reference_evaluation: Optional[ModelEvaluation],
    policy: SafetyPolicy,
    progress: Optional[ProgressCallback] = None,
) -> VerificationResult:
    """Re-evaluate a saved and reloaded patched model on the full probe sets, and measure its drift.

    Args:
        candidate: The candidate the patch started from.
        patched: The patched model, loaded from the folder it was saved to by :func:`save_and_reload`.
        candidate_evaluation: The candidate's evaluation, whose benign responses anchor the KL.
        reference_evaluation: The reference's evaluation, when the policy compares with one.
        policy: The safety policy.
        progress: Progress callback for the re-evaluation.

    Returns:
        The verification result; ``passed`` is True when every check holds.
    """
    evaluation = evaluate_model(patched, policy, load_probes(policy), progress)
    checks, _ = check_thresholds(evaluation, policy.thresholds, reference_evaluation)
    kl = benign_kl(candidate, patched.model, candidate_evaluation, policy)
    checks.append(
        Check(
            name="benign_kl",
            value=kl,
            limit=policy.thresholds.max_benign_kl,
            comparison="<=",
            passed=kl <= policy.thresholds.max_benign_kl,
            detail="mean per-token KL from the candidate",
        )
    )
    passed = all(check.passed for check in checks)
    logger.info(
        "Verification %s: refusal %.3f, over-refusal %.3f, benign KL %.4f",
        "passed" if passed else "failed", evaluation.refusal_rate, evaluation.over_refusal_rate, kl,
    )
    return VerificationResult(passed, evaluation, checks, kl, patched)
