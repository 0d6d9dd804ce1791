"""VeRA (Kopiczko et al., 2024, "VeRA: Vector-based Random Matrix Adaptation") through peft.

One pair of frozen random matrices A (r x d_in) and B (d_out x r), drawn once from ``projection_prng_key`` and
shared by every adapted layer, and per layer two trained scaling vectors d (r) and b (d_out):
h = W x + Lambda_b B Lambda_d A x, with Lambda = diag. b starts at 0, so the adapted model starts equal to the
base model. Layers of different shapes (Llama's q/k/v/o/gate/up/down) use slices of A and B drawn at the largest
d_in and d_out of the targets. Merging folds Lambda_b B Lambda_d A into W.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.methods.lora import check_method_rank
from tunelab.methods.peft_task import inject_peft, module_names
from tunelab.methods.spec import METHODS, Method


def vera_config(method_cfg: DictConfig, task_type: str):
    """The peft ``VeraConfig`` of a ``configs/method/vera.yaml``-shaped config."""
    from peft import VeraConfig

    return VeraConfig(
        task_type=task_type,
        r=method_cfg.r,
        target_modules=module_names(method_cfg.target_modules),
        projection_prng_key=method_cfg.projection_prng_key,
        save_projection=method_cfg.save_projection,
        vera_dropout=method_cfg.dropout,
        d_initial=method_cfg.d_initial,
    )


def adapt_vera(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Freeze ``model`` and add VeRA's scaling vectors to ``method_cfg.target_modules``."""
    return inject_peft(model, method_cfg, vera_config)


METHODS.register(Method(name="vera", adapt=adapt_vera, check=check_method_rank))
