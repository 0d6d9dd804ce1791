"""Optimizer and learning-rate schedule shared by every task.

AdamW (torch's fused kernel unless ``optimizer.fused=false``) with decoupled weight decay on weight matrices
only (biases and norm weights, i.e. parameters with fewer than 2 dimensions, get no decay), each parameter at
``lr * lr_scale(name)`` (the method's :attr:`~tunelab.methods.spec.Method.lr_scale`: LoRA+), and a linear warmup
followed by cosine / linear decay to zero (or a constant rate), stepped once per optimizer step: the schedule's
LambdaLR multiplies every group's own initial lr by the same factor, so the scales hold throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


def unit_scale(param_name: str) -> float:
    return 1.0


def parameter_groups(
    model: torch.nn.Module, weight_decay: float, lr: float, lr_scale: Callable[[str], float] = unit_scale
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (decayed: ndim >= 2, ``lr_scale(name)``), each group with its
    ``weight_decay`` and ``lr * scale``, decayed groups first, then by scale (without scales: the decayed and the
    non-decayed group, as checkpoints of earlier runs hold them); only non-empty groups exist (DeepSpeed drops
    empty ones, after which a schedule built on the full list no longer matches its optimizer)."""
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decay, scale = param.ndim >= 2, float(lr_scale(name))
            group = groups.setdefault(
                (decay, scale), {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale}
            )
            group["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda key: (not key[0], key[1]))]


def warmup_steps(scheduler_cfg: Mapping[str, Any], total_steps: int) -> int:
    """``warmup_steps`` when set, else ``warmup_ratio * total_steps`` (a scheduler config or a plain dict)."""
    steps = scheduler_cfg.get("warmup_steps")
    if steps is not None:
        return int(steps)
    return int(scheduler_cfg.get("warmup_ratio", 0.0) * total_steps)


def build_optimizer(
    model: torch.nn.Module,
    optimizer_cfg: DictConfig,
    scheduler_cfg: DictConfig,
    total_steps: int,
    lr_scale: Callable[[str], float] = unit_scale,
) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` return value: AdamW over :func:`parameter_groups` + a per-step
    schedule."""
    from transformers import get_scheduler

    if scheduler_cfg.name not in SCHEDULES:
        raise ConfigError(f"task.scheduler.name={scheduler_cfg.name!r} is not one of {list(SCHEDULES)}")
    groups = parameter_groups(model, optimizer_cfg.weight_decay, optimizer_cfg.lr, lr_scale)
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
