"""Baselines on the attack-strength candidates: no patch, a RESTA-style safety vector, and reverting.

For every candidate of ``bench.attack_strength`` (built on demand, or reused
from the lab cache) the benchmark measures:

* **no patch**: the candidate as it is;
* **safety vector**: ``candidate + alpha * (reference - base)``, the
  task-arithmetic restore of RESTA (Bhardwaj, Anh and Poria, ACL 2024,
  arXiv 2402.11746) without its DARE drop-and-rescale step, with the lab's
  pre-alignment base as the unaligned model, for alpha 0.5 and 1.0;
* **revert**: the aligned reference itself, which drops the fine-tune.

Each row has the same figures as the attack-strength table (refusal,
StrongREJECT refusal, over-refusal, and benign KL from the candidate). The
gate's one-shot patch figures are copied in from ``attack_strength.json``
when that file exists, so the table compares all four side by side.

Usage:
    python -m bench.baselines            # 24 minutes on 2 cores
    python -m bench.baselines --quick    # smoke run for CI

Writes ``baselines.json`` and ``baselines.png`` into the output folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from bench.attack_strength import ATTACKS, QUICK_ATTACKS, attack_settings
from bench.common import BenchSetup, add_arguments, measure, percent, pyplot, setup_from, write_result
from guardrail.evaluation import evaluate_model
from guardrail.lab import build_candidate
from guardrail.loading import LoadedModel, load_model
from guardrail.policy import SafetyPolicy
from guardrail.verification import benign_kl

logger = logging.getLogger("bench.baselines")

ALPHAS = [0.5, 1.0]


@torch.no_grad()
def add_safety_vector(candidate: LoadedModel, reference: LoadedModel, base: LoadedModel, alpha: float) -> Any:
    """Return ``candidate + alpha * (reference - base)`` as a new model; the inputs are unchanged."""
    model = copy.deepcopy(candidate.model)
    reference_parameters = dict(reference.model.named_parameters())
    base_parameters = dict(base.model.named_parameters())
    for name, parameter in model.named_parameters():
        parameter.add_(alpha * (reference_parameters[name] - base_parameters[name]))
    return model


def measure_with_kl(loaded: LoadedModel, candidate: LoadedModel, candidate_evaluation, policy: SafetyPolicy, strongreject) -> dict[str, Any]:
    """Measure a model and its benign KL from the candidate."""
    figures = measure(loaded, policy, strongreject)
    figures["benign_kl"] = benign_kl(candidate, loaded.model, candidate_evaluation, policy)
    return figures


def run(setup: BenchSetup, only: Optional[list[str]] = None) -> dict[str, Any]:
    """Measure every baseline on every candidate and write the results and the plot."""
    models = setup.lab()
    policy = setup.policy()
    strongreject = setup.strongreject(policy)
    base = load_model(models.base, policy.loading)
    reference = load_model(models.reference, policy.loading)
    gate_rows = _gate_rows(setup)

    rows = []
    attacks = QUICK_ATTACKS if setup.quick else ATTACKS
    for name, (kind, count, benign) in attacks.items():
        if only and name not in only:
            continue
        folder = build_candidate(setup.home, models.reference, setup.lab_settings(attack_settings(setup, kind, count, benign)), name=name)
        candidate = load_model(folder, policy.loading)
        candidate_evaluation = evaluate_model(candidate, policy)
        row: dict[str, Any] = {"name": name, "baselines": {}}
        row["baselines"]["no patch"] = measure_with_kl(candidate, candidate, candidate_evaluation, policy, strongreject)
        for alpha in ALPHAS:
            restored = LoadedModel(reference=f"{folder} + {alpha} safety vector", kind="folder", model=add_safety_vector(candidate, reference, base, alpha), tokenizer=candidate.tokenizer, digests=candidate.digests)
            row["baselines"][f"safety vector x{alpha}"] = measure_with_kl(restored, candidate, candidate_evaluation, policy, strongreject)
            del restored
        row["baselines"]["revert to reference"] = measure_with_kl(reference, candidate, candidate_evaluation, policy, strongreject)
        if name in gate_rows:
            row["baselines"]["one-shot gate"] = gate_rows[name]
        rows.append(row)
        logger.info("%s: %s", name, {key: (value.get("refusal"), value.get("over_refusal")) for key, value in row["baselines"].items()})

    document = {"alphas": ALPHAS, "sizes": setup.sizes, "results": rows}
    write_result(setup, document)
    plot(document, setup.out / "baselines.png")
    logger.info("\n%s", markdown_table(document))
    return document


def _gate_rows(setup: BenchSetup) -> dict[str, dict[str, Any]]:
    """Read the gate's figures per candidate from the attack-strength results, when present."""
    path = setup.out.parent / "attack_strength" / "attack_strength.json"
    if not path.is_file():
        logger.warning("%s not found; the one-shot gate column stays empty (run bench.attack_strength first)", path)
        return {}
    rows = {}
    for row in json.loads(path.read_text(encoding="utf-8"))["results"]:
        after = row["patched"] if row["decision"] == "patched" else row["candidate"]
        rows[row["name"]] = {
            "decision": row["decision"],
            "refusal": after["refusal_rate"],
            "over_refusal": after["over_refusal_rate"],
            "strongreject_refusal": row.get("patched_strongreject") if row["decision"] == "patched" else row.get("candidate_strongreject"),
            "benign_kl": after.get("benign_kl"),
        }
    return rows


def markdown_table(document: dict[str, Any]) -> str:
    """Render the results as the Markdown table used in docs/benchmarks.md."""
    lines = ["| candidate | method | refusal | StrongREJECT | over-refusal | benign KL |", "|---|---|---|---|---|---|"]
    for row in document["results"]:
        for method, figures in row["baselines"].items():
            kl = figures.get("benign_kl")
            label = f"{method} ({figures['decision']})" if "decision" in figures else method
            lines.append(
                f"| {row['name']} | {label} | {percent(figures.get('refusal'))} | {percent(figures.get('strongreject_refusal'))} "
                f"| {percent(figures.get('over_refusal'))} | {'' if kl is None else f'{kl:.3f}'} |"
            )
    return "\n".join(lines)


def plot(document: dict[str, Any], path: Path) -> None:
    """Scatter refusal against over-refusal for every candidate and method."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    markers = {"no patch": "o", "safety vector x0.5": "^", "safety vector x1.0": "v", "revert to reference": "s", "one-shot gate": "*"}
    for row in document["results"]:
        for method, figures in row["baselines"].items():
            axis.scatter(figures.get("over_refusal") or 0, figures.get("refusal") or 0, marker=markers.get(method, "x"), s=60, label=f"{row['name']}: {method}")
    axis.set(xlabel="over-refusal (benign probes)", ylabel="refusal (harmful probes)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title="Baselines: refusal against over-refusal")
    axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, "baselines")
    parser.add_argument("--only", nargs="*", help="run only these candidates")
    arguments = parser.parse_args()
    run(setup_from(arguments, "baselines"), arguments.only)


if __name__ == "__main__":
    main()
