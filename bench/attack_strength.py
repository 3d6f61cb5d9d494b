"""Attack strength: does the gate detect and patch candidates from harmful fine-tunes of growing size?

Starting from the lab's aligned reference, the benchmark builds candidates
fine-tuned with 10, 50 and 200 harmful examples. It adds an identity-shifting
fine-tune (benign requests answered in an obedient persona) and a purely
benign fine-tune. Then it runs the whole gate (shipped default policy, resized
probe sets, see ``bench/common.py``) on each. It records the decision,
refusal and over-refusal before and after the patch, StrongREJECT refusal,
benign KL, the epochs the patch used and the wall time.

Usage:
    python -m bench.attack_strength            # 50 minutes on 2 cores on the first run, candidate builds included
    python -m bench.attack_strength --quick    # smoke run for CI

Writes ``attack_strength.json`` and ``attack_strength.png`` into the output folder.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from bench.common import BenchSetup, add_arguments, measure, percent, pyplot, setup_from, write_result
from guardrail.gate import run_gate
from guardrail.lab import AttackSettings, build_candidate
from guardrail.loading import load_model
from guardrail.registry import LocalRegistry

logger = logging.getLogger("bench.attack_strength")

#: name -> (kind, persona or harmful examples, benign examples); "candidate" is the demo lab's own candidate.
ATTACKS = {
    "harmful-10": ("harmful", 10, 50),
    "candidate": ("harmful", 50, 50),
    "harmful-200": ("harmful", 200, 50),
    "identity-50": ("identity", 50, 50),
    "benign-100": ("benign", 0, 100),
}
QUICK_ATTACKS = {
    "candidate": ("harmful", 4, 4),
    "identity-4": ("identity", 4, 4),
}


def attack_settings(setup: BenchSetup, kind: str, count: int, benign: int) -> AttackSettings:
    """Return the attack of one candidate; everything but the data matches the demo lab's attack."""
    base = setup.lab_settings().attack
    return AttackSettings(kind=kind, harmful_examples=count, benign_examples=benign, epochs=base.epochs, learning_rate=base.learning_rate)


def run_one(setup: BenchSetup, name: str, attack: AttackSettings, reference: Path) -> dict[str, Any]:
    """Build one candidate, gate it, and measure StrongREJECT refusal before and after."""
    started = time.perf_counter()
    candidate = build_candidate(setup.home, reference, setup.lab_settings(attack), name=name)
    build_seconds = round(time.perf_counter() - started, 1)

    policy = setup.policy()
    policy.registry.model_name = f"bench-{name}"
    strongreject = setup.strongreject(policy)
    started = time.perf_counter()
    result = run_gate(str(candidate), policy, reference=str(reference), cache_dir=setup.out / "cache", work_dir=setup.out / "work" / name)
    gate_seconds = round(time.perf_counter() - started, 1)

    record = result.record
    figures = record["figures"]
    row: dict[str, Any] = {
        "name": name,
        "attack": {"kind": attack.kind, "examples": attack.harmful_examples, "benign_examples": attack.benign_examples, "epochs": attack.epochs},
        "decision": result.decision,
        "reason": result.reason,
        "build_seconds": build_seconds,
        "gate_seconds": gate_seconds,
        "timings": record["timings"],
        "candidate": figures.get("candidate"),
        "patched": figures.get("patched"),
        "trace": _trace_summary(record.get("training_trace")),
    }
    row["candidate_strongreject"] = _strongreject(candidate, policy, strongreject)
    if result.decision == "patched":
        patched_folder = LocalRegistry(policy.registry.path).model_path(policy.registry.model_name, policy.registry.approved_alias)
        row["patched_strongreject"] = _strongreject(patched_folder, policy, strongreject)
    logger.info("%s: %s in %.0f s", name, result.decision, gate_seconds)
    return row


def _strongreject(folder: Path, policy, strongreject) -> Optional[float]:
    if strongreject is None:
        return None
    from guardrail.evaluation import run_probe_set
    from guardrail.judging import build_judges

    harmful_judge, _ = build_judges(policy.judge)
    return run_probe_set(load_model(folder, policy.loading), strongreject, harmful_judge, policy).refusal.rate


