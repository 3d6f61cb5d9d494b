"""``safety_gate_pipeline``: the guardrail gate as a Kubeflow Pipelines v2 pipeline.

The decide component returns a ``bool``: True sends the run through the
patch branch (realign, verify, register), False through the direct branch
(register the approval or the block). ``dsl.OneOf`` merges the two register
outputs into the decision, and the exit task audits runs that stop on an
error. A blocked decision fails the ``require-approval`` task, so the run ends
as failed.

Compile the committed YAML files with ``python -m pipelines.kfp.pipeline``.
"""

import argparse
from pathlib import Path

from kfp import compiler, dsl

from pipelines.kfp.components import (
    audit_on_exit,
    decide,
    evaluate,
    realign,
    register,
    report,
    require_approval,
    start_gate,
    verify,
)

PIPELINE_NAME = "guardrail-safety-gate"
KFP_FOLDER = Path(__file__).resolve().parent
PIPELINE_YAML = KFP_FOLDER / "safety_gate_pipeline.yaml"
COMPONENTS_FOLDER = KFP_FOLDER / "components"

#: Components compiled to ``components/<name>.yaml`` for ``kfp.components.load_component_from_file``.
COMPONENTS = {
    "start_gate": start_gate,
    "evaluate": evaluate,
    "decide": decide,
    "realign": realign,
    "verify": verify,
    "register": register,
    "report": report,
    "require_approval": require_approval,
    "audit_on_exit": audit_on_exit,
}


@dsl.pipeline(name=PIPELINE_NAME, description="Evaluate, patch, verify, register and audit a fine-tuned LLM.")
def safety_gate_pipeline(candidate: str, policy_path: str, work_dir: str, reference: str = "", cache_dir: str = ""):
    """Run the guardrail gate on ``candidate``.

    Args:
        candidate: Model folder, ``.gguf`` file or ``registry:<name>@<alias>`` reference.
        policy_path: Policy YAML file.
        work_dir: Empty folder for this run's gate state, on storage that every task can read and write.
        reference: Safety-aligned model to compare with; empty for none.
        cache_dir: Folder for cached evaluations; empty disables the cache.
    """
    exit_task = audit_on_exit(work_dir=work_dir)
    with dsl.ExitHandler(exit_task, name="safety-gate"):
        start_task = start_gate(candidate=candidate, policy_path=policy_path, work_dir=work_dir, reference=reference, cache_dir=cache_dir)
        # The reference is evaluated first and the candidate second, because
        # both steps rewrite the same state file and must not run at once.
        reference_task = evaluate(state_path=start_task.output, role="reference").set_display_name("evaluate-reference")
        candidate_task = evaluate(state_path=reference_task.outputs["Output"], role="candidate").set_display_name("evaluate-candidate")
        state_path = candidate_task.outputs["Output"]
        decide_task = decide(state_path=state_path)

        with dsl.If(decide_task.output == True, name="patch"):  # noqa: E712 - builds a KFP condition, not a Python comparison
            realign_task = realign(state_path=state_path)
            verify_task = verify(state_path=state_path, patch_saved=realign_task.outputs["Output"])
            patched_register_task = register(state_path=state_path).after(verify_task).set_display_name("register-after-patch")
        with dsl.Else(name="no-patch"):
            direct_register_task = register(state_path=state_path).after(decide_task).set_display_name("register")

        for task in (patched_register_task, direct_register_task):
            task.set_retry(num_retries=2, backoff_duration="10s", backoff_factor=2.0)
        decision = dsl.OneOf(patched_register_task.output, direct_register_task.output)
        report_task = report(state_path=state_path, decision=decision)
        require_approval(decision=report_task.outputs["Output"])


def compile_all(pipeline_yaml: Path = PIPELINE_YAML, components_folder: Path = COMPONENTS_FOLDER) -> list[Path]:
    """Compile the pipeline and each component to YAML; return the files written."""
    compiler.Compiler().compile(safety_gate_pipeline, str(pipeline_yaml))
    written = [pipeline_yaml]
    components_folder.mkdir(parents=True, exist_ok=True)
    for name, component in COMPONENTS.items():
        path = components_folder / f"{name}.yaml"
        compiler.Compiler().compile(component, str(path))
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="Compile the guardrail KFP pipeline and components to YAML.")
    parser.add_argument("--output", type=Path, default=PIPELINE_YAML, help="pipeline YAML file to write")
    parser.add_argument("--components", type=Path, default=COMPONENTS_FOLDER, help="folder for the component YAML files")
    arguments = parser.parse_args()
    for path in compile_all(arguments.output, arguments.components):
        print(path)


if __name__ == "__main__":
    main()
