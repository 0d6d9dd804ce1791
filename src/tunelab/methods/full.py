"""Full fine-tuning: every parameter of the backbone trains."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig


def adapt_full(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Return ``model`` with all parameters trainable."""
    model.requires_grad_(True)
    return model
