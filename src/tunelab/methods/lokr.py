"""LoKr (Edalati et al., 2022, "KronA: Parameter Efficient Tuning with Kronecker Adapter") through peft's
LyCORIS tuners.

A frozen weight W (d_out x d_in), with d_out = a c and d_in = b e factored near their square roots (or by
``decompose_factor``), gets a Kronecker product: Delta W = (alpha / r) * C ⊗ M, with C (a x b) trained in full
and M (c x e) trained in full, or as B A (c x r, r x e) when r < max(c, e) / 2. C starts at 0, so the adapted
model starts equal to the base model. ``rank_dropout`` and ``module_dropout`` as in LoHa. Merging folds Delta W
into W.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.methods.loha import lycoris_knobs
from tunelab.methods.lora import check_method_rank
from tunelab.methods.peft_task import inject_peft
from tunelab.methods.spec import METHODS, Method


def lokr_config(method_cfg: DictConfig, task_type: str):
    """The peft ``LoKrConfig`` of a ``configs/method/lokr.yaml``-shaped config."""
    from peft import LoKrConfig

    return LoKrConfig(**lycoris_knobs(method_cfg, task_type), decompose_factor=method_cfg.decompose_factor)


def adapt_lokr(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Freeze ``model`` and add LoKr updates to ``method_cfg.target_modules``."""
    return inject_peft(model, method_cfg, lokr_config)


METHODS.register(Method(name="lokr", adapt=adapt_lokr, check=check_method_rank))
