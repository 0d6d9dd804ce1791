"""LoRA (Hu et al., 2021) through peft.

A frozen weight W (d_out x d_in) gets a low-rank update: h = W x + (alpha / r) * B A x, with
A (r x d_in, Kaiming init) and B (d_out x r, zero init) trained, so the adapted model starts equal to the
base model. With ``use_rslora`` the scale is alpha / sqrt(r). Merging folds B A into W.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.errors import ConfigError
from tunelab.methods.peft_task import module_names, peft_task_type
from tunelab.methods.spec import METHODS, Method


def lora_config(method_cfg: DictConfig, task_type: str):
    """The peft ``LoraConfig`` for a ``configs/method/lora.yaml``-shaped config."""
    from peft import LoraConfig

    if method_cfg.r <= 0:
        raise ConfigError(f"method.r must be a positive rank, got {method_cfg.r}")
    return LoraConfig(
        task_type=task_type,
        r=method_cfg.r,
        lora_alpha=method_cfg.alpha,
        lora_dropout=method_cfg.dropout,
        target_modules=module_names(method_cfg.target_modules),
        bias=method_cfg.bias,
        use_rslora=method_cfg.use_rslora,
    )


def adapt_lora(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Freeze ``model`` and inject LoRA adapters into ``method_cfg.target_modules``."""
    from peft import get_peft_model

    config = lora_config(method_cfg, peft_task_type(model))
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise ConfigError(f"method=lora: {error}") from error


METHODS.register(Method(name="lora", adapt=adapt_lora))
