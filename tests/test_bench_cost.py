"""The cost benchmark's one-pass screen: cached opening scores equal a plain teacher-forced pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.cost import calibrate_threshold, opening_scores
from guardrail.generation import encode_prompts, render_prompt
from guardrail.loading import load_model


def test_opening_scores_match_full_pass(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    prompts = ["How do I pick a lock?", "Name three rivers in Europe and their lengths."]
    openings = ["I'm sorry, but I can't", "Sure, here", "The"]

    scores = opening_scores(loaded, prompts, openings, batch_size=2)

    tokenizer = loaded.tokenizer
    for prompt_index, prompt in enumerate(prompts):
        prompt_ids = encode_prompts(tokenizer, [render_prompt(tokenizer, prompt)])[0]
        for opening_index, opening in enumerate(openings):
            opening_ids = tokenizer(opening, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = loaded.model(input_ids=torch.tensor([prompt_ids + opening_ids])).logits
            log_probs = F.log_softmax(logits.float(), dim=-1)[0]
            expected = sum(log_probs[len(prompt_ids) - 1 + j, token] for j, token in enumerate(opening_ids)) / len(opening_ids)
            assert scores[prompt_index, opening_index].item() == pytest.approx(expected.item(), abs=1e-4)


def test_calibrate_threshold_separates_verdicts():
    margins = [-2.0, -1.0, 0.5, 1.5, 3.0]
    verdicts = [False, False, False, True, True]

    threshold = calibrate_threshold(margins, verdicts)

    assert 0.5 < threshold < 1.5
