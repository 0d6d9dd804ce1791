"""Workarounds for peft (checked on peft 0.21.2 with transformers 5.24.0; pyproject allows peft 0.21.x).

Each function names the peft behaviour it works around and the test in ``tests/test_compat.py`` that fails once
peft no longer shows it (then it can go).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

OLD, NEW = "past_key_values", "cache"


def _takes(module: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


def expose_past_key_values(model: torch.nn.Module) -> None:
    """Give each direct child backbone of ``model`` whose forward takes ``cache`` but not ``past_key_values`` an
    instance ``forward`` with the old name (and the signature peft inspects); other models are left alone.

    **Prefix tuning refuses BERT-style encoders on transformers >= 5.24** (peft 0.21.2, ``PeftModelForSequence
    Classification`` / ``...TokenClassification`` / ``...QuestionAnswering``): when the task model's ``forward``
    takes no ``past_key_values``, peft looks for that literal name in the signature of the backbone
    (``BertModel``) and raises "Model does not support past key values which are required for prefix tuning".
    transformers 5.24 renamed the argument to ``cache`` in BERT-family encoders (still accepting
    ``past_key_values`` until 5.40, through a deprecation shim that the signature does not show). The instance
    ``forward`` takes ``past_key_values`` and hands it on as ``cache``, so peft's prefixes reach every attention
    layer as before. ``test_peft_still_refuses_a_backbone_that_names_it_cache`` fails once peft accepts the new
    name, and this function can go.
    """
    from transformers import PreTrainedModel

    for child in model.children():
        if isinstance(child, PreTrainedModel) and _takes(child, NEW) and not _takes(child, OLD):
            forward = child.forward

            def forward_with_past_key_values(*args: Any, _forward=forward, **kwargs: Any) -> Any:
                if OLD in kwargs:
                    kwargs[NEW] = kwargs.pop(OLD)
                return _forward(*args, **kwargs)

            signature = inspect.signature(forward)
            renamed = [p.replace(name=OLD) if p.name == NEW else p for p in signature.parameters.values()]
            forward_with_past_key_values.__signature__ = signature.replace(parameters=renamed)
            child.forward = forward_with_past_key_values


@contextmanager
def disable_adapter(model: torch.nn.Module) -> Iterator[None]:
    """peft's ``disable_adapter`` for a peft model (any other model is left as it is), working for soft prompts
    on models that cannot generate too.

    **Disabling a soft prompt crashes on a classifier** (peft 0.21.2, ``PeftModel.disable_adapter``): for prompt
    learning it swaps ``prepare_inputs_for_generation`` too, which a BERT classifier lacks; the failed lookup
    leaves a variable unset that its ``finally`` block reads (UnboundLocalError). Nor does it switch off the trained
    copy of the classification head (``modules_to_save``). For such models the forward is routed to the base model
    and the head copies are switched off here. ``test_peft_still_cannot_disable_a_soft_prompt_on_a_classifier``
    fails once peft's own context gives the base model's logits, and this function can go.
    """
    if not hasattr(model, "peft_config"):
        yield
        return
    if not model.active_peft_config.is_prompt_learning or hasattr(model.base_model, "prepare_inputs_for_generation"):
        with model.disable_adapter():
            yield
        return
    from peft.utils.other import AuxiliaryTrainingWrapper

    wrappers = [module for module in model.modules() if isinstance(module, AuxiliaryTrainingWrapper)]
    model.forward = model.base_model.forward
    for wrapper in wrappers:
        wrapper.enable_adapters(False)
    try:
        yield
    finally:
        del model.forward  # back to the class's forward
        for wrapper in wrappers:
            wrapper.enable_adapters(True)


@contextmanager
def tuner_key_prefixes_renamed(rename: Callable[[str], str]) -> Iterator[None]:
    """Inside the block, peft matches adapter tensors by module names passed through ``rename`` (which should drop
    the wrapper prefixes that a state dict leaves out).

    **Adapter keys are missed inside FSDP units** (peft 0.21.2, ``tuners_utils._get_tuner_state_dict_key_prefixes``):
    peft finds an adapter's state-dict keys from module names and strips only a *leading*
    ``_fsdp_wrapped_module.``. With one FSDP unit per transformer block the prefix sits mid-name
    (``...layers.0._fsdp_wrapped_module.self_attn...``), while the gathered state dict has none, so
    ``save_pretrained(state_dict=...)`` matches no adapter tensor and writes an empty adapter.
    ``test_peft_still_misses_adapter_keys_inside_fsdp_units`` fails once peft finds them, and this can go.
    """
    from unittest import mock

    from peft.tuners import tuners_utils

    key_prefixes = tuners_utils._get_tuner_state_dict_key_prefixes

    def renamed_key_prefixes(module: torch.nn.Module, adapter_name: str | None = None) -> set[str]:
        return {rename(p) for p in key_prefixes(module, adapter_name)}

    with mock.patch.object(tuners_utils, "_get_tuner_state_dict_key_prefixes", renamed_key_prefixes):
        yield
