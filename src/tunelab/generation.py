"""Generation from left-padded prompts: greedy answers for validation metrics and evaluate.py, sampled or greedy
tokens for PPO rollouts."""

from __future__ import annotations

from typing import Any

import torch

from tunelab.models.frozen import eval_mode


@torch.no_grad()
def generate_tokens(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    max_new_tokens: int,
    **sampling: Any,
) -> torch.Tensor:
    """Prompts followed by up to ``max_new_tokens`` new tokens [B, P + R], generated in eval mode; greedy unless
    ``sampling`` passes ``do_sample=True`` (and its temperature / top-k / top-p)."""
    with eval_mode(model):
        return model.generate(
            input_ids=prompt_input_ids,
            attention_mask=prompt_attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **({"do_sample": False} | sampling),
        )


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    max_new_tokens: int,
) -> list[str]:
    """Greedy-decode up to ``max_new_tokens`` after each prompt; return only the new text, stripped."""
    output = generate_tokens(model, tokenizer, prompt_input_ids, prompt_attention_mask, max_new_tokens)
    new_tokens = output[:, prompt_input_ids.shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
