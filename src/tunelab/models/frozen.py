"""Frozen models that a task consults but never trains (a distillation teacher, a DPO reference)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class FrozenModel:
    """A frozen model kept outside the task module's tree (so no checkpoint, optimizer, ``.to()`` or ``.train()``
    call reaches it); it follows its inputs to their device (:meth:`on`), whichever stage runs first."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    def on(self, device: torch.device) -> torch.nn.Module:
        """The model, moved to ``device`` first if it is elsewhere."""
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        return self.model

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Float logits; a causal LM's are cut to the input positions (a soft-prompt model adds some)."""
        logits = self.on(input_ids.device)(input_ids=input_ids, attention_mask=attention_mask).logits.float()
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