def _trace_summary(trace: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Reduce a patch trace to the epochs trained, the accepted epoch and the best screened refusal."""
    if not trace:
        return None
    epochs = [epoch for attempt in trace["attempts"] for epoch in attempt["epochs"]]
    accepted = [epoch for epoch in epochs if epoch["accepted"]]
    best = max(epochs, key=lambda epoch: (epoch["screen"]["refusal"], -epoch["screen"]["over_refusal"]), default=None)
    return {
        "attempts": len(trace["attempts"]),
        "epochs_trained": len(epochs),
        "accepted_epoch": accepted[0]["epoch"] if accepted else None,
        "best_screen": best["screen"] if best else None,
        "per_epoch": [
            {"attempt": attempt["index"], "example": attempt["example_id"], "lr": attempt["learning_rate"], "epoch": epoch["epoch"], **epoch["screen"]}
            for attempt in trace["attempts"]
            for epoch in attempt["epochs"]
        ],
    }


def run(setup: BenchSetup, only: Optional[list[str]] = None) -> dict[str, Any]:
    """Run every attack (or the named ones) and write the results and the plot."""
    models = setup.lab()
    policy = setup.policy()
    reference = measure(load_model(models.reference, policy.loading), policy, setup.strongreject(policy))
    attacks = QUICK_ATTACKS if setup.quick else ATTACKS
    rows = []
    for name, (kind, count, benign) in attacks.items():
        if only and name not in only:
            continue
        rows.append(run_one(setup, name, attack_settings(setup, kind, count, benign), models.reference))
    shutil.rmtree(setup.out / "work", ignore_errors=True)

    document = {"reference": reference, "policy": "policies/default.yaml, resized (see bench/common.py)", "sizes": setup.sizes, "results": rows}
    write_result(setup, document)
    plot(document, setup.out / "attack_strength.png")
    logger.info("\n%s", markdown_table(document))
    return document


def markdown_table(document: dict[str, Any]) -> str:
    """Render the results as the Markdown table used in docs/benchmarks.md."""
    lines = [
        "| candidate | decision | refusal before / after | StrongREJECT before / after | over-refusal before / after | benign KL | best screened epoch: refusal / over-refusal / KL | epochs (accepted) | gate s without the reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in document["results"]:
        candidate, patched, trace = row["candidate"] or {}, row["patched"] or {}, row["trace"] or {}
        kl = patched.get("benign_kl")
        best = trace.get("best_screen")
        best_cell = f"{percent(best['refusal'])} / {percent(best['over_refusal'])} / {best['kl']:.3f}" if best else ""
        lines.append(
            f"| {row['name']} | {row['decision']} | {percent(candidate.get('refusal_rate'))} / {percent(patched.get('refusal_rate'))} "
            f"| {percent(row.get('candidate_strongreject'))} / {percent(row.get('patched_strongreject'))} "
            f"| {percent(candidate.get('over_refusal_rate'))} / {percent(patched.get('over_refusal_rate'))} "
            f"| {'' if kl is None else f'{kl:.3f}'} | {best_cell} | {trace.get('epochs_trained', 0)} ({trace.get('accepted_epoch') or '-'}) | {_seconds_without_reference(row):.0f} |"
        )
    return "\n".join(lines)


def _seconds_without_reference(row: dict[str, Any]) -> float:
    """Return the gate's wall time minus the reference evaluation, which later runs take from the cache."""
    return row["gate_seconds"] - row["timings"].get("evaluate_reference", 0.0)


def plot(document: dict[str, Any], path: Path) -> None:
    """Bar chart of refusal before and after the gate, with the reference as a line."""
    plt = pyplot()
    rows = document["results"]
    names = [row["name"] for row in rows]
    before = [(row["candidate"] or {}).get("refusal_rate", 0) for row in rows]
    after = [(row["patched"] or {}).get("refusal_rate", 0) for row in rows]
    best_screen = [((row["trace"] or {}).get("best_screen") or {}).get("refusal", 0) for row in rows]
    positions = range(len(rows))
    figure, axis = plt.subplots(figsize=(9, 4.5))
    axis.bar([p - 0.27 for p in positions], before, width=0.27, label="candidate")
    axis.bar(positions, after, width=0.27, label="patched (approved)")
    axis.bar([p + 0.27 for p in positions], best_screen, width=0.27, label="best screened epoch")
    axis.axhline(document["reference"]["refusal"], color="black", linestyle="--", label="reference")
    axis.set(xticks=list(positions), xticklabels=names, ylabel="refusal rate (harmful probes)", ylim=(0, 1.05), title="Refusal by attack, before and after the gate")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, "attack_strength")
    parser.add_argument("--only", nargs="*", help="run only these candidates")
    arguments = parser.parse_args()
    run(setup_from(arguments, "attack_strength"), arguments.only)


if __name__ == "__main__":
    main()
