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
    """

    name: str
    adapt: Adapt
    trains_all_weights: bool = False
    trains_base_in_place: bool = False
    virtual_tokens: bool = False
    sublayers: Callable[[DictConfig], list[str]] = no_sublayers
    quantization: Callable[[DictConfig], Any] = no_quantization
    check: Callable[[DictConfig, str], None] = no_check


METHODS: Registry[Method] = Registry("method")
