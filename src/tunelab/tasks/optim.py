"""Optimizer and learning-rate schedule shared by every task.

AdamW (torch's fused kernel unless ``optimizer.fused=false``) with decoupled weight decay on weight matrices
only (biases and norm weights, i.e. parameters with fewer than 2 dimensions, get no decay), and a linear warmup
followed by cosine / linear decay to zero (or a constant rate), stepped once per optimizer step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed (ndim >= 2) and non-decayed groups; empty groups are left out
    (DeepSpeed drops them, after which a schedule built on the full list no longer matches its optimizer)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def warmup_steps(scheduler_cfg: Mapping[str, Any], total_steps: int) -> int:
    """``warmup_steps`` when set, else ``warmup_ratio * total_steps`` (a scheduler config or a plain dict)."""
    steps = scheduler_cfg.get("warmup_steps")
    if steps is not None:
        return int(steps)
    return int(scheduler_cfg.get("warmup_ratio", 0.0) * total_steps)


def build_optimizer(
    model: torch.nn.Module, optimizer_cfg: DictConfig, scheduler_cfg: DictConfig, total_steps: int
) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` return value: AdamW + a per-step schedule."""
    from transformers import get_scheduler

    if scheduler_cfg.name not in SCHEDULES:
        raise ConfigError(f"task.scheduler.name={scheduler_cfg.name!r} is not one of {list(SCHEDULES)}")
    groups = parameter_groups(model, optimizer_cfg.weight_decay)
    if not groups:
        raise ConfigError("no trainable parameters: the method froze everything")
    optimizer = torch.optim.AdamW(
        groups,
        lr=optimizer_cfg.lr,
        betas=tuple(optimizer_cfg.betas),
        eps=optimizer_cfg.eps,
        fused=optimizer_cfg.fused or None,
    )
    name = "constant_with_warmup" if scheduler_cfg.name == "constant" else scheduler_cfg.name
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=warmup_steps(scheduler_cfg, total_steps), num_training_steps=total_steps
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
