"""Low-rank analysis of the safety gradient.

Zhang et al. ("Safety at One Shot", arXiv 2601.01887) explain the one-shot
patch by a low-rank gradient of the loss on a single safety example. They
report that on 7B models the top 20 singular directions of each weight
matrix's gradient contain 86-95 % of its energy. They also report that the
top subspaces of different safety examples overlap by more than 0.8. This
module measures the same quantities on any model:

* the singular values of the safety gradient of every linear weight matrix in
  the transformer blocks, and the cumulative energy ratio
  ``CER(k) = sum(s[:k] ** 2) / sum(s ** 2)``;
* the overlap of the top-k left singular subspaces of two examples'
  gradients, ``||U_a[:, :k].T @ U_b[:, :k]||_F ** 2 / k`` (1 for the same
  subspace; about ``k / rows`` for random ones);
* with a reference model, the alignment between the patch direction (minus
  the gradient) and the way back to the reference (reference minus
  candidate): cosine similarity, and the share of the harmful update's energy
  that lies in the gradient's top-k subspace.

The gradient of one example of T tokens is a sum of T outer products, so its
rank is at most T. The report gives T next to every CER so that a reader can
tell structure from that bound.

Examples:
    >>> from guardrail.analysis import analyze
    >>> result = analyze(loaded, examples, reference=reference_loaded)
    >>> result.summary["cer"]["20"]
    0.91
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from guardrail.errors import GuardrailError
from guardrail.loading import LoadedModel
from guardrail.policy import SafetyExample
from guardrail.training import collate, encode_example

logger = logging.getLogger(__name__)

#: Projection names of Llama-style decoder blocks, the matrices the patch mostly changes.
LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_KS = (1, 4, 16, 20, 64)
#: Singular vectors kept per matrix for overlaps; the largest k reported.
KEPT_DIRECTIONS = 64


@dataclass
class MatrixSpectrum:
    """Singular values and energy ratios of one weight matrix's safety gradient."""

    name: str
    layer_type: str
    layer: Optional[int]
    shape: tuple[int, int]
    singular_values: list[float]
    cer: dict[str, float]
    norm: float


@dataclass
class ExampleGradient:
    """The safety gradient of one example, reduced to spectra and top singular subspaces."""

    example_id: str
    tokens: int
    loss: float
    spectra: list[MatrixSpectrum]
    # Top left singular vectors per matrix name, kept in memory for overlaps only.
    bases: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


@dataclass
class AnalysisResult:
    """Everything :func:`analyze` measured, ready for JSON."""

    model: dict[str, Any]
    reference: Optional[dict[str, Any]]
    ks: list[int]
    examples: list[dict[str, Any]]
    summary: dict[str, Any]
    overlaps: list[dict[str, Any]]
    harmful_direction: Optional[dict[str, Any]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "reference": self.reference,
            "ks": self.ks,
            "summary": self.summary,
            "overlaps": self.overlaps,
            "harmful_direction": self.harmful_direction,
            "examples": self.examples,
            "seconds": self.seconds,
        }


def _layer_of(name: str) -> tuple[Optional[str], Optional[int]]:
    """Return the projection type and block index of a parameter name, or (None, None)."""
    layer_type = next((kind for kind in LAYER_TYPES if f".{kind}." in name), None)
    if layer_type is None or not name.endswith("weight"):
        return None, None
    index = next((int(part) for part in name.split(".") if part.isdigit()), None)
    return layer_type, index


def cumulative_energy(singular_values: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Return ``CER(k)`` for each k; k beyond the number of singular values gives 1.0."""
    energy = singular_values.double() ** 2
    total = energy.sum().item()
    if total == 0:
        return {str(k): 0.0 for k in ks}
    cumulative = torch.cumsum(energy, 0)
    return {str(k): min(1.0, cumulative[min(k, len(cumulative)) - 1].item() / total) for k in ks}


def safety_gradient(loaded: LoadedModel, example: SafetyExample, system_prompt: Optional[str] = None) -> tuple[dict[str, torch.Tensor], int, float]:
    """Return the loss gradient of every block projection matrix on one safety example.

    The loss is the supervised fine-tuning loss on the response tokens, as in
    the patch itself, computed in float32.

    Returns:
        The gradients by parameter name, the example's token count and its loss.
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    encoded = encode_example(tokenizer, example.prompt, example.response, system_prompt)
    batch = collate([encoded], tokenizer.pad_token_id)
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}

    selected = {name: parameter for name, parameter in model.named_parameters() if _layer_of(name)[0] is not None}
    if not selected:
        raise GuardrailError(f"{loaded.reference} has no {'/'.join(LAYER_TYPES)} weight matrices; the analysis supports Llama-style decoders")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in selected.values():
        parameter.requires_grad_(True)

    model.eval()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    gradients = {name: parameter.grad.detach().float().clone() for name, parameter in selected.items()}
    model.zero_grad(set_to_none=True)
    for parameter in selected.values():
        parameter.requires_grad_(False)
    return gradients, int(batch["input_ids"].shape[1]), float(loss.item())


