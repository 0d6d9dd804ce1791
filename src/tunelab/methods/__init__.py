"""The method axis: how a loaded backbone is adapted (which parameters train, which modules are added).

Each method is a function ``adapt(model, method_cfg, tokenizer) -> model`` registered in :data:`METHODS`; it
returns the model to train, with ``requires_grad`` set on exactly the parameters the method trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.errors import ConfigError
from tunelab.methods.adapter import adapt_adapter
from tunelab.methods.bitfit import adapt_bitfit
from tunelab.methods.full import adapt_full
from tunelab.methods.ia3 import adapt_ia3
from tunelab.methods.inhouse import check_family_supports
from tunelab.methods.lora import adapt_lora
from tunelab.methods.mam import adapt_mam
from tunelab.methods.prompt_learning import adapt_prefix, adapt_prompt, adapt_ptuning
from tunelab.methods.qlora import adapt_qlora, qlora_quantization_config
from tunelab.methods.unipelt import adapt_unipelt

METHODS: dict[str, Callable[[torch.nn.Module, DictConfig, Any], torch.nn.Module]] = {
    "full": adapt_full,
    "lora": adapt_lora,
    "qlora": adapt_qlora,
    "ia3": adapt_ia3,
    "prompt": adapt_prompt,
    "ptuning": adapt_ptuning,
    "prefix": adapt_prefix,
    "ptuning_v2": adapt_prefix,
    "bitfit": adapt_bitfit,
    "adapter": adapt_adapter,
    "mam": adapt_mam,
    "unipelt": adapt_unipelt,
}


def apply_method(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Adapt ``model`` with the method named by ``method_cfg.name``."""
    if method_cfg.name not in METHODS:
        raise ConfigError(f"method={method_cfg.name!r} is not one of {sorted(METHODS)}")
    if required_sublayers(method_cfg):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        check_family_supports(method_cfg.name, str(model_type), required_sublayers(method_cfg))
    return METHODS[method_cfg.name](model, method_cfg, tokenizer)


IN_PLACE_METHODS = ("full", "bitfit")  # train the base weights themselves: no adapter to switch off
SOFT_PROMPT_METHODS = ("prompt", "ptuning", "prefix", "ptuning_v2", "mam", "unipelt")


def required_sublayers(method_cfg: DictConfig) -> list[str]:
    """Sublayer roles (see ``inhouse.SUBLAYERS``) an in-house method adapts; empty for the others."""
    if method_cfg.name == "adapter":
        return list(method_cfg.positions)
    return {"mam": ["ffn"], "unipelt": ["query", "value", "ffn_output"]}.get(method_cfg.name, [])


def quantization_config(method_cfg: DictConfig) -> Any:
    """How the base must be loaded for this method: a bitsandbytes config for qlora, else None."""
    return qlora_quantization_config(method_cfg) if method_cfg.name == "qlora" else None


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
