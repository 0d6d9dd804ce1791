"""Shared checks of the method tests: a tiny chat batch, aligned logits, what trains, perturbation."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tunelab.data.collate import TrainingCollator
from tunelab.data.records import ChatExample
from tunelab.data.tokenization import encode_example
from tunelab.tasks.sft import causal_lm_loss

from .conftest import synthetic_pairs


def batch_for(tokenizer) -> dict[str, torch.Tensor]:
    examples = [
        encode_example(
            tokenizer,
            ChatExample(({"role": "user", "content": row["instruction"]},), row["output"], f"mem:{i}"),
            64,
        )
        for i, row in enumerate(synthetic_pairs(4))
    ]
    return TrainingCollator(tokenizer.pad_token_id)(examples)


def aligned_logits(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, -batch["input_ids"].shape[1] :]


def sft_loss(batch) -> Callable[[torch.nn.Module], torch.Tensor]:
    return lambda model: causal_lm_loss(aligned_logits(model, batch), batch["labels"])[0]


def assert_steps_change_exactly(model, loss_fn: Callable[[torch.nn.Module], torch.Tensor], trainable: set[str]):
    """Three AdamW steps on ``loss_fn(model)`` change every parameter named in ``trainable`` and no other."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss_fn(model).backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (n in trainable), f"{n} changed={changed} trainable={n in trainable}"


def perturb_trainable(model) -> None:
    """Move the trainable parameters away from their (often identity) init."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
