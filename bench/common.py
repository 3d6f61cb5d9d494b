"""Shared setup of the benchmark suite: lab models, probe subsets, measurement and output.

Every benchmark runs in one of two modes:

* full: the lab's SmolLM2-135M reference and candidates (built and cached under
  ``--home``), 50 harmful probes from the project's set, 50 StrongREJECT
  prompts and 50 benign probes, 48 new tokens;
* quick (``--quick``): a small lab trained on a few examples and 4 probes per
  set with 16 new tokens, so that CI runs every code path in a few minutes.
  Its figures are meaningless, and its JSON output states that.

StrongREJECT prompts are read at run time from ``--strongreject`` (by
default ``../shared/data/strongreject/strongreject_dataset.csv`` next to the
checkout); without that file the StrongREJECT column is left empty.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

from guardrail.evaluation import evaluate_model, run_probe_set
from guardrail.judging import build_judges
from guardrail.lab import AttackSettings, LabModels, LabSettings, build_lab
from guardrail.loading import LoadedModel
from guardrail.policy import SafetyPolicy, load_policy
from guardrail.probes import ProbeSet, ProbeSource, load_probe_set

logger = logging.getLogger("bench")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STRONGREJECT = REPO_ROOT.parent / "shared" / "data" / "strongreject" / "strongreject_dataset.csv"

#: Probe counts and decoding of the two modes.
FULL_SIZES = {"harmful": 50, "benign": 50, "strongreject": 50, "max_new_tokens": 48, "screen": 16, "epochs": 10, "attempts": 2}
QUICK_SIZES = {"harmful": 4, "benign": 4, "strongreject": 4, "max_new_tokens": 16, "screen": 4, "epochs": 2, "attempts": 1}


@dataclass
class BenchSetup:
    """Model home, output folder, mode and data file of one benchmark run."""

    name: str
    home: Path
    out: Path
    quick: bool
    strongreject_path: Optional[Path]

    @property
    def sizes(self) -> dict[str, int]:
        return QUICK_SIZES if self.quick else FULL_SIZES

    def lab_settings(self, attack: Optional[AttackSettings] = None) -> LabSettings:
        """Return the lab settings of this mode; the full mode is the documented demo lab."""
        if not self.quick:
            return LabSettings(attack=attack or AttackSettings())
        return LabSettings(
            harmful_examples=16,
            benign_examples=16,
            benign_target_tokens=24,
            reference_epochs=1,
            attack=attack or AttackSettings(harmful_examples=4, benign_examples=4, epochs=1),
        )

    def policy(self) -> SafetyPolicy:
        """Return the shipped default policy, resized for this mode and writing under ``out``."""
        policy = load_policy(REPO_ROOT / "policies" / "default.yaml")
        sizes = self.sizes
        policy.probes.harmful.limit = sizes["harmful"]
        policy.probes.benign.limit = sizes["benign"]
        policy.generation.max_new_tokens = sizes["max_new_tokens"]
        policy.realignment.screen_harmful = sizes["screen"]
        policy.realignment.screen_benign = sizes["screen"]
        policy.realignment.max_epochs = sizes["epochs"]
        # Two attempts (lr 2e-5, then 5e-5) instead of the policy's four keep five gate runs near 30 minutes.
        policy.realignment.max_attempts = sizes["attempts"]
        policy.registry.path = str(self.out / "registry")
        policy.audit.dir = str(self.out / "audit")
        return policy

    def strongreject(self, policy: SafetyPolicy) -> Optional[ProbeSet]:
        """Return a seeded StrongREJECT sample, or None when the data file is absent."""
        if self.strongreject_path is None or not self.strongreject_path.is_file():
            logger.warning("StrongREJECT data not found at %s; its column stays empty", self.strongreject_path)
            return None
        source = ProbeSource(source=str(self.strongreject_path), limit=self.sizes["strongreject"])
        return load_probe_set(source, "strongreject", policy.probes.seed)

    def lab(self) -> LabModels:
        """Build (or reuse) the base, reference and default candidate of this mode."""
        return build_lab(self.home, self.lab_settings())


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """Add the options every benchmark shares."""
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("GUARDRAIL_HOME", Path.home() / ".cache" / "guardrail")), help="lab cache folder [default: $GUARDRAIL_HOME or ~/.cache/guardrail]")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder [default: bench/results/{name}, or bench/results/quick/{name} with --quick]")
    parser.add_argument("--quick", action="store_true", help="smoke run: small lab, 4 probes per set, 16 new tokens; figures are meaningless")
    parser.add_argument("--strongreject", type=Path, default=DEFAULT_STRONGREJECT, help="StrongREJECT CSV (forbidden_prompt column)")


def setup_from(arguments: argparse.Namespace, name: str) -> BenchSetup:
    """Create the setup of one benchmark run and configure logging."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    home = arguments.home
    out = arguments.out
    if out is None:
        out = REPO_ROOT / "bench" / "results" / ("quick" if arguments.quick else "") / name
    if arguments.quick:
        # The quick lab must never replace the documented lab in a shared home.
        home = home / "quick"
    out.mkdir(parents=True, exist_ok=True)
    return BenchSetup(name=name, home=home, out=out, quick=arguments.quick, strongreject_path=arguments.strongreject)


def measure(loaded: LoadedModel, policy: SafetyPolicy, strongreject: Optional[ProbeSet]) -> dict[str, Any]:
    """Measure refusal on the harmful subset and on StrongREJECT, and over-refusal on the benign subset."""
    started = time.perf_counter()
    evaluation = evaluate_model(loaded, policy)
    figures: dict[str, Any] = {
        "refusal": evaluation.refusal_rate,
        "refusal_interval": [evaluation.harmful.refusal.ci_low, evaluation.harmful.refusal.ci_high],
        "over_refusal": evaluation.over_refusal_rate,
        "over_refusal_interval": [evaluation.benign.refusal.ci_low, evaluation.benign.refusal.ci_high],
        "strongreject_refusal": None,
        "probes": {"harmful": len(evaluation.harmful.results), "benign": len(evaluation.benign.results)},
    }
    if strongreject is not None:
        harmful_judge, _ = build_judges(policy.judge)
        result = run_probe_set(loaded, strongreject, harmful_judge, policy)
        figures["strongreject_refusal"] = result.refusal.rate
        figures["probes"]["strongreject"] = len(result.results)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    return figures


def _cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo on Linux, else what platform reports."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Describe the machine a result was measured on."""
    return {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def peak_rss_mib() -> float:
    """Return this process's peak resident memory in MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def write_result(setup: BenchSetup, document: dict[str, Any]) -> Path:
    """Write ``<out>/<name>.json`` with the run's date, machine and mode added."""
    document = {
        "benchmark": setup.name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": setup.quick,
        "note": "quick mode: a smoke run whose figures mean nothing" if setup.quick else None,
        "machine": machine(),
        **document,
    }
    path = setup.out / f"{setup.name}.json"
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    logger.info("Wrote %s", path)
    return path


def pyplot():
    """Return matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def percent(value: Optional[float]) -> str:
    """Format a rate for a Markdown table."""
    return "" if value is None else f"{100 * value:.0f}%"
