"""Shared fixtures: a tiny randomly initialised chat model built offline, and the real SmolLM2."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _training_texts() -> list[str]:
    texts = []
    for name in ("probes/harmful.jsonl", "probes/benign.jsonl", "safety_examples.jsonl", "lab/refusals.jsonl"):
        raw = resources.files("guardrail").joinpath(f"data/{name}").read_text(encoding="utf-8")
        for line in raw.splitlines():
            row = json.loads(line)
            texts += [value for key, value in row.items() if key in ("prompt", "response", "text")]
    return texts


def build_tiny_model(folder: Path, *, chat_template: str | None = CHATML_TEMPLATE, seed: int = 0) -> Path:
    """Save a 2-layer Llama with a byte-level BPE tokenizer trained on the project's own texts."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_training_texts(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    if chat_template is not None:
        fast.chat_template = chat_template

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.5,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-chat")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from guardrail.lab import smollm2_gguf_path

    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def strongreject_csv() -> Path:
    path = SHARED_DATA / "strongreject" / "strongreject_dataset.csv"
    if not path.is_file():
        pytest.skip(f"StrongREJECT data not found at {path}")
    return path
