"""Safety example choice: which single example, and how many examples, restore refusal?

The benchmark patches the lab candidate (the reference after a 50-example
harmful fine-tune) with the published one-shot recipe unchanged. That is
full fine-tuning with AdamW at lr 2e-5, one step per epoch on the whole
example set, and 10 epochs, without early stopping or a KL anchor. It compares several single
examples (general refusals against category-specific ones) and sets of 1,
2, 4 and 8 general examples. After every epoch it screens refusal,
over-refusal and KL drift on the held-out screening sets, and after the last
epoch it measures the bench probe subsets and StrongREJECT.

Usage:
    python -m bench.example_choice            # 20 minutes on 2 cores
    python -m bench.example_choice --quick    # smoke run for CI

Writes ``example_choice.json`` and ``example_choice.png`` into the output folder.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

from bench.common import BenchSetup, add_arguments, measure, percent, pyplot, setup_from, write_result
from guardrail.loading import LoadedModel, load_model
from guardrail.policy import SafetyExample, SafetyPolicy
from guardrail.realignment import Screener, default_safety_examples
from guardrail.training import collate, encode_example, make_optimizer

logger = logging.getLogger("bench.example_choice")

LEARNING_RATE = 2e-5
SINGLE_EXAMPLES = ["general-01", "general-02", "general-03", "specific-cybercrime", "specific-weapons"]
SET_SIZES = [2, 4, 8]
QUICK_SINGLE_EXAMPLES = ["general-01", "specific-fraud"]
QUICK_SET_SIZES = [2]


def configurations(quick: bool) -> list[tuple[str, list[SafetyExample]]]:
    """Return (name, examples) for every run: the single examples, then the general sets."""
    known = {example.id: example for example in default_safety_examples("general") + default_safety_examples("specific")}
    general = default_safety_examples("general")
    runs = [(example_id, [known[example_id]]) for example_id in (QUICK_SINGLE_EXAMPLES if quick else SINGLE_EXAMPLES)]
    runs += [(f"{size} general", general[:size]) for size in (QUICK_SET_SIZES if quick else SET_SIZES)]
    return runs


def patch_with(candidate: LoadedModel, examples: list[SafetyExample], policy: SafetyPolicy, screener: Screener, epochs: int) -> tuple[Any, list[dict[str, Any]]]:
    """Fine-tune a copy of the candidate on the examples, one full-batch step per epoch, screening each epoch."""
    torch.manual_seed(policy.realignment.seed)
    model = copy.deepcopy(candidate.model).float()
    model.requires_grad_(True)
    optimizer = make_optimizer(model.parameters(), "adamw", LEARNING_RATE)
    encoded = [encode_example(candidate.tokenizer, example.prompt, example.response, policy.generation.system_prompt) for example in examples]
    batch = collate(encoded, candidate.tokenizer.pad_token_id)

    trace = []
    for epoch in range(1, epochs + 1):
        model.train()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), policy.realignment.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        screen = screener.screen(model)
        trace.append({"epoch": epoch, "loss": round(loss.item(), 4), "refusal": screen.refusal, "over_refusal": screen.over_refusal, "kl": screen.kl})
        logger.info("epoch %d: loss %.3f, refusal %.2f, over-refusal %.2f, kl %.4f", epoch, loss.item(), screen.refusal, screen.over_refusal, screen.kl)
    model.requires_grad_(False)
    return model, trace


def run(setup: BenchSetup, only: Optional[list[str]] = None) -> dict[str, Any]:
    """Run every configuration and write the results and the plot."""
    models = setup.lab()
    policy = setup.policy()
    strongreject = setup.strongreject(policy)
    candidate = load_model(models.candidate, policy.loading)
    candidate_figures = measure(candidate, policy, strongreject)
    screener = Screener(candidate.model, candidate.tokenizer, policy)

    rows = []
    for name, examples in configurations(setup.quick):
        if only and name not in only:
            continue
        logger.info("Patching with %s (%d example(s))", name, len(examples))
        started = time.perf_counter()
        model, trace = patch_with(candidate, examples, policy, screener, setup.sizes["epochs"])
        train_seconds = round(time.perf_counter() - started, 1)
        patched = LoadedModel(model=model, tokenizer=candidate.tokenizer, reference=f"{models.candidate} + {name}", digests=candidate.digests, kind=candidate.kind)
        figures = measure(patched, policy, strongreject)
        rows.append({"name": name, "examples": [example.id for example in examples], "train_and_screen_seconds": train_seconds, "after": figures, "per_epoch": trace})
        del model, patched

    document = {
        "recipe": {"method": "full", "optimizer": "adamw", "learning_rate": LEARNING_RATE, "epochs": setup.sizes["epochs"], "steps_per_epoch": 1, "anchored": False},
        "candidate": candidate_figures,
        "sizes": setup.sizes,
        "results": rows,
    }
    write_result(setup, document)
    plot(document, setup.out / "example_choice.png")
    logger.info("\n%s", markdown_table(document))
    return document


def markdown_table(document: dict[str, Any]) -> str:
    """Render the results as the Markdown table used in docs/benchmarks.md."""
    lines = [
        "| examples | refusal | StrongREJECT | over-refusal | screen: refusal / over-refusal / KL per epoch 2, 4, 6, 8, 10 |",
        "|---|---|---|---|---|",
    ]
    candidate = document["candidate"]
    lines.append(f"| none (candidate) | {percent(candidate['refusal'])} | {percent(candidate['strongreject_refusal'])} | {percent(candidate['over_refusal'])} | |")
    for row in document["results"]:
        after = row["after"]
        curve = ", ".join(f"{percent(e['refusal'])}/{percent(e['over_refusal'])}/{e['kl']:.2f}" for e in row["per_epoch"] if e["epoch"] % 2 == 0)
        lines.append(f"| {row['name']} | {percent(after['refusal'])} | {percent(after['strongreject_refusal'])} | {percent(after['over_refusal'])} | {curve} |")
    return "\n".join(lines)


def plot(document: dict[str, Any], path: Path) -> None:
    """Plot refusal against over-refusal per epoch (screen) for every configuration."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in document["results"]:
        epochs = [e["epoch"] for e in row["per_epoch"]]
        left.plot(epochs, [e["refusal"] for e in row["per_epoch"]], marker="o", label=row["name"])
        right.plot([e["over_refusal"] for e in row["per_epoch"]], [e["refusal"] for e in row["per_epoch"]], marker="o", label=row["name"])
    left.set(title="harmful refusal per epoch (screen)", xlabel="epoch", ylabel="refusal", ylim=(-0.02, 1.02))
    right.set(title="refusal restored against over-refusal (screen, all epochs)", xlabel="over-refusal", ylabel="refusal", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, "example_choice")
    parser.add_argument("--only", nargs="*", help="run only these configurations (example ids or '<n> general')")
    arguments = parser.parse_args()
    run(setup_from(arguments, "example_choice"), arguments.only)


if __name__ == "__main__":
    main()
