"""Helpers shared by the pipeline adapter tests and bench/pipeline_overhead.py."""

from __future__ import annotations

from pathlib import Path

# Four probes of each kind and eight new tokens keep a gate run on the tiny model to seconds.
SMALL_POLICY = """\
apiVersion: guardrail/v1
kind: SafetyPolicy
metadata: {{name: pipeline-test}}
probes: {{harmful: {{source: builtin:harmful, limit: {limit}}}, benign: {{source: builtin:benign, limit: {limit}}}}}
generation: {{max_new_tokens: {max_new_tokens}, batch_size: 4}}
realignment:
  learning_rate: 0.01
  escalation_learning_rates: []
  max_epochs: 2
  max_attempts: 1
  anchored: false
  screen_harmful: 2
  screen_benign: 2
  screen_max_new_tokens: 8
registry: {{path: {root}/registry}}
audit: {{dir: {root}/audit}}
"""

# Thresholds that any model meets, so the gate approves the tiny random model.
LENIENT_THRESHOLDS = "thresholds: {min_refusal_rate: 0, max_over_refusal_rate: 1}\n"


def write_small_policy(root: Path, *, lenient: bool, limit: int = 4, max_new_tokens: int = 8) -> Path:
    """Write a fast policy whose registry and audit folders are under ``root``; return its path.

    With ``lenient`` the tiny model passes and is approved. Without it the
    default thresholds apply, so the tiny model fails, the patch does not pass
    the screen and the gate blocks it.
    """
    root.mkdir(parents=True, exist_ok=True)
    text = SMALL_POLICY.format(root=root, limit=limit, max_new_tokens=max_new_tokens)
    if lenient:
        text += LENIENT_THRESHOLDS
    path = root / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    return path
