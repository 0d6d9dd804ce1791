"""Distributed strategies that need the loaded model to be configured."""

from __future__ import annotations

from typing import Any

import torch

from tunelab.errors import ConfigError


def block_classes(model: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """The transformer block classes of ``model``, named by transformers' ``_no_split_modules``."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(f"trainer=fsdp: cannot find the transformer block class of {type(model).__name__}")
    return classes


def fsdp_strategy(
    model: torch.nn.Module,
    sharding_strategy: str = "FULL_SHARD",
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
    state_dict_type: str = "full",
) -> Any:
    """Lightning's FSDPStrategy wrapping each transformer block of ``model`` as one FSDP unit."""
    from lightning.pytorch.strategies import FSDPStrategy

    blocks = block_classes(model)
    return FSDPStrategy(
        auto_wrap_policy=blocks,
        activation_checkpointing_policy=blocks if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        state_dict_type=state_dict_type,
        use_orig_params=True,
    )
