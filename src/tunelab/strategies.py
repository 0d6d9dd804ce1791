"""Multi-process strategies built from the loaded model, and gathering their shards for export.

``trainer=ddp`` replicates the model on every rank; ``trainer=fsdp`` wraps each transformer block (the model's
``_no_split_modules`` class) as one FSDP unit; ``trainer=deepspeed_zero2|deepspeed_zero3|deepspeed_zero3_offload``
run DeepSpeed ZeRO. Lightning allows the last two only on CUDA; with ``trainer.accelerator=cpu`` the CPU variants
(:mod:`tunelab.compat.lightning`, :mod:`tunelab.compat.deepspeed`) run them on gloo processes (how the test suite
checks sharded training and saving without a GPU).

Every one of them waits ``trainer.strategy.timeout_s`` (:data:`DEFAULT_TIMEOUT_S`) in a collective for the other
ranks, and a rank whose process group breaks (another rank died, or that wait ran out) stops with one line,
:class:`tunelab.compat.lightning.LostRankError`, instead of the backend's stack or a hang.

Sharded training leaves each rank with a slice of every parameter, so saving ``model.save_pretrained`` on
rank 0 alone would write an empty or partial adapter (the failure most reported for FSDP / ZeRO-3 LoRA runs).
:func:`gathered_for_export` is a collective block every rank enters: in it rank 0 saves the complete tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from tunelab.compat.deepspeed import CPUDeepSpeedStrategy, TunelabDeepSpeedStrategy
from tunelab.compat.lightning import TunelabDDPStrategy, TunelabFSDPStrategy, full_state_dict
from tunelab.compat.peft import tuner_key_prefixes_renamed
from tunelab.errors import ConfigError
from tunelab.models.loading import block_classes
from tunelab.trainer_config import runs_on_cpu

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
DEFAULT_TIMEOUT_S = 1800.0  # torch's and Lightning's default process-group timeout (30 min)


def unwrapped_name(name: str) -> str:
    """A parameter name as the unwrapped model knows it (FSDP units and activation checkpointing add prefixes
    to names reached from outside; their state dicts already drop them)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def ddp_strategy(
    model: torch.nn.Module, accelerator: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S
) -> TunelabDDPStrategy:
    """Lightning's DDPStrategy whose collectives wait ``timeout_s`` seconds for the other ranks."""
    del model, accelerator  # DDP replicates whatever module it is given, on the device Lightning picks
    return TunelabDDPStrategy(timeout=timedelta(seconds=timeout_s))


def fsdp_strategy(
    model: torch.nn.Module,
    accelerator: str = "auto",
    sharding_strategy: str = "FULL_SHARD",
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
    state_dict_type: str = "full",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> TunelabFSDPStrategy:
    """Lightning's FSDPStrategy wrapping each transformer block of ``model`` as one FSDP unit; its collectives wait
    ``timeout_s`` seconds for the other ranks."""
    del accelerator  # TunelabFSDPStrategy reads the device it runs on from Lightning
    blocks = block_classes(model)
    if activation_checkpointing and getattr(model, "config", None) is not None:
        model.config.use_cache = False  # a block recomputed in backward would append to the KV cache twice
    return TunelabFSDPStrategy(
        auto_wrap_policy=blocks,
        activation_checkpointing_policy=blocks if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        state_dict_type=state_dict_type,
        use_orig_params=True,
        timeout=timedelta(seconds=timeout_s),
    )


def deepspeed_strategy(
    model: torch.nn.Module,
    accelerator: str = "auto",
    stage: int = 2,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> TunelabDeepSpeedStrategy:
    """Lightning's DeepSpeedStrategy at ZeRO ``stage``; checkpoints hold only the trained tensors when part of
    ``model`` is frozen (parameter-efficient methods); its collectives wait ``timeout_s`` seconds for the other
    ranks."""
    if offload_parameters and stage != 3:
        raise ConfigError(f"trainer.strategy.offload_parameters=true needs ZeRO stage 3, not stage {stage}")
    strategy_class = CPUDeepSpeedStrategy if runs_on_cpu(accelerator) else TunelabDeepSpeedStrategy
    return strategy_class(
        stage=stage,
        offload_optimizer=offload_optimizer,
        offload_parameters=offload_parameters,
        exclude_frozen_parameters=any(not p.requires_grad for p in model.parameters()),
        timeout=timedelta(seconds=timeout_s),
    )


SHARDING_ENGINES = (FSDPStrategy, DeepSpeedStrategy)  # bring their own precision plugin and checkpoint loading


def strategy_loads_checkpoints(trainer: Any) -> bool:
    """Whether the model's weights load only through the strategy (FSDP, DeepSpeed), not ``load_state_dict``."""
    return isinstance(trainer.strategy, SHARDING_ENGINES)


def is_sharding_engine(strategy: Any) -> bool:
    """Whether the strategy (an object, or Lightning's name for one) is FSDP or DeepSpeed: Lightning gives these
    their own precision plugin, and they write their own checkpoint format."""
    if isinstance(strategy, str):
        return any(kind in strategy.lower() for kind in ("fsdp", "deepspeed"))
    return isinstance(strategy, SHARDING_ENGINES)


@contextmanager
def gathered_for_export(trainer: Any, model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor] | None]:
    """Inside this block rank 0 can save ``model`` whole; collective: every rank must enter it.

    - FSDP: yields ``model``'s full state dict on rank 0 (``None`` elsewhere), for
      :func:`tunelab.export.export_adapter` to save in place of the local shards. peft finds adapter keys from
      module names and strips only a leading FSDP prefix; one FSDP unit per block puts it mid-name, so the
      block also makes peft strip it there (:func:`tunelab.compat.peft.tuner_key_prefixes_renamed`).
    - ZeRO-3: the trained parameters are gathered in place for the block (the whole model when every weight
      trains); yields ``None``.
    - Unsharded strategies: ``model`` holds every tensor; yields ``None``.
    """
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        prefix = _module_prefix(trainer.lightning_module, model)
        with full_state_dict(strategy.model, strategy.root_device):
            full = strategy.model.state_dict()
        state = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
        with tuner_key_prefixes_renamed(unwrapped_name):
            yield state if trainer.is_global_zero else None
    elif isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        trained = [p for p in model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trained, modifier_rank=None):
            yield None
    else:
        yield None


def _module_prefix(root: torch.nn.Module, module: torch.nn.Module) -> str:
    """The state-dict key prefix of ``module`` inside ``root`` (e.g. ``"model."`` for a task's backbone)."""
    for name, candidate in root.named_modules():
        if candidate is module:
            return f"{name}." if name else ""
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(root).__name__}")
