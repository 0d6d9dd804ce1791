"""Export trained weights: peft adapters (``PeftModel.from_pretrained``-loadable) and merged models.

A merged model folds the adapter into the base weights (``merge_and_unload``) and saves in plain
transformers format with the tokenizer, so ``AutoModelForCausalLM.from_pretrained(dir)`` serves it.
Full fine-tuning exports the whole model in that same format.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from tunelab.methods import is_peft_model


def export_adapter(model: torch.nn.Module, tokenizer: Any, directory: Path) -> Path:
    """Save the adapter (peft) or, for full fine-tuning, the whole model (transformers) to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model with the adapter folded in; ``model`` itself stays unmerged."""
    if not is_peft_model(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


def export_merged(model: torch.nn.Module, tokenizer: Any, directory: Path) -> Path:
    """Save the merged model + tokenizer in transformers format to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    merged_copy(model).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
