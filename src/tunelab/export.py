"""Export trained weights: peft adapters (``PeftModel.from_pretrained``-loadable) and merged models.

A merged model folds the adapter into the base weights (``merge_and_unload``; for QLoRA into dequantized
base weights) and saves in plain transformers format with the tokenizer, so
``AutoModelForCausalLM.from_pretrained(dir)`` serves it.
Full fine-tuning exports the whole model in that same format.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tunelab.atomic import replace_dir
from tunelab.methods import is_peft_model
from tunelab.methods.inhouse import is_inhouse, is_inhouse_dir, load_inhouse, save_inhouse
from tunelab.methods.qlora import merge_dequantized
from tunelab.models.loading import four_bit_layers


def export_adapter(
    model: torch.nn.Module, tokenizer: Any | None, directory: Path, state: Mapping[str, torch.Tensor] | None = None
) -> Path:
    """Save the adapter (peft, or in-house: weights + method config) or, for full fine-tuning and bitfit, the
    whole model (transformers) to ``directory``. ``state``: the tensors gathered from a sharded model
    (:func:`tunelab.strategies.gathered_for_export`), saved in place of ``model``'s local shards. The folder
    appears complete or not at all (:func:`tunelab.atomic.replace_dir`)."""

    def build(staging: Path) -> None:
        if is_inhouse(model):
            save_inhouse(model, staging, state)
        else:
            model.save_pretrained(staging, state_dict=dict(state) if state is not None else None)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    return replace_dir(directory, build)


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model with the adapter folded in; ``model`` itself stays unmerged."""
    if not is_peft_model(model):
        return model
    if four_bit_layers(model):
        return merge_dequantized(model)
    return copy.deepcopy(model).merge_and_unload()


def export_merged(model: torch.nn.Module, tokenizer: Any, directory: Path) -> Path:
    """Save the merged model + tokenizer in transformers format to ``directory`` (complete or not at all)."""
    merged = merged_copy(model)

    def build(staging: Path) -> None:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return replace_dir(directory, build)


def load_exported(base_model: torch.nn.Module, directory: Path, tokenizer: Any = None) -> torch.nn.Module:
    """``base_model`` with the adapter saved by :func:`export_adapter` in ``directory`` (peft or in-house)."""
    if is_inhouse_dir(directory):
        return load_inhouse(base_model, directory, tokenizer)
    from peft import PeftModel

    from tunelab.compat.peft import expose_past_key_values

    expose_past_key_values(base_model)
    return PeftModel.from_pretrained(base_model, directory)


def load_adapter_set(base_model: torch.nn.Module, adapters: Mapping[str, Path]) -> torch.nn.Module:
    """One base model carrying several named peft adapters (lora, qlora, ia3), e.g. one per task.

    The first adapter is active; ``model.set_adapter(name)`` switches in place, without reloading the base.
    In-house adapters (adapter, mam, unipelt) and soft prompts hold one adapter per model and are refused.
    """
    import json

    from peft import PeftModel

    from tunelab.errors import ConfigError

    if not adapters:
        raise ConfigError("load_adapter_set needs at least one {name: adapter directory}")
    for name, directory in adapters.items():
        config_file = Path(directory) / "adapter_config.json"
        if not config_file.exists():
            raise ConfigError(
                f"adapter '{name}': {config_file} not found (only peft lora / qlora / ia3 adapters switch)"
            )
        if json.loads(config_file.read_text()).get("peft_type") not in ("LORA", "IA3"):
            raise ConfigError(f"adapter '{name}' in {directory} is not a LoRA / IA3 adapter: peft cannot switch it")
    (first_name, first_dir), *rest = adapters.items()
    model = PeftModel.from_pretrained(base_model, first_dir, adapter_name=first_name)
    for name, directory in rest:
        model.load_adapter(directory, adapter_name=name)
    return model
