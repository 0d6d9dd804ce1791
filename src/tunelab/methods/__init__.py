"""The method axis: how a loaded backbone is adapted (which parameters train, which modules are added).

Each method registers a :class:`~tunelab.methods.spec.Method` entry in :data:`METHODS` from its own file; every
module of this package is imported here, so a new method is its file and its YAML (a plugin registers its own
entries the same way from its own package).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.methods.inhouse import check_family_supports
from tunelab.methods.spec import METHODS
from tunelab.registry import import_submodules

import_submodules(__name__, __path__)


def apply_method(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Adapt ``model`` with the method named by ``method_cfg.name``."""
    method = METHODS[method_cfg.name]
    if method.sublayers(method_cfg):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        check_family_supports(method_cfg.name, str(model_type), method.sublayers(method_cfg))
    return method.adapt(model, method_cfg, tokenizer)


HEAD_MODULES = ("classifier", "score")  # classification heads of BERT-like / decoder *ForSequenceClassification


def train_new_head(model: torch.nn.Module) -> None:
    """A classification head starts random, so it trains under every method. peft's ``SEQ_CLS`` already trains
    a copy of it (``modules_to_save``); for the in-house and non-peft methods it is switched on here."""
    if is_peft_model(model):
        return
    for name, param in model.named_parameters():
        if name.split(".")[0] in HEAD_MODULES:
            param.requires_grad_(True)


def is_peft_model(model: torch.nn.Module) -> bool:
    """True when the model is wrapped by peft (adapters save in peft format)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


@dataclass(frozen=True)
class ParameterReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def parameter_report(model: torch.nn.Module) -> ParameterReport:
    """Count trainable and total parameters (tied weights counted once)."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return ParameterReport(trainable=trainable, total=total)
