"""(IA)^3 (Liu et al., 2022) through peft: learned vectors rescale activations.

Keys and values of attention and the input of the feed-forward down-projection are multiplied elementwise
by trained vectors l_k, l_v, l_ff (initialised to ones, so training starts from the base model):
k' = l_k * k, v' = l_v * v, ff' = W_down (l_ff * h). Merging folds the vectors into the weights.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.methods.peft_task import module_names, peft_task_type
from tunelab.methods.spec import METHODS, Method


def adapt_ia3(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Insert (IA)^3 scaling vectors into ``target_modules`` (``feedforward_modules`` scale their input)."""
    from peft import IA3Config, get_peft_model

    config = IA3Config(
        task_type=peft_task_type(model),
        target_modules=module_names(method_cfg.target_modules),
        feedforward_modules=module_names(method_cfg.feedforward_modules),
    )
    return get_peft_model(model, config)


METHODS.register(Method(name="ia3", adapt=adapt_ia3))
