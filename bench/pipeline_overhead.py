"""Measure what the Prefect and KFP adapters add to a gate run.

Runs the gate on the same model with the same policy three ways: the library
(``guardrail.gate.run_gate``), the Prefect flow (against a temporary local
Prefect server from ``prefect_test_harness``), and the KFP pipeline (under
``kfp.local.SubprocessRunner``). Each way gets its own registry and audit
folders, and the evaluation cache is off, so every run does the full work.
The wall time of a Prefect run excludes the server start-up, which happens
once per process.

Two scenarios run: ``approve`` (lenient thresholds, so the gate only
evaluates and registers) and ``block`` (default thresholds, so the gate also
runs the patch step, whose patch fails the screen).

Usage:
    python bench/pipeline_overhead.py                      # the tiny test model, built offline
    python bench/pipeline_overhead.py --model path/to/model --repeats 3 --out bench/results/pipeline_overhead.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
# The policy writer and the tiny model builder live with the tests.
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

logger = logging.getLogger("bench.pipeline_overhead")

ENGINES = ("library", "prefect", "kfp")
SCENARIOS = {"approve": True, "block": False}


def run_library(model: Path, policy: Path, root: Path) -> str:
    from guardrail.gate import run_gate
    from guardrail.policy import load_policy

    result = run_gate(str(model), load_policy(policy), policy_source=str(policy), work_dir=root / "work", cache_dir=None)
    return result.decision


def run_prefect(model: Path, policy: Path, root: Path) -> str:
    from pipelines.prefect.flows import safety_gate

    state = safety_gate(str(model), str(policy), work_dir=str(root / "work"), cache_dir=None, return_state=True)
    return "blocked" if state.is_failed() else state.result()["decision"]


def run_kfp(model: Path, policy: Path, root: Path) -> str:
    from kfp import local

    from pipelines.kfp.pipeline import safety_gate_pipeline

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "kfp"), raise_on_error=False)
    safety_gate_pipeline(candidate=str(model), policy_path=str(policy), work_dir=str(root / "work"))
    records = sorted((root / "audit").glob("*.json"))
    return json.loads(records[-1].read_text(encoding="utf-8"))["decision"] if records else "error"


RUNNERS: dict[str, Callable[[Path, Path, Path], str]] = {"library": run_library, "prefect": run_prefect, "kfp": run_kfp}


def measure(model: Path, scratch: Path, repeats: int) -> dict:
    from pipeline_support import write_small_policy

    results: dict = {}
    for scenario, lenient in SCENARIOS.items():
        results[scenario] = {}
        for engine in ENGINES:
            seconds, decisions = [], []
            for attempt in range(repeats):
                root = scratch / scenario / engine / str(attempt)
                policy = write_small_policy(root, lenient=lenient)
                started = time.perf_counter()
                decisions.append(RUNNERS[engine](model, policy, root))
                seconds.append(round(time.perf_counter() - started, 2))
                logger.info("%s %s run %d: %s in %.2f s", scenario, engine, attempt + 1, decisions[-1], seconds[-1])
            results[scenario][engine] = {"wall_seconds": seconds, "median_seconds": round(statistics.median(seconds), 2), "decisions": decisions}
        library = results[scenario]["library"]["median_seconds"]
        for engine in ENGINES:
            median = results[scenario][engine]["median_seconds"]
            results[scenario][engine]["ratio_to_library"] = round(median / library, 2)
            results[scenario][engine]["added_seconds"] = round(median - library, 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="Time the gate through the library, the Prefect flow and the KFP pipeline.")
    parser.add_argument("--model", type=Path, help="model folder to gate; default: build the tiny test model")
    parser.add_argument("--repeats", type=int, default=2, help="runs per engine and scenario; the median is compared")
    parser.add_argument("--out", type=Path, help="JSON file to write the results to")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    with tempfile.TemporaryDirectory(prefix="guardrail-overhead-") as scratch_name:
        scratch = Path(scratch_name)
        # Prefect reads these before its first import.
        os.environ["PREFECT_HOME"] = str(scratch / "prefect-home")
        os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from prefect.testing.utilities import prefect_test_harness

        model = arguments.model
        if model is None:
            from conftest import build_tiny_model

            model = build_tiny_model(scratch / "tiny-chat")
        with prefect_test_harness(server_startup_timeout=120):
            results = measure(model, scratch, arguments.repeats)

    report = {
        "model": str(arguments.model or "tiny test model (tests/conftest.py build_tiny_model)"),
        "repeats": arguments.repeats,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "scenarios": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if arguments.out:
        arguments.out.parent.mkdir(parents=True, exist_ok=True)
        arguments.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
