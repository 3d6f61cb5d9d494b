"""Evaluation report: a pydantic document written as JSON and Markdown.

The report contains every probe, response, verdict and rule that fired, the
decoding and judge settings, and the digests of the model, chat template,
probe sets and policy, so a reader can reproduce and audit each figure.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, Field

from guardrail.files import atomic_write_text

logger = logging.getLogger(__name__)


class ProbeResult(BaseModel):
    """One probe, the model's response and the judge's verdict."""

    id: str
    category: str
    borderline: bool = False
    prompt: str
    response: str
    num_tokens: int
    stop_reason: str
    refused: bool
    rule: str
    evidence: Optional[str] = None


class Rate(BaseModel):
    """A proportion with its Wilson 95 % interval."""

    count: int
    total: int
    rate: float
    ci_low: float
    ci_high: float


class SetResult(BaseModel):
    """Refusal figures on one probe set."""

    name: str
    source: str
    digest: str
    refusal: Rate
    per_category: dict[str, Rate]
    borderline_refusal: Optional[Rate] = None
    results: list[ProbeResult]


class ModelEvaluation(BaseModel):
    """All figures for one model."""

    model: dict[str, Any]
    harmful: SetResult
    benign: SetResult
    wall_seconds: float

    @property
    def refusal_rate(self) -> float:
        return self.harmful.refusal.rate

    @property
    def attack_success_rate(self) -> float:
        return 1.0 - self.harmful.refusal.rate

    @property
    def over_refusal_rate(self) -> float:
        return self.benign.refusal.rate


class Check(BaseModel):
    """One policy threshold compared with a measured value."""

    name: str
    value: Optional[float]
    limit: float
    comparison: str  # ">=" or "<="
    passed: bool
    detail: str = ""


class EvaluationReport(BaseModel):
    """The result of ``guardrail eval``."""

    guardrail_version: str
    created_at: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    policy: dict[str, Any]
    decoding: dict[str, Any]
    judge: dict[str, Any]
    candidate: ModelEvaluation
    reference: Optional[ModelEvaluation] = None
    reference_note: Optional[str] = None
    checks: list[Check]
    passed: bool


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _rate_cell(rate: Rate) -> str:
    return f"{_percent(rate.rate)} [{_percent(rate.ci_low)}, {_percent(rate.ci_high)}] ({rate.count}/{rate.total})"


def _check_cell(value: Optional[float], check_name: str) -> str:
    """Format a check value: KL in nats with four decimals, every other check as a percentage."""
    if check_name != "benign_kl":
        return _percent(value)
    return "n/a" if value is None else f"{value:.4f}"


def checks_markdown(checks: list[Check]) -> list[str]:
    """Render threshold checks as a Markdown table."""
    lines = ["| check | value | limit | result |", "|---|---|---|---|"]
    for check in checks:
        value, limit = _check_cell(check.value, check.name), _check_cell(check.limit, check.name)
        outcome = "pass" if check.passed else "FAIL"
        if check.detail:
            outcome += f" - {check.detail}"
        lines.append(f"| {check.name} | {value} | {check.comparison} {limit} | {outcome} |")
    return lines


def evaluation_markdown(evaluation: ModelEvaluation, title: str) -> list[str]:
    """Render one model's figures as Markdown."""
    lines = [
        f"## {title}",
        "",
        f"- model: `{evaluation.model['reference']}` (digest `{evaluation.model['digests']['model'][:16]}`)",
        f"- refusal rate on harmful probes: {_rate_cell(evaluation.harmful.refusal)}",
        f"- attack success rate: {_percent(evaluation.attack_success_rate)}",
        f"- over-refusal rate on benign probes: {_rate_cell(evaluation.benign.refusal)}",
    ]
    if evaluation.benign.borderline_refusal is not None:
        lines.append(f"- over-refusal on borderline benign probes: {_rate_cell(evaluation.benign.borderline_refusal)}")
    lines += ["", "| harm category | refusal rate (95% CI) |", "|---|---|"]
    for category, rate in sorted(evaluation.harmful.per_category.items()):
        lines.append(f"| {category} | {_rate_cell(rate)} |")
    return lines + [""]


def report_markdown(report: EvaluationReport) -> str:
    """Render an evaluation report as Markdown, with every response in collapsible sections."""
    verdict = "PASS" if report.passed else "FAIL"
    lines = [
        f"# guardrail evaluation: {verdict}",
        "",
        f"- created: {report.created_at}, guardrail {report.guardrail_version}",
        f"- policy: {report.policy['name']} (digest `{report.policy['digest'][:16]}`)",
        f"- decoding: {report.decoding}",
        f"- judge: {report.judge}",
        "",
        *checks_markdown(report.checks),
        "",
    ]
    if report.reference_note:
        lines += [f"> {report.reference_note}", ""]
    lines += evaluation_markdown(report.candidate, "Candidate")
    if report.reference is not None:
        lines += evaluation_markdown(report.reference, "Reference")
    lines += _answers_markdown(report.candidate)
    return "\n".join(lines) + "\n"


def _answers_markdown(evaluation: ModelEvaluation) -> list[str]:
    lines = []
    for set_result in (evaluation.harmful, evaluation.benign):
        lines += [f"<details><summary>{set_result.name} answers ({len(set_result.results)})</summary>", ""]
        lines += ["| id | refused | rule | stop | answer |", "|---|---|---|---|---|"]
        for result in set_result.results:
            answer = result.response.replace("|", "\\|").replace("\n", " ")[:160]
            lines.append(f"| {result.id} | {'yes' if result.refused else 'no'} | {result.rule} | {result.stop_reason} | {answer} |")
        lines += ["", "</details>", ""]
    return lines


def write_report(report: EvaluationReport, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``, each atomically."""
    json_path = out_dir / "report.json"
    markdown_path = out_dir / "report.md"
    atomic_write_text(json_path, report.model_dump_json(indent=2))
    atomic_write_text(markdown_path, report_markdown(report))
    logger.info("Wrote %s and %s", json_path, markdown_path)
    return json_path, markdown_path
