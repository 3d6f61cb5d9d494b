"""Sweep the one-shot patch over methods, learning rates and safety examples on the lab candidate.

Every configuration trains for the full epoch budget without early stopping
and screens harmful refusal, benign over-refusal and KL drift after each
epoch, so the output shows the whole trade-off curve, not only the point the
gate would stop at.

Usage:
    python bench/patch_sweep.py --home ~/.cache/guardrail --out bench/results/patch_sweep
    python bench/patch_sweep.py --quick   # two configurations, three epochs, small screens

Writes ``sweep.json`` and ``sweep.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from guardrail.lab import build_lab
from guardrail.loading import load_model
from guardrail.policy import SafetyPolicy
from guardrail.realignment import ScreenTargets, default_safety_examples, realign

logger = logging.getLogger("bench.patch_sweep")

CONFIGURATIONS = [
    {"name": "full lr 2e-5", "method": "full", "anchored": False, "learning_rate": 2e-5},
    {"name": "full lr 5e-5", "method": "full", "anchored": False, "learning_rate": 5e-5},
    {"name": "full lr 1e-4", "method": "full", "anchored": False, "learning_rate": 1e-4},
    {"name": "anchored lr 5e-5", "method": "full", "anchored": True, "learning_rate": 5e-5},
    {"name": "anchored lr 1e-4", "method": "full", "anchored": True, "learning_rate": 1e-4},
    {"name": "anchored x5 lr 5e-5", "method": "full", "anchored": True, "anchor_weight": 5.0, "learning_rate": 5e-5},
    {"name": "anchored x5 lr 1e-4", "method": "full", "anchored": True, "anchor_weight": 5.0, "learning_rate": 1e-4},
    {"name": "lora r8 lr 5e-4", "method": "lora", "anchored": False, "learning_rate": 5e-4},
    {"name": "anchored lora r8 lr 1e-3", "method": "lora", "anchored": True, "learning_rate": 1e-3},
]


def run(home: Path, out: Path, quick: bool, example_id: str, only: list[str] | None = None, screen_size: int = 30, candidate_path: Path | None = None) -> dict:
    candidate_path = candidate_path or build_lab(home).candidate
    candidate = load_model(candidate_path)
    examples = {example.id: example for example in default_safety_examples("general") + default_safety_examples("specific")}
    configurations = CONFIGURATIONS[:2] if quick else CONFIGURATIONS
    if only:
        configurations = [configuration for configuration in configurations if configuration["name"] in only]
    never = ScreenTargets(min_refusal=2.0, max_over_refusal=-1.0, max_kl=-1.0)
    results = []
    for configuration in configurations:
        policy = SafetyPolicy()
        realignment = policy.realignment
        realignment.method = configuration["method"]
        realignment.anchored = configuration["anchored"]
        realignment.learning_rate = configuration["learning_rate"]
        realignment.anchor_weight = configuration.get("anchor_weight", 1.0)
        realignment.escalation_learning_rates = []
        realignment.max_attempts = 1
        realignment.max_epochs = 3 if quick else 10
        realignment.screen_harmful = 6 if quick else screen_size
        realignment.screen_benign = 6 if quick else screen_size
        realignment.examples = [examples[example_id]]
        started = time.perf_counter()
        result = realign(candidate.model, candidate.tokenizer, policy, never, stop_early=False)
        epochs = result.attempts[0].epochs
        results.append(
            {
                **configuration,
                "example": example_id,
                "seconds": round(time.perf_counter() - started, 1),
                "epochs": [
                    {"epoch": e.epoch, "loss": e.loss, "refusal": e.screen.refusal, "over_refusal": e.screen.over_refusal, "kl": e.screen.kl}
                    for e in epochs
                ],
            }
        )
        logger.info("%s: %s", configuration["name"], [(e.screen.refusal, e.screen.over_refusal, round(e.screen.kl, 3)) for e in epochs])

    document = {
        "benchmark": "patch_sweep",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads()},
        "candidate": str(candidate_path),
        "quick": quick,
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(document, indent=2), encoding="utf-8")
    plot(document, out / "sweep.png")
    return document


def plot(document: dict, path: Path) -> None:
    """Plot screened refusal and over-refusal per epoch for every configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for result in document["results"]:
        epochs = [e["epoch"] for e in result["epochs"]]
        left.plot(epochs, [e["refusal"] for e in result["epochs"]], marker="o", label=result["name"])
        right.plot(epochs, [e["over_refusal"] for e in result["epochs"]], marker="o", label=result["name"])
    left.set(title="harmful refusal (screen)", xlabel="epoch", ylabel="rate", ylim=(-0.02, 1.02))
    right.set(title="benign over-refusal (screen)", xlabel="epoch", ylim=(-0.02, 1.02))
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path.home() / ".cache" / "guardrail", help="lab cache folder")
    parser.add_argument("--out", type=Path, default=Path("bench/results/patch_sweep"), help="output folder")
    parser.add_argument("--example", default="general-01", help="safety example id from guardrail/data/safety_examples.jsonl")
    parser.add_argument("--quick", action="store_true", help="two configurations, three epochs, six-prompt screens")
    parser.add_argument("--only", nargs="*", help="run only the configurations with these names")
    parser.add_argument("--candidate", type=Path, help="candidate model folder; default: the lab's candidate, built if missing")
    parser.add_argument("--screen-size", type=int, default=30, help="prompts per screening set (at most 30)")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run(arguments.home, arguments.out, arguments.quick, arguments.example, arguments.only, arguments.screen_size, arguments.candidate)


if __name__ == "__main__":
    main()
