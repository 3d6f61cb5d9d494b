"""The ``guardrail`` command line.

Exit codes are stable so CI systems and pipelines can branch on them:

* ``0`` — the policy is met (``eval``), or the candidate is approved as is (``gate``);
* ``1`` — the policy is not met, or the gate blocked the candidate;
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
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree

from guardrail.errors import GuardrailError

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
EXIT_PATCHED = 3

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Safety gate for fine-tuned LLMs.")
policy_app = typer.Typer(no_args_is_help=True, help="Validate policies and print their schema.")
registry_app = typer.Typer(no_args_is_help=True, help="Inspect the model registry.")
audit_app = typer.Typer(no_args_is_help=True, help="Inspect, sign and verify audit records.")
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
    for noisy in ("transformers", "httpx", "httpx2", "huggingface_hub", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def errors_exit() -> Iterator[None]:
    """Turn a :class:`GuardrailError` into a one-line message and exit code 2."""
    try:
        yield
    except GuardrailError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
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
        row(f"check {check.name}", f"{'pass' if check.passed else 'FAIL'}: {_percent(check.value)}, limit {check.comparison} {_percent(check.limit)}")
    return table


@app.command("eval")
def eval_command(
    model: str = typer.Option(..., "--model", "-m", help="Model folder, .gguf file, adapter folder or Hub repo id (org/name@revision)."),
    policy_path: Path = typer.Option(..., "--policy", "-p", help="Policy YAML file."),
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="Safety-aligned model to compare with."),
    out_dir: Path = typer.Option(Path("guardrail-report"), "--out", "-o", help="Folder for report.json and report.md."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model of an adapter, overriding the adapter's own setting."),
) -> None:
    """Evaluate a model against a policy; exit 0 if the policy holds, 1 if not, 2 on error."""
    from guardrail.evaluation import evaluate
    from guardrail.gate import resolve_reference
    from guardrail.loading import load_model
    from guardrail.policy import load_policy
    from guardrail.report import write_report

    with errors_exit():
        policy = load_policy(policy_path)
        candidate = load_model(resolve_reference(model, policy)[0], policy.loading, base=base)
        candidate.reference = model
        reference_model = load_model(resolve_reference(reference, policy)[0], policy.loading) if reference else None
        with progress_bar() as update:
            report = evaluate(candidate, policy, reference_model, progress=update)
        json_path, markdown_path = write_report(report, out_dir)

    out.print(summary_table(report))
    if report.reference_note:
        err.print(f"[yellow]warning:[/] {escape(report.reference_note)}", highlight=False)
    out.print(f"report: {json_path} and {markdown_path}")
    raise typer.Exit(EXIT_OK if report.passed else EXIT_FAILED)


@app.command("judge")
def judge_command(
    input_path: Optional[Path] = typer.Argument(None, help="JSON Lines file with a 'text' field (and optionally 'prompt'); standard input when omitted."),
    policy_path: Optional[Path] = typer.Option(None, "--policy", "-p", help="Policy whose judge settings are used."),
) -> None:
    """Judge responses from JSON Lines and print each line with its verdict and rule."""
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


@contextmanager
def gate_display() -> Iterator[tuple]:
    """Yield (stage callback, progress callback) that print gate stages and drive a progress bar."""
    with progress_bar() as update:

        def stage(message: str) -> None:
            err.print(f"[bold]>[/] {escape(message)}", highlight=False)

        yield stage, update


def _print_gate_result(result) -> None:
    from guardrail.audit import summary_markdown

    table = Table(title=f"guardrail gate: {result.decision.upper()}")
    table.add_column("model")
    table.add_column("refusal (harmful)", justify="right")
    table.add_column("over-refusal (benign)", justify="right")
    table.add_column("benign KL", justify="right")
    for name in ("reference", "candidate", "patched"):
        figure = result.record["figures"].get(name)
        if figure:
            kl = figure.get("benign_kl")
            table.add_row(name, _percent(figure["refusal_rate"]), _percent(figure["over_refusal_rate"]), "-" if kl is None else f"{kl:.4f}")
    out.print(table)
    out.print(f"decision: {result.decision} - {result.reason}", highlight=False)
    if result.registered:
        out.print(f"registered versions: {result.registered}", highlight=False)
    out.print(f"audit record: {result.audit_path}", highlight=False)
    if result.attestation_path:
        out.print(f"signed attestation: {result.attestation_path}", highlight=False)
    logger.debug(summary_markdown(result.record))


@app.command("gate")
def gate_command(
    candidate: str = typer.Option(..., "--candidate", "-c", help="Candidate model: folder, .gguf, adapter, Hub repo id or registry:<name>@<alias>."),
    policy_path: Path = typer.Option(..., "--policy", "-p", help="Policy YAML file."),
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="Safety-aligned model to compare with."),
    cache_dir: Path = typer.Option(Path(".guardrail/cache"), "--cache-dir", help="Folder for cached evaluations, keyed on model and probe digests."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Evaluate every model afresh."),
) -> None:
    """Gate a candidate: exit 0 approved as is, 3 approved after a patch, 1 blocked, 2 error."""
    from guardrail.gate import run_gate
    from guardrail.policy import load_policy

    with errors_exit():
        policy = load_policy(policy_path)
        with gate_display() as (stage, update):
            result = run_gate(candidate, policy, reference, policy_source=str(policy_path), cache_dir=None if no_cache else cache_dir, progress=update, on_stage=stage)
    _print_gate_result(result)
    raise typer.Exit(result.exit_code)


@app.command("patch")
def patch_command(
    candidate: str = typer.Option(..., "--candidate", "-c", help="Model to patch."),
    policy_path: Path = typer.Option(..., "--policy", "-p", help="Policy YAML file; its realignment section sets the method."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder the patched model is saved to (safetensors)."),
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="Safety-aligned model whose figures set the screen targets."),
) -> None:
    """Patch a model with one safety example and save it, without evaluation or registration.

    Exit 0 when an epoch met the screen targets and the model was saved, 1 when none did.
    """
    from guardrail.evaluation import evaluate_model
    from guardrail.loading import load_model
    from guardrail.policy import load_policy
    from guardrail.realignment import realign, screen_targets
    from guardrail.verification import save_and_reload

    with errors_exit():
        policy = load_policy(policy_path)
        model = load_model(candidate, policy.loading)
        reference_figures = (None, None)
        if reference:
            with progress_bar() as update:
                reference_evaluation = evaluate_model(load_model(reference, policy.loading), policy, progress=update)
            reference_figures = (reference_evaluation.refusal_rate, reference_evaluation.over_refusal_rate)
        result = realign(model.model, model.tokenizer, policy, screen_targets(policy, *reference_figures))
        if result.success:
            save_and_reload(result.model, model.tokenizer, out_dir, policy)
    out.print(json.dumps(result.trace(), indent=2), highlight=False)
    if result.success:
        out.print(f"patched model saved to {out_dir}", highlight=False)
    raise typer.Exit(EXIT_OK if result.success else EXIT_FAILED)


@registry_app.command("list")
def registry_list(
    policy_path: Optional[Path] = typer.Option(None, "--policy", "-p", help="Policy naming the registry."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of a local registry, overriding the policy's registry.path."),
    name: Optional[str] = typer.Argument(None, help="Only this model."),
) -> None:
    """List registered versions with their status and aliases."""
    with errors_exit():
        registry = _open_registry(policy_path, root)
        versions = registry.list_versions(name)
    table = Table(title=f"registry {registry.location}")
    for column in ("model", "version", "status", "aliases", "created", "digest"):
        table.add_column(column)
    for version in versions:
        table.add_row(version.name, str(version.version), version.status, ", ".join(version.aliases), version.created_at, version.model_digest[:12])
    out.print(table)


@registry_app.command("show")
def registry_show(
    reference: str = typer.Argument(..., help="<name>@<alias or version>, or <name> for the latest version."),
    policy_path: Optional[Path] = typer.Option(None, "--policy", "-p", help="Policy naming the registry."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of a local registry, overriding the policy's registry.path."),
) -> None:
    """Print one version's metadata as JSON."""
    from dataclasses import asdict

    with errors_exit():
        registry = _open_registry(policy_path, root)
        name, _, selector = reference.removeprefix("registry:").partition("@")
        version = registry.get(name, selector or "latest")
    sys.stdout.write(json.dumps(asdict(version), indent=2) + "\n")