def spectrum_of(name: str, gradient: torch.Tensor, ks: Sequence[int]) -> tuple[MatrixSpectrum, torch.Tensor]:
    """Return the spectrum of one gradient matrix and its top left singular vectors."""
    layer_type, layer = _layer_of(name)
    left, singular_values, _ = torch.linalg.svd(gradient, full_matrices=False)
    spectrum = MatrixSpectrum(
        name=name,
        layer_type=str(layer_type),
        layer=layer,
        shape=(int(gradient.shape[0]), int(gradient.shape[1])),
        singular_values=[round(value, 8) for value in singular_values[:KEPT_DIRECTIONS].tolist()],
        cer=cumulative_energy(singular_values, ks),
        norm=float(torch.linalg.norm(gradient)),
    )
    return spectrum, left[:, :KEPT_DIRECTIONS].contiguous()


def subspace_overlap(first: torch.Tensor, second: torch.Tensor, k: int) -> float:
    """Return ``||A_k.T @ B_k||_F ** 2 / k`` for two orthonormal bases, a value in [0, 1]."""
    k = min(k, first.shape[1], second.shape[1])
    product = first[:, :k].T @ second[:, :k]
    return float((product**2).sum() / k)


def gradient_of_example(loaded: LoadedModel, example: SafetyExample, ks: Sequence[int], keep_gradients: bool, system_prompt: Optional[str] = None) -> ExampleGradient:
    """Compute one example's gradient and reduce it to spectra and bases."""
    gradients, tokens, loss = safety_gradient(loaded, example, system_prompt)
    spectra, bases = [], {}
    for name, gradient in gradients.items():
        spectrum, basis = spectrum_of(name, gradient, ks)
        spectra.append(spectrum)
        bases[name] = basis
    logger.info("Example %s: %d tokens, loss %.3f, %d matrices", example.id, tokens, loss, len(spectra))
    return ExampleGradient(str(example.id), tokens, loss, spectra, bases, gradients if keep_gradients else {})


def summarize_cer(gradients: list[ExampleGradient], ks: Sequence[int]) -> dict[str, Any]:
    """Average CER(k) over matrices: overall, per layer type, and its spread over matrices."""
    spectra = [spectrum for gradient in gradients for spectrum in gradient.spectra]
    summary: dict[str, Any] = {"matrices": len(spectra), "cer": {}, "cer_min": {}, "cer_max": {}, "cer_by_layer_type": {}}
    for k in map(str, ks):
        values = [spectrum.cer[k] for spectrum in spectra]
        summary["cer"][k] = sum(values) / len(values)
        summary["cer_min"][k] = min(values)
        summary["cer_max"][k] = max(values)
    for layer_type in LAYER_TYPES:
        chosen = [spectrum for spectrum in spectra if spectrum.layer_type == layer_type]
        if chosen:
            summary["cer_by_layer_type"][layer_type] = {k: sum(s.cer[k] for s in chosen) / len(chosen) for k in map(str, ks)}
    summary["tokens"] = {gradient.example_id: gradient.tokens for gradient in gradients}
    return summary


def example_overlaps(gradients: list[ExampleGradient], ks: Sequence[int]) -> list[dict[str, Any]]:
    """Return the mean top-k subspace overlap for every pair of examples, with the random baseline."""
    rows = []
    for first, second in itertools.combinations(gradients, 2):
        row: dict[str, Any] = {"first": first.example_id, "second": second.example_id, "overlap": {}, "random_baseline": {}}
        for k in ks:
            overlaps = [subspace_overlap(first.bases[name], second.bases[name], k) for name in first.bases]
            baselines = [min(k, basis.shape[1]) / basis.shape[0] for basis in first.bases.values()]
            row["overlap"][str(k)] = sum(overlaps) / len(overlaps)
            row["random_baseline"][str(k)] = sum(baselines) / len(baselines)
        rows.append(row)
    return rows


def harmful_direction(gradient: ExampleGradient, candidate: LoadedModel, reference: LoadedModel, k: int = 20) -> dict[str, Any]:
    """Compare the patch direction of one example with the way back to the reference.

    Returns the cosine between ``-gradient`` and ``reference - candidate`` over
    all analysed matrices together and per layer type, and the share of the
    harmful update's energy in the gradient's top-k left singular subspace
    against the ``k / rows`` share a random subspace would hold.
    """
    reference_parameters = dict(reference.model.named_parameters())
    candidate_parameters = dict(candidate.model.named_parameters())
    dot, gradient_norm, delta_norm = 0.0, 0.0, 0.0
    per_type: dict[str, list[float]] = {layer_type: [0.0, 0.0, 0.0] for layer_type in LAYER_TYPES}
    captured, baseline, count = 0.0, 0.0, 0
    for name, grad in gradient.gradients.items():
        if name not in reference_parameters:
            raise GuardrailError(f"the reference has no parameter {name}; compare models of the same architecture")
        way_back = (reference_parameters[name].detach().float() - candidate_parameters[name].detach().float())
        direction = -grad
        step_dot = float((direction * way_back).sum())
        step_gradient, step_delta = float((direction**2).sum()), float((way_back**2).sum())
        dot, gradient_norm, delta_norm = dot + step_dot, gradient_norm + step_gradient, delta_norm + step_delta
        totals = per_type[_layer_of(name)[0]]
        totals[0] += step_dot
        totals[1] += step_gradient
        totals[2] += step_delta
        if step_delta > 0:
            basis = gradient.bases[name][:, :k]
            captured += float(((basis.T @ way_back) ** 2).sum()) / step_delta
            baseline += basis.shape[1] / basis.shape[0]
            count += 1

    def cosine(product: float, first: float, second: float) -> Optional[float]:
        return product / (first**0.5 * second**0.5) if first > 0 and second > 0 else None

    return {
        "example": gradient.example_id,
        "k": k,
        "cosine": cosine(dot, gradient_norm, delta_norm),
        "cosine_by_layer_type": {layer_type: cosine(*totals) for layer_type, totals in per_type.items() if totals[1] > 0},
        "update_energy_in_top_k": captured / count if count else None,
        "random_baseline": baseline / count if count else None,
        "update_norm": delta_norm**0.5,
    }


