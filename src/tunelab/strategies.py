"""Sharded strategies built from the loaded model, and gathering their shards for export.

``trainer=fsdp`` wraps each transformer block (the model's ``_no_split_modules`` class) as one FSDP unit;
``trainer=deepspeed_zero2|deepspeed_zero3|deepspeed_zero3_offload`` run DeepSpeed ZeRO. Lightning allows both
only on CUDA; with ``trainer.accelerator=cpu`` the CPU variants below run them on gloo processes (how the
test suite checks sharded training and saving without a GPU).

Sharded training leaves each rank with a slice of every parameter, so saving ``model.save_pretrained`` on
rank 0 alone would write an empty or partial adapter (the failure most reported for FSDP / ZeRO-3 LoRA runs).
:func:`gathered_for_export` is a collective block every rank enters: in it rank 0 saves the complete tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

from tunelab.errors import ConfigError
from tunelab.models.loading import block_classes

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """A parameter name as the unwrapped model knows it (FSDP units and activation checkpointing add prefixes
    to names reached from outside; their state dicts already drop them)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def runs_on_cpu(accelerator: str) -> bool:
    """Whether ``trainer.accelerator`` resolves to CPU processes (``auto`` does on a machine without CUDA)."""
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


@contextmanager
def _full_state_dict(module: torch.nn.Module, offload_to_cpu: bool) -> Iterator[None]:
    """FSDP state dicts (model and optimizer) gathered whole on rank 0. GPUs offload each gathered unit to host
    memory (as Lightning does); CPU process groups must not: that gather crashed rank 0."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=offload_to_cpu, rank0_only=True),
        FullOptimStateDictConfig(offload_to_cpu=offload_to_cpu, rank0_only=True),
    ):
        yield


class TunelabFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP, changed in two ways.

    - The LightningModule is wrapped once; later stages on the same Trainer (validate -> fit -> test) reuse
      that root. Lightning re-runs setup per stage and, finding the blocks already wrapped, would leave the
      root unwrapped, its own parameters (embeddings, head) still flat shards.
    - It runs on CPU processes too: torch's FSDP is given the CPU as its compute device (Lightning passes the
      CUDA index), and full state dicts are gathered without offload, which crashed rank 0 of a CPU group.
    """

    _root: Any = None

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if self._root is not None and self._root.module is model:
            return self._root
        on_cpu = self.root_device.type == "cpu"
        wrapped = FSDP(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu") if on_cpu else self.root_device.index,
            **self.kwargs,
        )
        policy = self.kwargs.pop("auto_wrap_policy", None)  # applied above; Lightning warns if it sees it again
        try:
            self._root = super()._setup_model(wrapped)  # moves metrics, applies activation checkpointing
        finally:
            self.kwargs["auto_wrap_policy"] = policy
        return self._root

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loader, reading a full checkpoint file eagerly: its lazy loader builds
        ``TypedStorage(dtype=UntypedStorage().dtype)``, which torch 2.13 no longer has."""
        from unittest import mock

        import lightning.pytorch.strategies.fsdp as lightning_fsdp

        def eager_load(path: Any) -> dict[str, Any]:
            return torch.load(path, map_location="cpu", weights_only=False)

        with mock.patch.object(lightning_fsdp, "_lazy_load", eager_load):
            return super().load_checkpoint(checkpoint_path, weights_only)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        with _full_state_dict(self.model, offload_to_cpu=self.root_device.type != "cpu"):
            return self.model.state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # unwrap LightningOptimizer
        with _full_state_dict(self.model, offload_to_cpu=self.root_device.type != "cpu"):
            state = FSDP.optim_state_dict(self.model, optimizer)
        if self.global_rank == 0:
            return FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state


class TunelabDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed across the stages of one Trainer (validate -> fit -> test).

    - The engine of an evaluation stage is destroyed before the training engine is built: the ZeRO-3 hooks it
      put on every module would otherwise run twice (DeepSpeed fails with "pop from an empty deque").
    - Evaluation after fitting reuses the training engine: an inference engine cannot load a ZeRO-3 training
      checkpoint (it lacks ``_restore_from_bit16_weights``), and test scores the best checkpoint.
    """

    _inference_engine: Any = None
    _training_engine: Any = None

    def _initialize_deepspeed_train(self, model: torch.nn.Module) -> None:
        if self._inference_engine is not None:
            self._inference_engine.destroy()
            self._inference_engine = None
        super()._initialize_deepspeed_train(model)
        self._training_engine = self.model

    def _initialize_deepspeed_inference(self, model: torch.nn.Module) -> None:
        if self._training_engine is not None and self._training_engine.module is model:
            self.model = self._training_engine
            return
        super()._initialize_deepspeed_inference(model)
        self._inference_engine = self.model


