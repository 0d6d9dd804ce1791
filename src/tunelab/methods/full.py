"""Full fine-tuning: every parameter of the backbone trains."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.methods.spec import METHODS, Method


def adapt_full(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Return ``model`` with all parameters trainable."""
    model.requires_grad_(True)
    return model


METHODS.register(Method(name="full", adapt=adapt_full, trains_all_weights=True, trains_base_in_place=True))
