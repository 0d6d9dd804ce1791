"""Which peft task type a transformers model needs (it decides how ``PeftModel`` routes inputs and which
head stays trainable: ``SEQ_CLS`` keeps the classification head trainable next to the adapter)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tunelab.errors import ConfigError

SUFFIXES = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}


def peft_task_type(model: torch.nn.Module) -> str:
    """``CAUSAL_LM``, ``SEQ_CLS``, ... from the model class; a bare backbone is ``FEATURE_EXTRACTION``."""
    name = type(model).__name__
    return next((task for suffix, task in SUFFIXES.items() if name.endswith(suffix)), "FEATURE_EXTRACTION")


def module_names(value: Any) -> str | list[str]:
    """A peft ``target_modules``-style value from config: a string (e.g. ``all-linear``) or a plain list."""
    if isinstance(value, str):
        return value
    return [str(name) for name in (OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)]


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


def inject_peft(model: torch.nn.Module, method_cfg: DictConfig, make_config: Callable[[DictConfig, str], Any]):
    """Freeze ``model`` and wrap it in peft with ``make_config(method_cfg, task_type)`` (a peft ``PeftConfig``),
    after checking that each ``target_modules`` name names a module (:func:`check_target_modules`); a peft refusal
    becomes a ConfigError naming the method."""
    from peft import get_peft_model

    check_target_modules(model, method_cfg)
    try:
        return get_peft_model(model, make_config(method_cfg, peft_task_type(model)))
    except ValueError as error:
        raise ConfigError(f"method={method_cfg.name}: {error}") from error
