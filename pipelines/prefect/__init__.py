"""Prefect 3 flow for the guardrail gate; see ``pipelines.prefect.flows``."""
