"""Frozen models that a task consults but never trains (a distillation teacher, a DPO reference)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class FrozenModel:
    """A frozen model kept outside the task module's tree (so no checkpoint, optimizer or ``.train()`` call
    reaches it); :meth:`to` follows the task module's device."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    def to(self, device: torch.device) -> None:
        self.model.to(device)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Float logits; a causal LM's are cut to the input positions (a soft-prompt model adds some)."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        return logits[:, -input_ids.shape[1] :] if logits.dim() == 3 else logits


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
