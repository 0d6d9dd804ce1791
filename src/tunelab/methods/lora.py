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


def check_rank(method_cfg: DictConfig) -> None:
    """``method.r``: a whole rank >= 1."""
    r = method_cfg.r
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise ConfigError(
            f"method.r={r} must be a whole rank >= 1 (B A has r columns); set method.r=8 or another positive integer"
        )


def check_lora(cfg: DictConfig, head: str) -> None:
    """The lora entry's config check (before weights load): :func:`check_rank`."""
    check_rank(cfg.method)


def check_target_modules(model: torch.nn.Module, method_cfg: DictConfig) -> None:
    """Every name of a ``target_modules`` list names a module of ``model`` (peft matches ``name`` or a dotted
    suffix ``.name``); peft itself refuses only a list that matches nothing, and would silently skip the rest.
    The refusal names the missing names and a few of the model's Linear layer names. A string (``all-linear``,
    a regex) is peft's to match."""
    targets = module_names(method_cfg.target_modules)
    if isinstance(targets, str):
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in names)]
    if missing:
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise ConfigError(
            f"method.target_modules names {missing}, which match no module of {type(model).__name__}; its Linear "
            f"layers are named {linear[:12]}: set method.target_modules to some of them (or all-linear)"
        )


def lora_config(method_cfg: DictConfig, task_type: str):
    """The peft ``LoraConfig`` for a ``configs/method/lora.yaml``-shaped config (its rank checked again)."""
    from peft import LoraConfig

    check_rank(method_cfg)
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
    """Freeze ``model`` and inject LoRA adapters into ``method_cfg.target_modules`` (each name checked:
    :func:`check_target_modules`)."""
    from peft import get_peft_model

    check_target_modules(model, method_cfg)
    config = lora_config(method_cfg, peft_task_type(model))
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise ConfigError(f"method=lora: {error}") from error


METHODS.register(Method(name="lora", adapt=adapt_lora, check=check_lora))