def analyze(
    loaded: LoadedModel,
    examples: Sequence[SafetyExample],
    *,
    reference: Optional[LoadedModel] = None,
    ks: Sequence[int] = DEFAULT_KS,
    system_prompt: Optional[str] = None,
) -> AnalysisResult:
    """Measure the rank structure of the safety gradient of a model.

    Args:
        loaded: The model to analyse, usually the fine-tuned candidate the patch starts from.
        examples: Safety examples; two or more also give subspace overlaps.
        reference: The aligned model the candidate was fine-tuned from; adds the
            alignment with the harmful fine-tuning direction.
        ks: The k values of CER(k) and of the overlaps.
        system_prompt: System message used when encoding the examples.

    Returns:
        Spectra, CER summaries, overlaps and, with a reference, the direction comparison.

    Raises:
        GuardrailError: No examples, a k out of range, or an unsupported architecture.
    """
    if not examples:
        raise GuardrailError("no safety examples to analyse; pass at least one --example")
    bad = [k for k in ks if not 1 <= k <= KEPT_DIRECTIONS]
    if bad:
        raise GuardrailError(f"invalid k values {bad}; use integers from 1 to {KEPT_DIRECTIONS}")
    started = time.perf_counter()
    gradients = []
    directions = []
    for example in examples:
        gradient = gradient_of_example(loaded, example, ks, keep_gradients=reference is not None, system_prompt=system_prompt)
        if reference is not None:
            directions.append(harmful_direction(gradient, loaded, reference))
            gradient.gradients = {}
        gradients.append(gradient)

    return AnalysisResult(
        model=loaded.describe(),
        reference=reference.describe() if reference is not None else None,
        ks=list(ks),
        examples=[
            {"id": gradient.example_id, "tokens": gradient.tokens, "loss": gradient.loss, "matrices": [spectrum.__dict__ for spectrum in gradient.spectra]}
            for gradient in gradients
        ],
        summary=summarize_cer(gradients, ks),
        overlaps=example_overlaps(gradients, ks),
        harmful_direction={"per_example": directions} if directions else None,
        seconds=round(time.perf_counter() - started, 1),
    )


def summary_markdown(result: AnalysisResult) -> str:
    """Render the headline figures of an analysis as Markdown."""
    ks = [str(k) for k in result.ks]
    lines = [
        "# Safety-gradient analysis",
        "",
        f"- model: `{result.model.get('reference')}` ({result.summary['matrices']} gradient matrices over {len(result.examples)} example(s))",
        f"- tokens per example (upper bound on each gradient's rank): {', '.join(f'{key} {value}' for key, value in result.summary['tokens'].items())}",
        "",
        "## Cumulative energy ratio CER(k), mean over matrices",
        "",
        "| layer type | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
        "| all (mean) | " + " | ".join(f"{result.summary['cer'][k]:.3f}" for k in ks) + " |",
        "| all (min) | " + " | ".join(f"{result.summary['cer_min'][k]:.3f}" for k in ks) + " |",
    ]
    for layer_type, values in result.summary["cer_by_layer_type"].items():
        lines.append(f"| {layer_type} | " + " | ".join(f"{values[k]:.3f}" for k in ks) + " |")
    if result.overlaps:
        lines += ["", "## Top-k subspace overlap between examples (left singular vectors)", "", "| examples | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for row in result.overlaps:
            lines.append(f"| {row['first']} / {row['second']} | " + " | ".join(f"{row['overlap'][k]:.3f}" for k in ks) + " |")
        lines.append("| random subspaces | " + " | ".join(f"{result.overlaps[0]['random_baseline'][k]:.3f}" for k in ks) + " |")
    if result.harmful_direction:
        lines += ["", "## Patch direction against the harmful update (reference minus candidate)", "", "| example | cosine | update energy in top-20 | random subspace |", "|---|---|---|---|"]
        for row in result.harmful_direction["per_example"]:
            lines.append(f"| {row['example']} | {row['cosine']:.4f} | {row['update_energy_in_top_k']:.3f} | {row['random_baseline']:.3f} |")
    return "\n".join(lines) + "\n"
