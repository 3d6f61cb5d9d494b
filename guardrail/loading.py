"""Model loading: local folders, Hub repos, GGUF files and PEFT adapters.

Every model goes through :func:`load_model`, which resolves a model reference
to local files, checks them against the loading policy (safetensors only, no
remote code, a chat template present) and records the SHA-256 of each weight
file, tokenizer file and the chat template. Hub repositories are downloaded
with ``snapshot_download`` and then take the local-folder path, so one code
path serves both.

Reference forms accepted by :func:`load_model`:

* ``path/to/folder`` — a Hugging Face model folder (``config.json`` + weights);
* ``path/to/folder`` holding ``adapter_config.json`` — a PEFT adapter, loaded
  on top of its base model and merged;
* ``path/to/model.gguf`` — a GGUF file, dequantised to a plain model;
* ``org/name`` or ``org/name@revision`` — a Hub repository.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from guardrail.errors import ModelLoadError
from guardrail.hashing import combine_digests, sha256_file, sha256_text
from guardrail.policy import LoadingSettings

logger = logging.getLogger(__name__)

_SAFE_WEIGHT_SUFFIXES = (".safetensors", ".gguf")
_PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelDigests:
    """SHA-256 digests that identify a loaded model."""

    files: dict[str, str] = field(default_factory=dict)
    chat_template: Optional[str] = None
    model: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "chat_template": self.chat_template, "files": dict(self.files)}


@dataclass
class LoadedModel:
    """A causal LM ready for generation, with its provenance."""

    reference: str
    kind: str
    model: Any
    tokenizer: Any
    digests: ModelDigests
    local_path: Optional[Path] = None
    revision: Optional[str] = None
    base: Optional["LoadedModel"] = None

    def describe(self) -> dict[str, Any]:
        """Return the JSON-ready identity used in reports and audit records."""
        return {
            "reference": self.reference,
            "kind": self.kind,
            "revision": self.revision,
            "local_path": str(self.local_path) if self.local_path else None,
            "digests": self.digests.as_dict(),
            "base": self.base.describe() if self.base else None,
        }


def resolve_device(requested: str) -> torch.device:
    """Return the torch device for a policy's ``device`` setting."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(requested)
    except RuntimeError as exc:
        raise ModelLoadError(f"invalid device {requested!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc


def check_reference(reference: str | Path) -> None:
    """Fail early, without loading anything, when a reference is neither a path that exists nor a Hub repo id.

    Raises:
        ModelLoadError: The reference cannot resolve.
    """
    reference = str(reference)
    if Path(reference).expanduser().exists():
        return
    if _REPO_ID.match(reference) and not reference.startswith((".", "/", "~")):
        return
    raise ModelLoadError(
        f"model not found: {reference!r} is neither an existing path nor a Hub repo id like 'org/name@revision'; "
        "check the path"
    )


def load_model(
    reference: str | Path,
    settings: Optional[LoadingSettings] = None,
    *,
    base: Optional[str | Path] = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local folder, GGUF file, adapter or Hub repo.

    Args:
        reference: The model reference (see the module docstring for the forms).
        settings: The policy's loading section; defaults are safe.
        base: Base model of a PEFT adapter, overriding the adapter's own
            ``base_model_name_or_path``.

    Returns:
        The model in eval mode on the requested device, with its digests.

    Raises:
        ModelLoadError: The reference does not resolve, the weights are
            pickle-only or corrupt, remote code would be needed, or there is no
            chat template.
    """
    settings = settings or LoadingSettings()
    reference = str(reference)
    path = Path(reference).expanduser()

    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelLoadError(
                    f"model file {path} is not a GGUF file; pass a model folder, a .gguf file or a Hub repo id"
                )
            return _load_gguf(path, settings, reference)
        if (path / "adapter_config.json").is_file():
            return _load_adapter(path, settings, reference, base)
        return _load_folder(path, settings, reference)

    check_reference(reference)
    return _load_hub(reference, settings, base)


def _load_hub(reference: str, settings: LoadingSettings, base: Optional[str | Path]) -> LoadedModel:
    """Download a Hub repository snapshot, then load it as a local folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = reference.partition("@")
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    if settings.allow_pickle:
        patterns += ["*.bin"]
    try:
        local = snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns)
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"model {reference!r} is not in the local Hub cache and the Hub cannot be reached; "
            "download it first or pass a local folder"
        ) from exc
    except HfHubHTTPError as exc:
        raise ModelLoadError(f"cannot download {reference!r} from the Hub: {exc}") from exc

    loaded = load_model(local, settings, base=base)
    loaded.reference = reference
    loaded.kind = "hub:" + loaded.kind
    # The snapshot folder is named after the resolved commit, which pins the revision.
    loaded.revision = Path(local).name
    return loaded


def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    files = [path for path in sorted(folder.iterdir()) if path.is_file()]
    safe = [path for path in files if path.suffix in _SAFE_WEIGHT_SUFFIXES]
    pickle = [path for path in files if path.suffix in _PICKLE_WEIGHT_SUFFIXES]
    return safe, pickle


def _check_safetensors(paths: list[Path]) -> None:
    """Open each safetensors header so a corrupt file fails with its name, not deep in transformers."""
    from safetensors import safe_open

    for path in paths:
        if path.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error types and OSError
            raise ModelLoadError(
                f"corrupt safetensors file {path}: {exc}; re-download or re-export the weights"
            ) from exc


