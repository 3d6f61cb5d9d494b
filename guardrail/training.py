"""Supervised fine-tuning primitives shared by the safety patch and the demo lab.

Examples are rendered through the model's chat template, and the loss covers
only the assistant's tokens, including the end-of-turn token, so the model
learns to stop. Sequences are padded per batch and never packed: packing
would let one example attend to another and blur the single-example signal
the one-shot patch relies on.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from guardrail.errors import RealignmentError
from guardrail.generation import encode_prompts, end_of_turn_token, render_prompt

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class EncodedExample:
    """Token ids of one chat example and the labels the loss is computed on."""

    input_ids: list[int]
    labels: list[int]

    @property
    def supervised_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode_example(tokenizer: Any, prompt: str, response: str, system_prompt: Optional[str] = None) -> EncodedExample:
    """Tokenise a (prompt, response) pair with loss on the response and its end-of-turn token.

    Raises:
        RealignmentError: The response yields no supervised tokens, or the
            end-of-turn token is missing from them.
    """
    prompt_text = render_prompt(tokenizer, prompt, system_prompt)
    end_of_turn = end_of_turn_token(tokenizer) or tokenizer.eos_token
    if not response.strip():
        raise RealignmentError(f"the response to {prompt[:60]!r} is empty; a safety example needs a non-empty refusal")

    prompt_ids = encode_prompts(tokenizer, [prompt_text])[0]
    response_ids = tokenizer(response.strip() + end_of_turn, add_special_tokens=False)["input_ids"]
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    if not response_ids or response_ids[-1] != end_id:
        raise RealignmentError(
            f"the end-of-turn token {end_of_turn!r} is not the last supervised token of the response to "
            f"{prompt[:60]!r}; the model would not learn to stop. Check the tokenizer's chat template"
        )
    if len(response_ids) < 2:
        raise RealignmentError(f"the response to {prompt[:60]!r} tokenises to no content tokens; write a longer refusal")
    return EncodedExample(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids)


def collate(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch; padding is masked and carries no loss."""
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def make_optimizer(parameters: Any, name: str, learning_rate: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Build the optimizer named in the policy."""
    trainable = [parameter for parameter in parameters if parameter.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(trainable, lr=learning_rate, weight_decay=weight_decay)
    raise RealignmentError(f"unknown optimizer {name!r}; use 'adamw' or 'sgd'")


def train_epochs(
    model: Any,
    tokenizer: Any,
    examples: list[EncodedExample],
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int = 8,
    seed: int = 0,
    max_grad_norm: float = 1.0,
    bf16_autocast: bool = False,
) -> list[float]:
    """Fine-tune on a list of examples with AdamW and a linear decay; return the mean loss per epoch.

    Used by the lab, which trains on hundreds of examples. The one-shot patch
    has its own loop in :mod:`guardrail.realignment` because it screens the
    model after every epoch. ``bf16_autocast`` runs the forward pass in
    bfloat16 with float32 master weights, which is 2-3 times faster on CPUs
    with AMX or AVX-512 BF16.
    """
    device = next(model.parameters()).device
    optimizer = make_optimizer(model.parameters(), "adamw", learning_rate)
    steps = epochs * math.ceil(len(examples) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / max(1, steps)))
    shuffler = random.Random(seed)
    losses = []
    model.train()
    for epoch in range(epochs):
        order = list(range(len(examples)))
        shuffler.shuffle(order)
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = collate([examples[index] for index in order[start : start + batch_size]], tokenizer.pad_token_id)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
                loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
            if not torch.isfinite(loss):
                raise RealignmentError(f"training diverged: loss is {loss.item()} at epoch {epoch + 1}; lower the learning rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.item() * len(batch["input_ids"])
        losses.append(total / len(examples))
        logger.info("epoch %d/%d: loss %.4f", epoch + 1, epochs, losses[-1])
    model.eval()
    return losses