def _open_registry(policy_path: Optional[Path], root: Optional[Path]):
    """Open the registry the policy names (the default policy's without one); ``--root`` replaces a local registry's folder."""
    from guardrail.policy import SafetyPolicy, load_policy
    from guardrail.registry import open_registry

    policy = load_policy(policy_path) if policy_path else SafetyPolicy()
    if root is not None:
        if policy.registry.type != "local":
            raise GuardrailError(f"--root sets the folder of a local registry, but {policy_path} names a {policy.registry.type} registry; drop --root")
        policy.registry.path = str(root)
    return open_registry(policy)


@audit_app.command("show")
def audit_show(
    record: str = typer.Argument(..., help="Audit record path, run id, or registry:<name>@<alias>."),
    policy_path: Optional[Path] = typer.Option(None, "--policy", "-p", help="Policy naming the audit folder and registry."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole record as JSON instead of a summary."),
) -> None:
    """Show an audit record and check its digest."""
    from guardrail.audit import read_record, summary_markdown, verify_digest
    from guardrail.errors import AuditError
    from guardrail.policy import SafetyPolicy, load_policy
    from guardrail.registry import open_registry, parse_reference

    with errors_exit():
        policy = load_policy(policy_path) if policy_path else SafetyPolicy()
        parsed = parse_reference(record)
        if parsed is not None:
            document = open_registry(policy).audit_record(*parsed)
            if document is None:
                raise AuditError(f"{record} has no audit record")
        else:
            document = read_record(record, Path(policy.audit.dir))
    if as_json:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        out.print(summary_markdown(document), highlight=False, markup=False)
    if not verify_digest(document):
        err.print("[bold red]digest mismatch:[/] the record was changed after it was written")
        raise typer.Exit(EXIT_FAILED)
    out.print(f"digest verified: {document['digest']}", highlight=False)


@audit_app.command("keygen")
def audit_keygen(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for signing.key (private key, mode 0600) and signing.pub (public key)."),
    force: bool = typer.Option(False, "--force", help="Replace key files that already exist in the folder."),
) -> None:
    """Create an Ed25519 key pair that signs audit records.

    The private key is encrypted when the environment variable
    GUARDRAIL_SIGNING_PASSPHRASE is set. The gate reads the same variable to
    decrypt it.
    """
    import os

    from guardrail.signing import PASSPHRASE_ENV, generate_key_pair

    with errors_exit():
        pair = generate_key_pair(out_dir, passphrase=os.environ.get(PASSPHRASE_ENV) or None, force=force)
    protection = f"encrypted with the passphrase in {PASSPHRASE_ENV}" if pair.encrypted else f"not encrypted; set {PASSPHRASE_ENV} to encrypt it"
    out.print(f"private key: {pair.private_key} ({protection})", highlight=False)
    out.print(f"public key:  {pair.public_key}", highlight=False)
    out.print(f"key id:      {pair.keyid}", highlight=False)
    out.print(f"Sign gate runs with `audit: {{signing_key: {pair.private_key}}}` in the policy; verify with `--key {pair.public_key}`.", highlight=False, markup=False)


def _record_store(policy):
    """Return a RecordStore over the policy's audit folder and registry."""
    from guardrail.lineage import RecordStore
    from guardrail.registry import open_registry

    return RecordStore(Path(policy.audit.dir), open_registry(policy))


@audit_app.command("verify")
def audit_verify(
    model: str = typer.Argument(..., help="registry:<name>@<alias or version>, or a model folder (with --attestation)."),
    key_path: Path = typer.Option(..., "--key", "-k", help="Ed25519 public key file (signing.pub from `guardrail audit keygen`)."),
    attestation_path: Optional[Path] = typer.Option(None, "--attestation", "-a", help="DSSE envelope <run_id>.intoto.json; needed for a model folder."),
    role: Optional[str] = typer.Option(None, "--role", help="Which attested model a folder is, 'candidate' or 'patched'; needed only when the attestation names both."),
    policy_path: Optional[Path] = typer.Option(None, "--policy", "-p", help="Policy naming the registry and the audit folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Verify a model's signed audit record: signature, record, model files and lineage.

    Exit 0 when every check passes, 1 when one fails, 2 on bad input.
    """
    from guardrail.attestation import read_envelope
    from guardrail.attestation_checks import verify_model, verify_registered
    from guardrail.policy import SafetyPolicy, load_policy
    from guardrail.registry import parse_reference
    from guardrail.signing import load_public_key

    with errors_exit():
        policy = load_policy(policy_path) if policy_path else SafetyPolicy()
        public_key = load_public_key(key_path)
        store = _record_store(policy)
        parsed = parse_reference(model)
        if parsed is not None:
            if attestation_path is not None:
                raise GuardrailError("--attestation is for model folders; a registry version is verified against the attestation stored with it")
            verification = verify_registered(store.registry, *parsed, public_key, store)
        else:
            if attestation_path is None:
                raise GuardrailError(f"{model} is not a registry reference; pass its envelope with --attestation <audit dir>/<run_id>.intoto.json")
            envelope = read_envelope(attestation_path)
            verification = verify_model(Path(model), envelope, public_key, store, role=role, envelope_source=str(attestation_path))

    if as_json:
        sys.stdout.write(json.dumps(verification.as_dict(), indent=2) + "\n")
    else:
        table = Table(title=f"guardrail audit verify: {'PASS' if verification.passed else 'FAIL'}", show_lines=True)
        for column in ("check", "result", "detail"):
            table.add_column(column)
        for check in verification.checks:
            detail = "\n".join(check.problems) if check.problems else check.detail
            table.add_row(check.name, "[green]pass[/]" if check.passed else "[bold red]FAIL[/]", escape(detail))
        out.print(table)
    raise typer.Exit(EXIT_OK if verification.passed else EXIT_FAILED)


@audit_app.command("lineage")
def audit_lineage(
    model: str = typer.Argument(..., help="registry:<name>@<alias or version>, an audit record path, or a run id."),
    policy_path: Optional[Path] = typer.Option(None, "--policy", "-p", help="Policy naming the registry and the audit folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the chain as JSON, newest record first."),
) -> None:
    """Print the chain of gate runs behind a model, from its base model to its latest record.

    Exit 0 when every parent record is found and its digest verifies, 1 when not, 2 on bad input.
    """
    from guardrail.audit import read_record
    from guardrail.errors import AuditError
    from guardrail.lineage import trace_lineage
    from guardrail.policy import SafetyPolicy, load_policy
    from guardrail.registry import parse_reference

    with errors_exit():
        policy = load_policy(policy_path) if policy_path else SafetyPolicy()
        store = _record_store(policy)
        parsed = parse_reference(model)
        if parsed is not None:
            record, source = store.registry.audit_record(*parsed), model
            if record is None:
                raise AuditError(f"{model} has no audit record; it was registered without a gate run")
        else:
            record = read_record(model, Path(policy.audit.dir))
            source = model
        lineage = trace_lineage(record, store, source)

    complete = not lineage.missing and not lineage.unverified
    if as_json:
        document = {"model": model, "complete": complete, "root": lineage.root, "chain": [_lineage_entry_dict(entry) for entry in lineage.entries]}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        out.print(_lineage_tree(lineage, store.describe()))
    raise typer.Exit(EXIT_OK if complete else EXIT_FAILED)


def _lineage_entry_dict(entry) -> dict:
    from guardrail.lineage import output_model_digest

    record = entry.record or {}
    return {
        "digest": entry.digest,
        "found": entry.found,
        "digest_verified": entry.digest_verified,
        "source": entry.source,
        "run_id": record.get("run_id"),
        "decision": record.get("decision"),
        "model_digest": output_model_digest(record) if entry.found else None,
        "finished_at": record.get("finished_at"),
    }


def _lineage_tree(lineage, searched: str) -> Tree:
    """Render a lineage as a rich Tree: the base model at the root, the newest record as the deepest leaf."""
    from guardrail.lineage import output_model_digest

    oldest = lineage.entries[-1]
    if not oldest.found:
        tree = Tree(f"[bold red]missing[/] parent record {escape(str(oldest.digest)[:16])} (not found in {escape(searched)})")
        records = lineage.entries[-2::-1]
    elif lineage.root is not None:
        digest = lineage.root.get("digest")
        tree = Tree(f"base model [bold]{escape(str(lineage.root.get('name')))}[/] (digest {digest[:12] if digest else 'unknown'})")
        records = lineage.entries[::-1]
    else:
        tree = Tree("[yellow]no parent recorded[/] (a guardrail.audit/v1 record)")
        records = lineage.entries[::-1]

    node = tree
    for entry in records:
        record = entry.record or {}
        model_digest = output_model_digest(record)
        finished = str(record.get("finished_at") or "")[:16].replace("T", " ")
        label = (
            f"[bold]{escape(str(record.get('run_id')))}[/]  {escape(str(record.get('decision')))}  "
            f"model {model_digest[:12] if model_digest else '-'}  {finished} UTC  [dim]{escape(str(entry.source or ''))}[/]"
        )
        if not entry.digest_verified:
            label += "  [bold red]digest does not verify: the record was changed after it was written[/]"
        node = node.add(label)
    return tree


def _default_home() -> Path:
    import os

    return Path(os.environ.get("GUARDRAIL_HOME", Path.home() / ".cache" / "guardrail"))


@app.command("lab")
def lab_command(
    home: Path = typer.Option(None, "--home", help="Cache folder for the lab models [default: $GUARDRAIL_HOME or ~/.cache/guardrail]."),
) -> None:
    """Build (or reuse) the demo's aligned reference and attacked candidate from SmolLM2-135M-Instruct."""
    from guardrail.lab import build_lab

    with errors_exit():
        models = build_lab(home or _default_home())
    out.print(f"base: {models.base}\nreference: {models.reference}\ncandidate: {models.candidate}", highlight=False)


@app.command("demo")
def demo_command(
    policy_path: Path = typer.Option(Path("policies/default.yaml"), "--policy", "-p", help="Policy YAML file."),
    home: Path = typer.Option(None, "--home", help="Cache folder for the lab models, the demo registry and audit records [default: $GUARDRAIL_HOME or ~/.cache/guardrail]."),
) -> None:
    """Build the lab if needed, register its candidate, and run the real gate on it.

    The registry and audit folders of the policy are redirected into the
    demo's home, and the registry is always a local one there, so the demo
    never writes into a production registry.
    """
    from guardrail.gate import run_gate
    from guardrail.lab import build_lab
    from guardrail.policy import load_policy
    from guardrail.registry import open_registry

    home = home or _default_home()
    with errors_exit():
        policy = load_policy(policy_path)
        policy.registry.type = "local"
        policy.registry.path = str(home / "demo" / "registry")
        policy.audit.dir = str(home / "demo" / "audit")
        policy.registry.model_name = "smollm2-135m-demo"
        with gate_display() as (stage, update):
            stage("Building or reusing the lab models")
            models = build_lab(home)
            stage("Registering the candidate")
            open_registry(policy).register(
                policy.registry.model_name, models.candidate, status="candidate", tags={"source": "guardrail lab"}, aliases=(policy.registry.candidate_alias,)
            )
            result = run_gate(
                f"registry:{policy.registry.model_name}@{policy.registry.candidate_alias}",
                policy,
                str(models.reference),
                policy_source=str(policy_path),
                cache_dir=home / "demo" / "cache",
                work_dir=home / "demo" / "work",
                progress=update,
                on_stage=stage,
            )
    _print_gate_result(result)
    raise typer.Exit(result.exit_code)


DEFAULT_ANALYSIS_EXAMPLES = ["general-01", "general-02", "general-03", "general-04", "specific-cybercrime", "specific-fraud"]


@app.command("analyze")
def analyze_command(
    model: str = typer.Argument(..., help="Model to analyze (folder, .gguf, adapter or Hub id), usually the fine-tuned candidate."),
    example_ids: Optional[list[str]] = typer.Option(None, "--example", "-e", help="Built-in safety example id, such as general-01 or specific-fraud; repeat for several. Default: general-01 to general-04, specific-cybercrime, specific-fraud."),
    examples_file: Optional[Path] = typer.Option(None, "--examples", help="JSON Lines file of safety examples with prompt, response and an optional id."),
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="Aligned model the candidate was fine-tuned from; adds the harmful-direction comparison."),
    policy_path: Optional[Path] = typer.Option(None, "--policy", "-p", help="Policy whose loading and generation settings apply."),
    out_dir: Path = typer.Option(Path("guardrail-analysis"), "--out", "-o", help="Folder for analysis.json, analysis.md and the PNG plots."),
) -> None:
    """Measure how low-rank the safety gradient is: spectra, CER(k), overlaps, harmful direction."""
    from guardrail.analysis import analyze, summary_markdown
    from guardrail.files import atomic_write_text
    from guardrail.loading import check_reference, load_model
    from guardrail.plots import plot_cer, plot_overlaps, plot_spectra
    from guardrail.policy import SafetyPolicy, load_policy

    with errors_exit():
        policy = load_policy(policy_path) if policy_path else SafetyPolicy()
        examples = _analysis_examples(example_ids, examples_file)
        # Check both paths before loading either, so a typo in --reference fails in a second.
        for reference_to_check in (model, reference):
            if reference_to_check:
                check_reference(reference_to_check)
        loaded = load_model(model, policy.loading)
        reference_loaded = load_model(reference, policy.loading) if reference else None
        result = analyze(loaded, examples, reference=reference_loaded, system_prompt=policy.generation.system_prompt)
        document = result.to_dict()
        atomic_write_text(out_dir / "analysis.json", json.dumps(document, indent=2))
        markdown = summary_markdown(result)
        plots = [plot_spectra(document, out_dir / "spectrum.png"), plot_cer(document, out_dir / "cer.png")]
        if result.overlaps:
            plots.append(plot_overlaps(document, out_dir / "overlap.png"))
        markdown += "\n" + "\n".join(f"![{path.stem}]({path.name})" for path in plots) + "\n"
        atomic_write_text(out_dir / "analysis.md", markdown)
    out.print(markdown, markup=False, highlight=False)
    err.print(f"wrote {out_dir / 'analysis.json'}, {out_dir / 'analysis.md'} and {len(plots)} plot(s) in {result.seconds:.0f} s")


def _analysis_examples(example_ids: Optional[list[str]], examples_file: Optional[Path]) -> list:
    """Collect the safety examples named on the command line, or the default set."""
    from guardrail.policy import SafetyExample
    from guardrail.realignment import default_safety_examples

    known = {example.id: example for example in default_safety_examples("general") + default_safety_examples("specific")}
    chosen = []
    for example_id in example_ids or ([] if examples_file else DEFAULT_ANALYSIS_EXAMPLES):
        if example_id not in known:
            raise GuardrailError(f"unknown safety example {example_id!r}; built-in ids: {', '.join(sorted(known))}")
        chosen.append(known[example_id])
    if examples_file is not None:
        if not examples_file.is_file():
            raise GuardrailError(f"examples file {examples_file} not found; pass a JSON Lines file with prompt and response fields")
        for number, line in enumerate(examples_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GuardrailError(f"{examples_file}:{number}: invalid JSON ({exc}); each line needs a JSON object with prompt and response") from exc
            missing = [key for key in ("prompt", "response") if not isinstance(row, dict) or key not in row]
            if missing:
                raise GuardrailError(f"{examples_file}:{number}: invalid safety example, missing field(s) {', '.join(missing)}; each line needs a JSON object with prompt and response")
            try:
                chosen.append(SafetyExample(id=row.get("id") or f"{examples_file.stem}-{number}", prompt=row["prompt"], response=row["response"]))
            except ValueError as exc:
                raise GuardrailError(f"{examples_file}:{number}: invalid safety example ({exc}); prompt and response must be non-empty strings") from exc
    return chosen


def main() -> None:
    """Run the CLI; the console script entry point."""
    app()


if __name__ == "__main__":
    main()
