"""LoHa (Hyeon-Woo et al., 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning") through peft's LyCORIS tuners.

A frozen weight W (d_out x d_in) gets a Hadamard product of two rank-r products:
Delta W = (alpha / r) * (B1 A1) ⊙ (B2 A2), with B1, B2 (d_out x r) and A1, A2 (r x d_in) trained; its rank can
reach r^2 from 2 r (d_in + d_out) parameters. A2 starts at 0, so the adapted model starts equal to the base
model. ``rank_dropout`` drops rows of Delta W, ``module_dropout`` the whole update, per training step. Merging
folds Delta W into W.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.methods.lora import check_method_rank, check_rank
from tunelab.methods.peft_task import inject_peft, module_names
from tunelab.methods.spec import METHODS, Method


def lycoris_knobs(method_cfg: DictConfig, task_type: str) -> dict[str, Any]:
    """The knobs LoHa and LoKr share (``configs/method/loha.yaml``, ``lokr.yaml``), as peft config arguments."""
    check_rank(method_cfg)
    return {
        "task_type": task_type,
        "r": method_cfg.r,
        "alpha": method_cfg.alpha,
        "rank_dropout": method_cfg.rank_dropout,
        "module_dropout": method_cfg.module_dropout,
        "target_modules": module_names(method_cfg.target_modules),
    }


def loha_config(method_cfg: DictConfig, task_type: str):
    """The peft ``LoHaConfig`` of a ``configs/method/loha.yaml``-shaped config."""
    from peft import LoHaConfig

    return LoHaConfig(**lycoris_knobs(method_cfg, task_type))


def adapt_loha(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Freeze ``model`` and add LoHa updates to ``method_cfg.target_modules``."""
    return inject_peft(model, method_cfg, loha_config)


METHODS.register(Method(name="loha", adapt=adapt_loha, check=check_method_rank))