class CPUDeepSpeedStrategy(TunelabDeepSpeedStrategy):
    """DeepSpeed over CPU processes: the same engine, without Lightning's CUDA-only checks (the accelerator
    type, and that each process's CUDA index equals its local rank). The root device carries the local rank
    as its index, which DeepSpeed reads as the process's device rank; tensors on it are plain CPU tensors."""

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


def fsdp_strategy(
    model: torch.nn.Module,
    accelerator: str = "auto",
    sharding_strategy: str = "FULL_SHARD",
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
    state_dict_type: str = "full",
) -> TunelabFSDPStrategy:
    """Lightning's FSDPStrategy wrapping each transformer block of ``model`` as one FSDP unit."""
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
    )


def deepspeed_strategy(
    model: torch.nn.Module,
    accelerator: str = "auto",
    stage: int = 2,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
) -> TunelabDeepSpeedStrategy:
    """Lightning's DeepSpeedStrategy at ZeRO ``stage``; checkpoints hold only the trained tensors when part of
    ``model`` is frozen (parameter-efficient methods)."""
    if offload_parameters and stage != 3:
        raise ConfigError(f"trainer.strategy.offload_parameters=true needs ZeRO stage 3, not stage {stage}")
    strategy_class = CPUDeepSpeedStrategy if runs_on_cpu(accelerator) else TunelabDeepSpeedStrategy
    return strategy_class(
        stage=stage,
        offload_optimizer=offload_optimizer,
        offload_parameters=offload_parameters,
        exclude_frozen_parameters=any(not p.requires_grad for p in model.parameters()),
    )


SHARDING_ENGINES = (FSDPStrategy, DeepSpeedStrategy)  # bring their own precision plugin and checkpoint loading


def strategy_loads_checkpoints(trainer: Any) -> bool:
    """Whether the model's weights load only through the strategy (FSDP, DeepSpeed), not ``load_state_dict``."""
    return isinstance(trainer.strategy, SHARDING_ENGINES)


def has_own_precision(strategy: Any) -> bool:
    """Whether Lightning gives the strategy (an object, or Lightning's name for one) its own precision plugin."""
    if isinstance(strategy, str):
        return any(kind in strategy.lower() for kind in ("fsdp", "deepspeed"))
    return isinstance(strategy, SHARDING_ENGINES)


@contextmanager
def gathered_for_export(trainer: Any, model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor] | None]:
    """Inside this block rank 0 can save ``model`` whole; collective: every rank must enter it.

    - FSDP: yields ``model``'s full state dict on rank 0 (``None`` elsewhere), for
      :func:`tunelab.export.export_adapter` to save in place of the local shards. peft finds adapter keys from
      module names and strips only a leading FSDP prefix; one FSDP unit per block puts it mid-name, so the
      block also makes peft strip it there.
    - ZeRO-3: the trained parameters are gathered in place for the block (the whole model when every weight
      trains); yields ``None``.
    - Unsharded strategies: ``model`` holds every tensor; yields ``None``.
    """
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        from unittest import mock

        from peft.tuners import tuners_utils

        prefix = _module_prefix(trainer.lightning_module, model)
        with _full_state_dict(strategy.model, offload_to_cpu=strategy.root_device.type != "cpu"):
            full = strategy.model.state_dict()
        state = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
        key_prefixes = tuners_utils._get_tuner_state_dict_key_prefixes

        def unwrapped_key_prefixes(module: torch.nn.Module, adapter_name: str | None = None) -> set[str]:
            return {unwrapped_name(p) for p in key_prefixes(module, adapter_name)}

        with mock.patch.object(tuners_utils, "_get_tuner_state_dict_key_prefixes", unwrapped_key_prefixes):
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