def _check_remote_code(folder: Path, settings: LoadingSettings) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder} has no config.json; pass a Hugging Face model folder, a .gguf file or an adapter folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_path} is not valid UTF-8 JSON: {exc}") from exc
    if "auto_map" in config and not settings.trust_remote_code:
        raise ModelLoadError(
            f"{folder} needs remote code (config.json has 'auto_map'); set loading.trust_remote_code: true "
            "in the policy only if you trust this repository"
        )
    return config


def _load_folder(folder: Path, settings: LoadingSettings, reference: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    _check_remote_code(folder, settings)
    safe, pickle = _weight_files(folder)
    if not safe and pickle and not settings.allow_pickle:
        names = ", ".join(path.name for path in pickle)
        raise ModelLoadError(
            f"{folder} has only pickle weights ({names}), which can run code when loaded; convert them to "
            "safetensors, or set loading.allow_pickle: true in the policy if you trust the source"
        )
    if not safe and not pickle:
        raise ModelLoadError(f"{folder} has no weight files (*.safetensors); check the path")
    _check_safetensors(safe)

    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=_DTYPES[settings.dtype],
            use_safetensors=not (settings.allow_pickle and not safe),
            trust_remote_code=settings.trust_remote_code,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load model from {folder}: {exc}") from exc

    tokenizer = load_tokenizer(folder, settings)
    weight_files = safe if safe else pickle
    return _finish(model, tokenizer, folder, weight_files, settings, reference, kind="folder")


def _load_gguf(path: Path, settings: LoadingSettings, reference: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=_DTYPES[settings.dtype]
        )
    except ImportError as exc:
        raise ModelLoadError(f"loading {path} needs the 'gguf' package; pip install 'guardrail[gguf]'") from exc
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"cannot load GGUF file {path}: {exc}") from exc

    model = to_plain_model(gguf_model)
    tokenizer = load_tokenizer(path.parent, settings, gguf_file=path.name)
    return _finish(model, tokenizer, path.parent, [path], settings, reference, kind="gguf")


def to_plain_model(model: Any) -> Any:
    """Rebuild a GGUF-loaded model as a plain transformers model that can be saved.

    transformers marks GGUF-loaded models as quantised and refuses to serialise
    them, although their weights are already dequantised. Copying the weights
    into a model built from the same config, without the quantisation entry,
    gives an identical model that ``save_pretrained`` accepts.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # Tied output embeddings are absent from the state dict by design.
    missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion lost weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


def _load_adapter(folder: Path, settings: LoadingSettings, reference: str, base: Optional[str | Path]) -> LoadedModel:
    from peft import PeftModel

    adapter_config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    base_reference = str(base) if base else adapter_config.get("base_model_name_or_path")
    if not base_reference:
        raise ModelLoadError(
            f"adapter {folder} does not name its base model (base_model_name_or_path); pass --base"
        )

    adapter_files = sorted(folder.glob("adapter_model.*"))
    if not any(path.suffix == ".safetensors" for path in adapter_files):
        if not settings.allow_pickle or not adapter_files:
            raise ModelLoadError(
                f"adapter {folder} has no adapter_model.safetensors; convert it to safetensors, or set "
                "loading.allow_pickle: true if you trust the source"
            )
    _check_safetensors(adapter_files)

    base_model = load_model(base_reference, settings)
    try:
        peft_model = PeftModel.from_pretrained(base_model.model, folder)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"cannot apply adapter {folder} to base {base_reference}: {exc}") from exc
    merged = peft_model.merge_and_unload()

    tokenizer = base_model.tokenizer
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = load_tokenizer(folder, settings)
    loaded = _finish(merged, tokenizer, folder, adapter_files, settings, reference, kind="adapter")
    loaded.base = base_model
    loaded.digests.model = combine_digests([("adapter", loaded.digests.model), ("base", base_model.digests.model)])
    return loaded


def load_tokenizer(folder: Path, settings: LoadingSettings, gguf_file: Optional[str] = None) -> Any:
    """Load a tokenizer and make sure it has a chat template and a pad token."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": settings.trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {folder}: {exc}") from exc

    if settings.chat_template:
        tokenizer.chat_template = settings.chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"the tokenizer in {folder} has no chat template, so prompts cannot be formatted as the model "
            "expects; use an instruction-tuned model or set loading.chat_template in the policy"
        )

    if tokenizer.pad_token_id is None:
        # Padding positions are masked out, so reusing EOS as padding is safe.
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer in {folder} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _finish(
    model: Any,
    tokenizer: Any,
    folder: Path,
    weight_files: list[Path],
    settings: LoadingSettings,
    reference: str,
    kind: str,
) -> LoadedModel:
    files = {path.name: sha256_file(path) for path in weight_files}
    for name in _TOKENIZER_FILES:
        candidate = folder / name
        if candidate.is_file():
            files[name] = sha256_file(candidate)
    template_digest = sha256_text(tokenizer.chat_template)
    digests = ModelDigests(
        files=files,
        chat_template=template_digest,
        model=combine_digests(list(files.items()) + [("chat_template", template_digest)]),
    )

    device = resolve_device(settings.device)
    model.to(device)
    model.eval()
    logger.info("Loaded %s model %s (%s) on %s", kind, reference, digests.model[:12], device)
    return LoadedModel(reference=reference, kind=kind, model=model, tokenizer=tokenizer, digests=digests, local_path=folder)


def save_model(loaded_model: Any, tokenizer: Any, folder: Path) -> None:
    """Save a model as safetensors with its tokenizer, ready for :func:`load_model`."""
    folder.mkdir(parents=True, exist_ok=True)
    loaded_model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
