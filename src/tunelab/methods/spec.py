"""The method axis (``method=``): what each method declares, and :data:`METHODS`, their registry.

A method is a function ``adapt(model, method_cfg, tokenizer) -> model`` that returns the model to train with
``requires_grad`` set on exactly the parameters it trains, plus a :class:`Method` entry registered in the
method's own file. The rest of tunelab asks the entry, never the name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.registry import Registry

Adapt = Callable[[torch.nn.Module, DictConfig, Any], torch.nn.Module]


def no_sublayers(method_cfg: DictConfig) -> list[str]:
    return []


def no_quantization(method_cfg: DictConfig) -> None:
    return None


def no_check(cfg: DictConfig, head: str) -> None:
    """The default config check: nothing beyond the shared ones."""


def no_data_init(model: torch.nn.Module, method_cfg: DictConfig, datamodule: Any) -> None:
    """The default data-driven initialisation: none (the adapters start as ``adapt`` made them)."""


def unit_lr_scale(method_cfg: DictConfig, param_name: str) -> float:
    """The default learning-rate scale: every trainable parameter trains at ``optimizer.lr``."""
    return 1.0


def no_callbacks(method_cfg: DictConfig) -> list[Any]:
    """The default: the method adds no Lightning callback to the run."""
    return []


@dataclass(frozen=True)
class Method:
    """One ``method=`` option.

    - ``adapt``: see the module docstring
    - ``trains_all_weights``: every weight trains (checkpoints hold the whole model; the export is the model)
    - ``trains_base_in_place``: updates the base weights themselves, so there is no adapter to switch off for a
      reference model (full, bitfit)
    - ``virtual_tokens``: adds virtual tokens (an input prefix or past key values), which gradient checkpointing
      drops and packed examples would share
    - ``sublayers(method_cfg)``: the sublayer roles (``inhouse.SUBLAYERS``) an in-house method adapts, checked
      against the model family before weights load
    - ``quantization(method_cfg)``: how the base must load (a bitsandbytes config), or None
    - ``check(cfg, head)``: its own config check, given the model head the objective trains
    - ``init_from_data(model, method_cfg, datamodule)``: initialises the adapted model from training batches
      (EVA), called once the objective built its data module, before training
    - ``lr_scale(method_cfg, param_name) -> float``: the factor on ``optimizer.lr`` for one trainable parameter
      (LoRA+), applied through the optimizer's parameter groups by every task
    - ``callbacks(method_cfg)``: Lightning callbacks the method needs during fit, next to ``cfg.callbacks``
      (AdaLoRA's rank allocation after each optimizer step)
    """

    name: str
    adapt: Adapt
    trains_all_weights: bool = False
    trains_base_in_place: bool = False
    virtual_tokens: bool = False
    sublayers: Callable[[DictConfig], list[str]] = no_sublayers
    quantization: Callable[[DictConfig], Any] = no_quantization
    check: Callable[[DictConfig, str], None] = no_check
    init_from_data: Callable[[torch.nn.Module, DictConfig, Any], None] = no_data_init
    lr_scale: Callable[[DictConfig, str], float] = unit_lr_scale
    callbacks: Callable[[DictConfig], list[Any]] = no_callbacks


METHODS: Registry[Method] = Registry("method")
