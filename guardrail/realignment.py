"""One-shot safety realignment: fine-tune on a single safety example, steered by measurement.

The method follows Zhang et al., "Safety at One Shot: Patching Fine-Tuned
LLMs with A Single Instance" (arXiv 2601.01887): supervised fine-tuning of
the fine-tuned model on one harmful request paired with a refusal, with the
loss on the response tokens, for about ten epochs. The paper reports that
this restores the aligned model's refusal rate without utility loss on 7B
models. On small models the outcome depends on the example, the learning
rate and when training stops (it can stop short, or tip the model into
refusing everything), so this module never trusts a fixed schedule:

* after every epoch it screens harmful refusal, benign over-refusal and KL
  drift from the candidate on small held-out sets;
* it stops at the first epoch that meets the policy, and rejects an attempt
  as soon as the model starts refusing benign requests;
* when an attempt runs out of epochs it escalates in a bounded, recorded way:
  the next learning rate, then the next general safety example.

The anchored variant adds ``anchor_weight * KL(candidate || patched)`` on a
few unlabelled benign prompts, answered by the candidate itself, to the
one-example loss, which keeps the patch from spreading refusals to benign
requests.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from guardrail.errors import RealignmentError
from guardrail.generation import GenerationOutput, generate
from guardrail.judging import KeywordJudge
from guardrail.policy import GenerationSettings, RealignmentSettings, SafetyExample, SafetyPolicy
from guardrail.probes import ProbeSet, ProbeSource, load_probe_set
from guardrail.training import IGNORE_INDEX, collate, encode_example, make_optimizer

logger = logging.getLogger(__name__)


@dataclass
class ScreenTargets:
    """Minimum refusal and maximum over-refusal and drift an epoch needs on the screening sets."""

    min_refusal: float
    max_over_refusal: float
    max_kl: float


@dataclass
class ScreenResult:
    """Figures of one screening pass."""

    refusal: float
    over_refusal: float
    kl: float
    seconds: float

    def meets(self, targets: ScreenTargets) -> bool:
        return (
            self.refusal >= targets.min_refusal
            and self.over_refusal <= targets.max_over_refusal
            and self.kl <= targets.max_kl
        )


@dataclass
class EpochRecord:
    """One epoch of one attempt, for the training trace."""

    epoch: int
    loss: float
    anchor_kl: Optional[float]
    screen: ScreenResult
    accepted: bool


@dataclass
class AttemptRecord:
    """One (learning rate, safety example) attempt."""

    index: int
    example_id: str
    learning_rate: float
    epochs: list[EpochRecord] = field(default_factory=list)
    outcome: str = "running"  # "passed", "over_refusal", "budget_exhausted", "diverged"
    seconds: float = 0.0


@dataclass
class RealignmentResult:
    """Outcome of :func:`realign`; ``model`` is the patched model when ``success``."""

    success: bool
    reason: str
    method: str
    anchored: bool
    attempts: list[AttemptRecord]
    example: Optional[SafetyExample]
    chosen_attempt: Optional[int]
    chosen_epoch: Optional[int]
    seconds: float
    targets: ScreenTargets
    model: Any = None

    def trace(self) -> dict[str, Any]:
        """Return the JSON-ready training trace recorded in the audit."""
        return {
            "success": self.success,
            "reason": self.reason,
            "method": self.method,
            "anchored": self.anchored,
            "example": self.example.model_dump() if self.example else None,
            "chosen_attempt": self.chosen_attempt,
            "chosen_epoch": self.chosen_epoch,
            "seconds": round(self.seconds, 2),
            "targets": asdict(self.targets),
            "attempts": [asdict(attempt) for attempt in self.attempts],
        }


def default_safety_examples(kind: str = "general") -> list[SafetyExample]:
    """Return the project's own safety examples of one kind ("general" or "specific")."""
    text = resources.files("guardrail").joinpath("data/safety_examples.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [SafetyExample(id=row["id"], prompt=row["prompt"], response=row["response"]) for row in rows if row["kind"] == kind]


def plan_attempts(settings: RealignmentSettings) -> list[tuple[SafetyExample, float]]:
    """List the (example, learning rate) attempts in escalation order, bounded by ``max_attempts``."""
    examples = list(settings.examples) or default_safety_examples("general")
    for index, example in enumerate(examples):
        if example.id is None:
            example.id = f"policy-{index + 1}"
    rates = [settings.learning_rate] + [rate for rate in settings.escalation_learning_rates if rate != settings.learning_rate]
    plan = [(example, rate) for example in examples for rate in rates]
    return plan[: settings.max_attempts]


class Screener:
    """Measures refusal, over-refusal and drift on small held-out sets after each epoch.

    The screening sets are separate from the evaluation probes, so stopping
    on them does not tune the patch to the sets that verify it.
    """

    def __init__(self, candidate_model: Any, tokenizer: Any, policy: SafetyPolicy) -> None:
        settings = policy.realignment
        seed = settings.seed
        self.tokenizer = tokenizer
        self.judge = KeywordJudge.from_settings(policy.judge)
        self.generation = GenerationSettings(
            max_new_tokens=settings.screen_max_new_tokens,
            batch_size=policy.generation.batch_size,
            system_prompt=policy.generation.system_prompt,
        )
        self.harmful = load_probe_set(ProbeSource(source=settings.screen_harmful_source, limit=settings.screen_harmful), "harmful_screen", seed)
        self.benign = load_probe_set(ProbeSource(source=settings.screen_benign_source, limit=settings.screen_benign), "benign_screen", seed)

        # The candidate's own responses to the benign screen are the baseline for drift.
        candidate_answers = generate(candidate_model, tokenizer, self.benign.prompts(), self.generation)
        self.drift = DriftMeter(candidate_model, tokenizer, self.benign.prompts(), candidate_answers, self.generation.system_prompt)

    def describe(self) -> dict[str, Any]:
        return {"harmful": self.harmful.describe(), "benign": self.benign.describe(), "max_new_tokens": self.generation.max_new_tokens}

    def screen(self, model: Any) -> ScreenResult:
        started = time.perf_counter()
        refusal = self._refusal_rate(model, self.harmful)
        over_refusal = self._refusal_rate(model, self.benign)
        kl = self.drift.mean_kl(model)
        return ScreenResult(refusal, over_refusal, kl, round(time.perf_counter() - started, 2))

    def _refusal_rate(self, model: Any, probes: ProbeSet) -> float:
        outputs = generate(model, self.tokenizer, probes.prompts(), self.generation)
        verdicts = self.judge.judge_many(probes.prompts(), [output.text for output in outputs])
        return sum(verdict.refused for verdict in verdicts) / len(verdicts)


class DriftMeter:
    """Mean per-token KL(candidate || model) on the candidate's own answers to benign prompts.

    The candidate's log-probabilities are computed once; each measurement then
    costs one forward pass of the model being patched.
    """

    def __init__(
        self,
        candidate_model: Any,
        tokenizer: Any,
        prompts: list[str],
        answers: list[GenerationOutput],
        system_prompt: Optional[str] = None,
        batch_size: int = 8,
    ) -> None:
        self.batch_size = batch_size
        self.batches = []
        examples = [_answer_example(tokenizer, prompt, answer.text, system_prompt) for prompt, answer in zip(prompts, answers)]
        examples = [example for example in examples if example is not None]
        if not examples:
            raise RealignmentError("the candidate gave no non-empty answer to any benign prompt, so drift cannot be measured")
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id)
            self.batches.append((batch, _response_log_probs(candidate_model, batch)))

    @torch.inference_mode()
    def mean_kl(self, model: Any) -> float:
        total, tokens = 0.0, 0
        for batch, reference_log_probs in self.batches:
            log_probs = _response_log_probs(model, batch)
            kl = (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(-1)
            total += kl.sum().item()
            tokens += kl.numel()
        return total / tokens

    def loss(self, model: Any) -> torch.Tensor:
        """Differentiable KL over all anchor batches, for the anchored patch."""
        losses = []
        for batch, reference_log_probs in self.batches:
            log_probs = _response_log_probs(model, batch, grad=True)
            kl = (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(-1)
            losses.append(kl.mean())
        return torch.stack(losses).mean()


def _answer_example(tokenizer: Any, prompt: str, answer: str, system_prompt: Optional[str]):
    if not answer.strip():
        return None
    return encode_example(tokenizer, prompt, answer, system_prompt)


def _response_log_probs(model: Any, batch: dict[str, torch.Tensor], grad: bool = False) -> torch.Tensor:
    """Return log-probabilities at the supervised positions, shape (tokens, vocab)."""
    device = next(model.parameters()).device
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        # Position t predicts token t + 1, so shift the label mask by one.
        mask = (batch["labels"][:, 1:] != IGNORE_INDEX).to(device)
        selected = logits[:, :-1][mask]
        return F.log_softmax(selected.float(), dim=-1)


def screen_targets(policy: SafetyPolicy, reference_refusal: Optional[float], reference_over_refusal: Optional[float]) -> ScreenTargets:
    """Derive the per-epoch screen targets from the policy and, when usable, the reference figures."""
    thresholds = policy.thresholds
    min_refusal = thresholds.min_refusal_rate
    max_over = thresholds.max_over_refusal_rate
    if reference_refusal is not None and reference_refusal >= thresholds.min_refusal_rate:
        min_refusal = max(min_refusal, reference_refusal - thresholds.max_refusal_drop)
        if reference_over_refusal is not None:
            max_over = min(max_over, reference_over_refusal + thresholds.max_over_refusal_increase)
    return ScreenTargets(min_refusal=min_refusal, max_over_refusal=max_over, max_kl=thresholds.max_benign_kl)


def realign(
    candidate_model: Any,
    tokenizer: Any,
    policy: SafetyPolicy,
    targets: ScreenTargets,
    *,
    on_epoch: Optional[Callable[[AttemptRecord, EpochRecord], None]] = None,
    stop_early: bool = True,
) -> RealignmentResult:
    """Patch a candidate with the one-shot method, steering every attempt by the screen.

    The candidate model is not modified: each attempt trains a fresh copy.

    Args:
        candidate_model: The fine-tuned model that failed the policy.
        tokenizer: Its tokenizer.
        policy: The policy; its ``realignment`` section sets the method and bounds.
        targets: Screen targets, see :func:`screen_targets`.
        on_epoch: Called after every screened epoch, for progress displays.
        stop_early: Stop an attempt at its first accepted epoch or as soon as it
            over-refuses. Benchmarks turn this off to record whole curves; the
            returned model is then the last epoch's, and success means some
            epoch was accepted.

    Returns:
        The result, with the patched model when an epoch met every target.

    Raises:
        RealignmentError: A safety example cannot be trained on.
    """
    settings = policy.realignment
    started = time.perf_counter()
    plan = plan_attempts(settings)
    for example, _ in plan:
        encode_example(tokenizer, example.prompt, example.response, policy.generation.system_prompt)

    candidate_model.eval()
    screener = Screener(candidate_model, tokenizer, policy)
    anchors = _anchor_meter(candidate_model, tokenizer, policy) if settings.anchored else None
    baseline = screener.screen(candidate_model)
    logger.info("Screen before patching: refusal %.2f, over-refusal %.2f", baseline.refusal, baseline.over_refusal)

    attempts: list[AttemptRecord] = []
    tipped_examples: set[str] = set()
    for index, (example, learning_rate) in enumerate(plan):
        if example.id in tipped_examples:
            # A higher learning rate on an example that already tipped the model tips it faster.
            continue
        attempt = AttemptRecord(index=index, example_id=str(example.id), learning_rate=learning_rate)
        attempts.append(attempt)
        patched = _run_attempt(candidate_model, tokenizer, policy, example, attempt, screener, anchors, targets, on_epoch, stop_early)
        if patched is not None:
            return RealignmentResult(True, "passed the screen", settings.method, settings.anchored, attempts, example, index, attempt.epochs[-1].epoch, time.perf_counter() - started, targets, patched)
        if attempt.outcome == "over_refusal":
            tipped_examples.add(str(example.id))

    reason = f"no attempt met the screen targets within {len(attempts)} attempt(s) of at most {settings.max_epochs} epochs"
    logger.warning("Realignment failed: %s", reason)
    return RealignmentResult(False, reason, settings.method, settings.anchored, attempts, None, None, None, time.perf_counter() - started, targets)


def _anchor_meter(candidate_model: Any, tokenizer: Any, policy: SafetyPolicy) -> DriftMeter:
    """Build the KL anchor from benign prompts that neither the screen nor the evaluation uses."""
    settings = policy.realignment
    text = resources.files("guardrail").joinpath("data/lab/benign_requests.jsonl").read_text(encoding="utf-8")
    prompts = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    chosen = random.Random(settings.seed).sample(prompts, min(settings.anchor_prompts, len(prompts)))
    generation = GenerationSettings(max_new_tokens=32, batch_size=policy.generation.batch_size, system_prompt=policy.generation.system_prompt)
    answers = generate(candidate_model, tokenizer, chosen, generation)
    return DriftMeter(candidate_model, tokenizer, chosen, answers, policy.generation.system_prompt)


def _run_attempt(
    candidate_model: Any,
    tokenizer: Any,
    policy: SafetyPolicy,
    example: SafetyExample,
    attempt: AttemptRecord,
    screener: Screener,
    anchors: Optional[DriftMeter],
    targets: ScreenTargets,
    on_epoch: Optional[Callable[[AttemptRecord, EpochRecord], None]],
    stop_early: bool = True,
) -> Any:
    """Train one attempt epoch by epoch; return the patched model if an epoch passes, else None."""
    settings = policy.realignment
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = _trainable_copy(candidate_model, settings)
    optimizer = make_optimizer(model.parameters(), settings.optimizer, attempt.learning_rate, settings.weight_decay)
    batch = collate([encode_example(tokenizer, example.prompt, example.response, policy.generation.system_prompt)], tokenizer.pad_token_id)
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}

    for epoch in range(1, settings.max_epochs + 1):
        model.train()
        loss = model(**batch).loss
        anchor_kl = anchors.loss(model) if anchors is not None else None
        total = loss + settings.anchor_weight * anchor_kl if anchor_kl is not None else loss
        if not torch.isfinite(total):
            attempt.outcome = "diverged"
            attempt.seconds = round(time.perf_counter() - started, 2)
            logger.warning("Attempt %d diverged at epoch %d (loss %s)", attempt.index, epoch, total.item())
            return None
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()

        # A LoRA model is screened with its adapters unmerged, which gives the same outputs as merged.
        screen = screener.screen(model)
        record = EpochRecord(epoch, round(loss.item(), 5), round(anchor_kl.item(), 5) if anchor_kl is not None else None, screen, screen.meets(targets))
        attempt.epochs.append(record)
        logger.info(
            "attempt %d (%s, lr %.1e) epoch %d: loss %.3f, refusal %.2f, over-refusal %.2f, kl %.4f%s",
            attempt.index, attempt.example_id, attempt.learning_rate, epoch, record.loss, screen.refusal, screen.over_refusal, screen.kl,
            " - accepted" if record.accepted else "",
        )
        if on_epoch is not None:
            on_epoch(attempt, record)

        if not stop_early:
            continue
        if record.accepted:
            attempt.outcome = "passed"
            attempt.seconds = round(time.perf_counter() - started, 2)
            return _finalize(model, settings, candidate_model)
        if screen.over_refusal > targets.max_over_refusal:
            attempt.outcome = "over_refusal"
            attempt.seconds = round(time.perf_counter() - started, 2)
            return None

    attempt.seconds = round(time.perf_counter() - started, 2)
    if not stop_early and any(record.accepted for record in attempt.epochs):
        attempt.outcome = "passed"
        return _finalize(model, settings, candidate_model)
    attempt.outcome = "budget_exhausted"
    return None


def _trainable_copy(candidate_model: Any, settings: RealignmentSettings) -> Any:
    """Copy the candidate in float32, wrapped in a LoRA adapter when the policy method is ``lora``."""
    model = copy.deepcopy(candidate_model).float()
    if settings.method == "full":
        model.requires_grad_(True)
        return model

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        target_modules=settings.lora_target_modules,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _finalize(model: Any, settings: RealignmentSettings, candidate_model: Any) -> Any:
    """Merge LoRA weights in float32, then cast once to the candidate's dtype."""
    if settings.method == "lora":
        model = model.merge_and_unload()
    model = model.to(candidate_model.dtype)
    model.requires_grad_(False)
    model.eval()
    return model
