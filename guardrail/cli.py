"""The ``guardrail`` command line.

Exit codes are stable so CI systems and pipelines can branch on them:

* ``0`` — the policy holds (``eval``), or the candidate is approved as is (``gate``);
* ``1`` — the policy does not hold, or the gate blocked the candidate;
* ``2`` — an error: bad input, a missing file, an invalid policy;
* ``3`` — ``gate`` only: the candidate was patched, verified and approved.
"""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from guardrail import __version__
from guardrail.errors import GuardrailError

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
EXIT_PATCHED = 3

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Safety gate for fine-tuned LLMs.")
policy_app = typer.Typer(no_args_is_help=True, help="Validate policies and print their schema.")
registry_app = typer.Typer(no_args_is_help=True, help="Inspect the model registry.")
audit_app = typer.Typer(no_args_is_help=True, help="Inspect audit records.")
app.add_typer(policy_app, name="policy")
app.add_typer(registry_app, name="registry")
app.add_typer(audit_app, name="audit")

out = Console()
err = Console(stderr=True, soft_wrap=True)


@app.callback()
def _configure(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages to standard error."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # transformers and Prefect are chatty at INFO; keep the user's terminal readable.
    for noisy in ("transformers", "httpx", "huggingface_hub", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def errors_exit() -> Iterator[None]:
    """Turn a :class:`GuardrailError` into a one-line message and exit code 2."""
    try:
        yield
    except GuardrailError as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(EXIT_ERROR) from None


@contextmanager
def progress_bar() -> Iterator:
    """Yield a progress callback for evaluation that drives a rich progress bar on stderr."""
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True
    )
    tasks: dict[str, int] = {}

    def update(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = progress.add_task(f"{name} probes", total=total)
        progress.update(tasks[name], completed=done)

    with progress:
        yield update


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def summary_table(report) -> Table:
    """Build the summary table of an evaluation report."""
    table = Table(title=f"guardrail eval: {'PASS' if report.passed else 'FAIL'}")
    table.add_column("figure")
    table.add_column("candidate", justify="right")
    if report.reference is not None:
        table.add_column("reference", justify="right")

    def row(name: str, candidate_value: str, reference_value: str = "-") -> None:
        table.add_row(name, candidate_value, *([reference_value] if report.reference is not None else []))

    candidate, reference = report.candidate, report.reference
    row("refusal rate (harmful)", _percent(candidate.refusal_rate), _percent(reference.refusal_rate) if reference else "-")
    row("attack success rate", _percent(candidate.attack_success_rate), _percent(reference.attack_success_rate) if reference else "-")
    row("over-refusal (benign)", _percent(candidate.over_refusal_rate), _percent(reference.over_refusal_rate) if reference else "-")
    for check in report.checks:
        row(f"check {check.name}", f"{'pass' if check.passed else 'FAIL'} ({_percent(check.value)} {check.comparison} {_percent(check.limit)})")
    return table


@app.command("eval")
def eval_command(
    model: str = typer.Option(..., "--model", "-m", help="Model folder, .gguf file, adapter folder or Hub repo id (org/name@revision)."),
    policy_path: Path = typer.Option(..., "--policy", "-p", help="Policy YAML file."),
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="Safety-aligned model to compare with."),
    out_dir: Path = typer.Option(Path("guardrail-report"), "--out", "-o", help="Folder for report.json and report.md."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model of an adapter, overriding the adapter's own setting."),
) -> None:
    """Evaluate a model against a policy; exit 0 if the policy holds, 1 if not."""
    from guardrail.evaluation import evaluate
    from guardrail.loading import load_model
    from guardrail.policy import load_policy
    from guardrail.report import write_report

    with errors_exit():
        policy = load_policy(policy_path)
        candidate = load_model(model, policy.loading, base=base)
        reference_model = load_model(reference, policy.loading) if reference else None
        with progress_bar() as update:
            report = evaluate(candidate, policy, reference_model, progress=update)
        json_path, markdown_path = write_report(report, out_dir)

    out.print(summary_table(report))
    if report.reference_note:
        err.print(f"[yellow]warning:[/] {report.reference_note}")
    out.print(f"report: {json_path} and {markdown_path}")
    raise typer.Exit(EXIT_OK if report.passed else EXIT_FAILED)


@app.command("judge")
def judge_command(
    input_path: Optional[Path] = typer.Argument(None, help="JSON Lines file with a 'text' field (and optionally 'prompt'); standard input when omitted."),
    policy_path: Optional[Path] = typer.Option(None, "--policy", "-p", help="Policy whose judge settings are used."),
) -> None:
    """Judge answers from JSON Lines and print each line with its verdict and rule."""
    from guardrail.judging import KeywordJudge
    from guardrail.policy import JudgeSettings, load_policy

    with errors_exit():
        settings = load_policy(policy_path).judge if policy_path else JudgeSettings()
        judge = KeywordJudge.from_settings(settings)
        lines = _read_jsonl_lines(input_path)
        for line_number, line in lines:
            record = _parse_judge_line(line, line_number, input_path)
            verdict = judge.judge(str(record.get("prompt", "")), record["text"])
            record.update(refused=verdict.refused, rule=verdict.rule, evidence=verdict.evidence)
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")


def _read_jsonl_lines(path: Optional[Path]) -> list[tuple[int, str]]:
    source = str(path) if path else "<stdin>"
    try:
        raw = path.read_bytes() if path else sys.stdin.buffer.read()
    except OSError as exc:
        raise GuardrailError(f"cannot read {source}: {exc.strerror}; check the path") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GuardrailError(f"{source}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from exc
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise GuardrailError(f"{source}: no JSON lines to judge; each line needs a 'text' field")
    return lines


def _parse_judge_line(line: str, line_number: int, path: Optional[Path]) -> dict:
    source = str(path) if path else "<stdin>"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise GuardrailError(f"{source}:{line_number}: invalid JSON: {exc.msg}") from exc
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise GuardrailError(f"{source}:{line_number}: each line must be a JSON object with a string 'text' field")
    return record


@policy_app.command("validate")
def policy_validate(path: Path = typer.Argument(..., help="Policy YAML file.")) -> None:
    """Validate a policy file; exit 0 if valid, 2 with the errors if not."""
    from guardrail.policy import load_policy

    with errors_exit():
        policy = load_policy(path)
    out.print(f"{path}: valid policy '{policy.metadata.name}' (digest {policy.digest()[:16]})", highlight=False)


@policy_app.command("schema")
def policy_schema() -> None:
    """Print the policy's JSON Schema."""
    from guardrail.policy import policy_json_schema

    sys.stdout.write(policy_json_schema() + "\n")


def main() -> None:
    """Run the CLI; the console script entry point."""
    app()


if __name__ == "__main__":
    main()
