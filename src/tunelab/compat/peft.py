"""Workarounds for peft.

**Prefix tuning refuses BERT-style encoders on transformers >= 5.24** (peft 0.21.2, ``PeftModelForSequence
Classification`` / ``...TokenClassification`` / ``...QuestionAnswering``): when the task model's ``forward`` takes
no ``past_key_values``, peft looks for that literal name in the signature of the backbone (``BertModel``) and
raises "Model does not support past key values which are required for prefix tuning". transformers 5.24 renamed
the argument to ``cache`` in BERT-family encoders (still accepting ``past_key_values`` until 5.40, through a
deprecation shim that the signature does not show). :func:`expose_past_key_values` gives such a backbone an
instance-level ``forward`` that takes ``past_key_values`` and hands it on as ``cache``, so peft's prefixes reach
every attention layer as before. ``tests/test_compat.py::test_peft_still_refuses_a_backbone_that_names_it_cache``
fails once peft accepts the new name, and this module can go.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

OLD, NEW = "past_key_values", "cache"


def _takes(module: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


def expose_past_key_values(model: torch.nn.Module) -> None:
    """Give each direct child backbone of ``model`` whose forward takes ``cache`` but not ``past_key_values`` an
    instance ``forward`` with the old name (and the signature peft inspects); other models are left alone."""
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
