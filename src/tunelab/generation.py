"""Greedy answer generation from left-padded prompts, shared by validation metrics and evaluate.py."""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    max_new_tokens: int,
) -> list[str]:
    """Greedy-decode up to ``max_new_tokens`` after each prompt; return only the new text, stripped."""
    was_training = model.training
    model.eval()
    output = model.generate(
        input_ids=prompt_input_ids,
        attention_mask=prompt_attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.train(was_training)
    new_tokens = output[:, prompt_input_ids.shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
