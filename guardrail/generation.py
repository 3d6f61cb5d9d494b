"""Deterministic batched generation through the model's chat template.

Generation is greedy with an explicit :class:`transformers.GenerationConfig`,
so sampling settings in a model's ``generation_config.json`` never leak into
a safety measurement. Prompts are rendered through the chat template as text
and tokenised without adding special tokens, so a template that already
writes the BOS token does not get a second one. Batches are left-padded with
an attention mask, and generation stops on every terminator: the tokenizer's
EOS, the generation config's EOS ids and the template's end-of-turn token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from guardrail.policy import GenerationSettings

logger = logging.getLogger(__name__)

#: End-of-turn tokens used by common chat templates.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>", "<|eom_id|>")

_SENTINEL = "GUARDRAIL_SENTINEL_7f3a"


@dataclass
class GenerationOutput:
    """One generated response."""

    text: str
    num_tokens: int
    stop_reason: str  # "eos" when a terminator was generated, "length" at the token limit


def build_messages(prompt: str, system_prompt: Optional[str] = None) -> list[dict[str, str]]:
    """Return the chat messages for one user prompt."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": prompt})
    return messages


def render_prompt(tokenizer: Any, prompt: str, system_prompt: Optional[str] = None) -> str:
    """Render one user prompt through the chat template, ready for the assistant's turn."""
    return tokenizer.apply_chat_template(
        build_messages(prompt, system_prompt), tokenize=False, add_generation_prompt=True
    )


def encode_prompts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Tokenise rendered prompts with exactly one leading BOS where the model uses one.

    The chat template decides whether a BOS appears, so special tokens are not
    added a second time. A BOS is prepended only when the tokenizer is set to
    add one and the template did not write it.
    """
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    bos_id = tokenizer.bos_token_id
    wants_bos = bool(getattr(tokenizer, "add_bos_token", False)) and bos_id is not None
    fixed = []
    for ids in encoded:
        if wants_bos and (not ids or ids[0] != bos_id):
            ids = [bos_id] + ids
        while bos_id is not None and len(ids) > 1 and ids[0] == bos_id and ids[1] == bos_id:
            ids = ids[1:]
        fixed.append(ids)
    return fixed


def terminator_ids(tokenizer: Any, model: Any) -> list[int]:
    """Return every token id that ends an assistant turn for this model."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))

    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(int(token) for token in config_eos)

    end_of_turn = end_of_turn_token(tokenizer)
    if end_of_turn is not None:
        ids.add(tokenizer.convert_tokens_to_ids(end_of_turn))
    return sorted(ids)


def end_of_turn_token(tokenizer: Any) -> Optional[str]:
    """Find the token the chat template writes right after an assistant message."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # templates may raise on unexpected roles; fall back to none
        return None
    tail = rendered.split(_SENTINEL, 1)[-1]
    vocab = tokenizer.get_vocab()
    for token in _END_OF_TURN_TOKENS:
        if token in vocab and tail.lstrip().startswith(token):
            return token
    for token in _END_OF_TURN_TOKENS:
        if token in vocab and token in tail:
            return token
    return None


def greedy_config(tokenizer: Any, model: Any, max_new_tokens: int) -> Any:
    """Build a greedy generation config that ignores the model's own sampling defaults."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        temperature=None,
        top_p=None,
        top_k=None,
        repetition_penalty=1.0,
        eos_token_id=terminator_ids(tokenizer, model),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: GenerationSettings,
    *,
    on_batch: Optional[Callable[[int], None]] = None,
) -> list[GenerationOutput]:
    """Generate one greedy response per prompt, in batches.

    Prompts are sorted by length before batching so padding stays short, and
    the responses are returned in the input order.

    Args:
        model: A causal LM in eval mode.
        tokenizer: Its tokenizer with a chat template.
        prompts: User prompts.
        settings: Token limit, batch size and optional system prompt.
        on_batch: Called with the number of prompts finished after each batch.

    Returns:
        One :class:`GenerationOutput` per prompt.
    """
    texts = [render_prompt(tokenizer, prompt, settings.system_prompt) for prompt in prompts]
    encoded = encode_prompts(tokenizer, texts)
    config = greedy_config(tokenizer, model, settings.max_new_tokens)
    terminators = set(config.eos_token_id)
    device = next(model.parameters()).device

    order = sorted(range(len(encoded)), key=lambda index: len(encoded[index]))
    outputs: list[Optional[GenerationOutput]] = [None] * len(encoded)
    for start in range(0, len(order), settings.batch_size):
        batch_indices = order[start : start + settings.batch_size]
        input_ids, attention_mask = _left_pad([encoded[index] for index in batch_indices], tokenizer.pad_token_id)
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
        )
        new_tokens = generated[:, input_ids.shape[1] :].tolist()
        for index, tokens in zip(batch_indices, new_tokens):
            outputs[index] = _decode(tokenizer, tokens, terminators)
        if on_batch is not None:
            on_batch(len(batch_indices))
    return [output for output in outputs if output is not None]


def _left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def _decode(tokenizer: Any, tokens: list[int], terminators: set[int]) -> GenerationOutput:
    """Cut a response at its first terminator and decode it."""
    for position, token in enumerate(tokens):
        if token in terminators:
            kept = tokens[:position]
            return GenerationOutput(tokenizer.decode(kept, skip_special_tokens=True).strip(), len(kept), "eos")
    return GenerationOutput(tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens), "length")
