"""Kubeflow Pipelines v2 components and pipeline for the guardrail gate.

See ``pipelines.kfp.components`` for the components and
``pipelines.kfp.pipeline`` for ``safety_gate_pipeline``.
"""
