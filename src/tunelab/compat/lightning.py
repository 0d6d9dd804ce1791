"""Workarounds for Lightning (checked on lightning 2.6.6 with torch 2.13.0; pyproject allows lightning 2.6.x).

Each class and function names the Lightning behaviour it works around and the test that fails once Lightning
no longer shows it (then it can go): ``tests/test_precision.py`` for :class:`BF16MixedPrecision`,
``tests/test_compat.py`` for the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch.optim import Optimizer

from tunelab.compat.torch import load_checkpoint


class BF16MixedPrecision(MixedPrecision):
    """Lightning's ``bf16-mixed`` autocast plugin that clips gradients with any optimizer, fused ones included.

    **bf16-mixed refuses to clip with a fused optimizer** (lightning 2.6.x, ``MixedPrecision.clip_gradients``):
    the AMP plugin raises "does not allow for gradient clipping because it performs unscaling of gradients
    internally" for every optimizer with ``_step_supports_amp_scaling`` (torch's fused AdamW), although under
    ``bf16-mixed`` there is no grad scaler and the gradients are never scaled. This plugin clips as the plain
    precision plugin does when no scaler exists. Under ``16-mixed`` the refusal is real (the plugin then skips
    ``scaler.unscale_`` for such optimizers, so clipping would see scaled gradients): that combination is refused
    at config time instead. ``tests/test_precision.py::test_lightning_still_refuses_fused_clipping_under_bf16``
    fails once Lightning stops refusing, and this class can go.
    """

    def __init__(self, device: str) -> None:
        super().__init__("bf16-mixed", device)

    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        """The base plugin's clipping: bf16 gradients carry no loss scale, so nothing needs unscaling first."""
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)


def clip_gradients(
    module: LightningModule, optimizer: Optimizer, clip_val: float | None, algorithm: str | None
) -> None:
    """``module.clip_gradients``, except that under FSDP the root module clips by the norm over every rank's shards.

    **FSDP refuses norm clipping** (lightning 2.6.6, ``FSDPPrecision.clip_grad_by_norm``, open issue
    Lightning-AI/pytorch-lightning#19235): the precision plugin has no reference to the FSDP root, whose
    ``clip_grad_norm_`` is the only correct norm over sharded gradients, so it raises "gradient_clip_algorithm='norm'
    is currently not supported". ``test_lightning_fsdp_still_refuses_norm_clipping`` fails once it clips, and this
    function can go.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = module.trainer.strategy.model
    clips_norm = clip_val and algorithm in (None, "norm")
    if isinstance(root, FullyShardedDataParallel) and clips_norm:
        root.clip_grad_norm_(clip_val)
        return
    module.clip_gradients(optimizer, clip_val, algorithm)


def realign_logging_step(trainer: Trainer, module: LightningModule) -> None:
    """Set the logger step to the optimizer step; call on the first training batch after a checkpoint restore.

    **The logger step comes back off by one** (lightning 2.6.6, ``fit_loop.epoch_loop._batches_that_stepped``):
    resumed from a checkpoint that a validation wrote at the last batch of an epoch, Lightning restores the step
    its loggers label rows with one short (validation every ``val_check_interval`` steps and a checkpoint every
    step, as ``tests/test_resume.py`` runs) or one over (Lightning's default validation and checkpoint per epoch),
    so the resumed curves in CSV / W&B repeat or skip a step label. With one optimizer under automatic
    optimization the logger step counts optimizer steps, i.e. equals ``trainer.global_step`` at every batch start
    (Lightning's own adjustments have run by then). ``test_lightning_still_restores_the_logging_step_off_by_one``
    fails once Lightning restores it, and this function (with ``tunelab.callbacks.resume``) can go.
    """
    if module.automatic_optimization and len(trainer.optimizers) == 1:
        trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step


@contextmanager
def full_state_dict(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """FSDP state dicts (model and optimizer) of ``module`` gathered whole on rank 0, offloaded to host memory
    unless ``device`` (the compute device) is the CPU.

    **Full state dicts crash CPU process groups** (lightning 2.6.6 ``_get_full_state_dict_context`` with torch 2.13.0
    FSDP): Lightning always asks for ``offload_to_cpu=True``; on a CPU compute device torch's
    ``FlatParamHandle.to_cpu`` then "moves" the gathered flat parameter to where it already is and frees it, and
    rank 0 reads the freed memory (with 2 or more ranks: a segmentation fault under ``use_orig_params=True``, as
    ``trainer=fsdp`` runs, else "out of bounds for storage of size 0"). GPUs still offload, as Lightning does.
    ``test_lightning_full_state_dict_still_crashes_a_cpu_group`` fails once that gather survives, and the strategy
    overrides that use this can go.
    """
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    offload_to_cpu = device.type != "cpu"
    with FSDP.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=offload_to_cpu, rank0_only=True),
        FullOptimStateDictConfig(offload_to_cpu=offload_to_cpu, rank0_only=True),
    ):
        yield


@contextmanager
def eager_full_checkpoints() -> Iterator[None]:
    """Make Lightning's FSDP strategy read a full checkpoint file with ``torch.load`` instead of lazily.

    **The lazy loader fails on untyped storages** (lightning 2.6.6 ``lightning.fabric.utilities.load._lazy_load``
    with torch 2.13.0): it builds ``TypedStorage(dtype=cls().dtype)`` for every storage, and torch saves a tensor
    whose dtype has no legacy typed storage (e.g. uint32: the NumPy RNG key array that
    ``tunelab.callbacks.rng`` checkpoints) with an ``UntypedStorage``, which has no ``dtype``: AttributeError.
    ``test_lightning_lazy_load_still_fails_on_untyped_storages`` fails once it loads them. The lazy loader is also
    a plain unpickler (it calls any global the file names), while the eager load here,
    :func:`tunelab.compat.torch.load_checkpoint`, refuses a file that would run code: that part stays.
    """
    from unittest import mock

    import lightning.pytorch.strategies.fsdp as lightning_fsdp

    with mock.patch.object(lightning_fsdp, "_lazy_load", load_checkpoint):
        yield


class TunelabFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP, changed where Lightning 2.6.6 fails tunelab's runs.

    - **Later stages unwrap the root** (``FSDPStrategy._setup_model``, Lightning-AI/pytorch-lightning#19015):
      Lightning re-runs setup per stage (validate -> fit -> test) and, finding the blocks already wrapped, leaves
      the root unwrapped, its own parameters (embeddings, head) still flat shards. Here the LightningModule is
      wrapped once; later stages reuse that root.
    - **No CPU compute device** (``FSDPStrategy._setup_model``): Lightning passes the root device's CUDA index,
      ``None`` on CPU, and torch's FSDP then refuses ("FSDP needs a non-CPU accelerator device"); here it is given
      the CPU itself, so FSDP runs on gloo processes.
    - Full state dicts are gathered by :func:`full_state_dict` and full checkpoint files read by
      :func:`eager_full_checkpoints` (see those for the Lightning behaviour).

    ``test_lightning_fsdp_still_unwraps_the_root_at_a_later_stage`` and ``test_lightning_fsdp_still_refuses_the_cpu``
    fail once Lightning no longer does this, and the matching part can go.
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
        with eager_full_checkpoints():
            return super().load_checkpoint(checkpoint_path, weights_only)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        with full_state_dict(self.model, self.root_device):
            return self.model.state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # unwrap LightningOptimizer
        with full_state_dict(self.model, self.root_device):
            state = FSDP.optim_state_dict(self.model, optimizer)
        if self.global_rank == 0:
            return FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state
