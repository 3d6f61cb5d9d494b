"""Print the Markdown tables of the latest benchmark results, for docs/benchmarks.md.

Usage:
    python -m bench.tables                       # reads bench/results
    python -m bench.tables --results bench/results/quick
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import attack_strength, baselines, example_choice
from bench.common import REPO_ROOT


def cost_tables(document: dict) -> str:
    """Render the cost benchmark's gate timings, throughput and one-pass screen as Markdown."""
    lines = []
    gate = document.get("gate")
    if gate:
        timings = gate["timings"]
        lines += ["| stage | seconds |", "|---|---|"]
        lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items()]
        peaks = ", ".join(f"{entry['peak_rss_mib']:.0f} MiB before {entry['before'].split(' ')[0].lower()}" for entry in gate["peak_rss_by_stage"])
        lines += ["", f"Decision: {gate['decision']}. Peak resident memory: {peaks}.", ""]
    speed = document["throughput"]
    lines += [
        "| path | seconds | generated tokens | tokens/s |",
        "|---|---|---|---|",
        f"| batched (batch {speed['batch_size']}) | {speed['batched']['seconds']} | {speed['batched']['tokens']} | {speed['batched']['tokens_per_second']} |",
        f"| serial `model.generate` loop | {speed['serial']['seconds']} | {speed['serial']['tokens']} | {speed['serial']['tokens_per_second']} |",
        "",
        f"Speed-up {speed['speedup']}x on {speed['prompts']} prompts, {speed['max_new_tokens']} new tokens; identical text for {speed['same_text']} of {speed['prompts']} prompts.",
        "",
        "| model | prompts | generation + judge s | one-pass s | speed-up | threshold (calibrated) | agreement calibrated / at 0 | refusal judge / screen | over-refusal judge / screen |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in document["one_pass_screen"]:
        calibrated, zero, judge = row["calibrated"], row["threshold_zero"], row["judge"]
        lines.append(
            f"| {Path(row['model']).name} | {row['prompts']} | {row['generation_and_judge_seconds']} | {row['one_pass_seconds']} | {row['speedup']}x "
            f"| {row['calibration']['threshold']:.2f} | {100 * calibrated['agreement']:.0f}% / {100 * zero['agreement']:.0f}% "
            f"| {100 * judge['refusal_rate']:.0f}% / {100 * calibrated['refusal_rate']:.0f}% "
            f"| {100 * judge['over_refusal_rate']:.0f}% / {100 * calibrated['over_refusal_rate']:.0f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "results", help="folder holding one subfolder per benchmark")
    arguments = parser.parse_args()
    renderers = {
        "attack_strength": attack_strength.markdown_table,
        "example_choice": example_choice.markdown_table,
        "baselines": baselines.markdown_table,
        "cost": cost_tables,
    }
    for name, render in renderers.items():
        path = arguments.results / name / f"{name}.json"
        if not path.is_file():
            print(f"## {name}: no results at {path}\n")
            continue
        document = json.loads(path.read_text(encoding="utf-8"))
        print(f"## {name} ({document['date']}, {document['machine']['processor']}, {document['machine']['cpu_count']} cores)\n")
        print(render(document) + "\n")


if __name__ == "__main__":
    main()
