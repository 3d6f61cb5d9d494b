"""Serve ``safety_gate`` as a Prefect deployment, so runs can be triggered by name.

Start it with ``python -m pipelines.prefect.serve`` against a Prefect server
(``PREFECT_API_URL``), then trigger a run::

    prefect deployment run 'guardrail-safety-gate/guardrail-safety-gate' \\
        -p candidate=models/my-finetune -p policy_path=policies/default.yaml
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from pipelines.prefect.flows import FLOW_NAME, safety_gate

DEPLOYMENT_NAME = FLOW_NAME


def safety_gate_deployment(name: str = DEPLOYMENT_NAME, **options: Any) -> RunnerDeployment:
    """Build the deployment; ``options`` go to ``Flow.to_deployment`` (parameters, tags, cron, ...)."""
    return safety_gate.to_deployment(name=name, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the guardrail safety gate as a Prefect deployment.")
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help="deployment name")
    parser.add_argument("--limit", type=int, default=1, help="maximum number of gate runs at once")
    arguments = parser.parse_args()
    serve(safety_gate_deployment(arguments.name), limit=arguments.limit)


if __name__ == "__main__":
    main()
