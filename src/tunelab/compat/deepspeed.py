"""Workarounds for DeepSpeed and for Lightning's DeepSpeed strategy (checked on deepspeed 0.19.8 with lightning
2.6.6, both pinned in pyproject).

Each class names the behaviour it works around and the test in ``tests/test_compat.py`` that fails once the
behaviour is gone (then that part can go).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from tunelab.compat.lightning import ReportsLostRanks
from tunelab.compat.torch import load_checkpoint

# the hook tables Lightning's remove_module_hooks empties, and the tables keyed by the same hook ids
HOOK_TABLES = (
    "_backward_hooks",
    "_forward_hooks",
    "_forward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)
HOOK_FLAG_TABLES = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def deepspeed_checkpoint_globals() -> tuple[Any, ...]:
    """The classes DeepSpeed's own checkpoint files hold besides tensors and plain values (deepspeed 0.19.8,
    ZeRO-2 and ZeRO-3, found with ``torch.serialization.get_unsafe_globals_in_checkpoint``): the ZeRO stage enum,
    the loss scaler and the fragment addresses of the optimizer state."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (ZeroStageEnum, LossScaler, fragment_address)


@contextmanager
def weights_only_engine_loads() -> Iterator[None]:
    """Inside this block DeepSpeed reads its checkpoint files as data only.

    **DeepSpeed unpickles its checkpoint files with ``weights_only=False``** (deepspeed 0.19.8
    ``TorchCheckpointEngine.load``), so resuming a ``trainer=deepspeed_*`` run from a folder someone sent you
    could run any code its ``.pt`` files name. Here those loads go through
    :func:`tunelab.compat.torch.load_checkpoint`, which allows DeepSpeed's own classes
    (:func:`deepspeed_checkpoint_globals`) and refuses anything else in one sentence.
    ``test_deepspeed_still_loads_its_checkpoints_with_weights_only_false`` fails once DeepSpeed loads weights
    only, and this can go.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    allowed = deepspeed_checkpoint_globals()

    def load(engine: Any, path: str, map_location: Any = None) -> Any:
        return load_checkpoint(path, map_location=map_location, safe_globals=allowed)

    with mock.patch.object(TorchCheckpointEngine, "load", load):
        yield


def hook_owner(hook: Any) -> str:
    """The module that defines ``hook``'s function (through ``functools.partial`` and torch's ``_WrappedHook``)."""
    for wrapped in ("hook", "func"):
        hook = getattr(hook, wrapped, hook)
    return getattr(hook, "__module__", None) or ""


def remove_deepspeed_hooks(model: torch.nn.Module) -> None:
    """Remove from every module of ``model`` the hooks DeepSpeed registered (an earlier engine's), and only those."""
    for module in model.modules():
        for table in HOOK_TABLES:
            hooks = getattr(module, table)
            for key in [key for key, hook in hooks.items() if hook_owner(hook).startswith("deepspeed")]:
                del hooks[key]
                for flags in HOOK_FLAG_TABLES:
                    getattr(module, flags).pop(key, None)
        if not module._backward_hooks:
            module._is_full_backward_hook = None


class TunelabDeepSpeedStrategy(ReportsLostRanks, DeepSpeedStrategy):
    """Lightning's DeepSpeed across the stages of one Trainer (validate -> fit -> test), a lost rank reported by
    :class:`tunelab.compat.lightning.LostRankLauncher`.

    - **A second ZeRO-3 engine on the same module breaks its hooks** (deepspeed 0.19.8): the engine of an
      evaluation stage leaves its parameter-gathering hooks on every module, and the training engine Lightning
      builds next adds its own (unlike its inference setup, Lightning's ``_initialize_deepspeed_train`` removes
      none), so training can fail with "pop from an empty deque" (it does after an evaluation of one batch). The
      evaluation engine is destroyed before the training engine is built.
    - **A ZeRO-3 inference engine cannot load a training checkpoint** (deepspeed 0.19.8, deepspeedai/DeepSpeed#7272):
      its ``DeepSpeedZeRoOffload`` lacks ``_restore_from_bit16_weights``, so testing the best checkpoint after
      fitting fails. Evaluation after fitting reuses the training engine.
    - **DeepSpeed's checkpoint files are unpickled with code allowed**: read as data here
      (:func:`weights_only_engine_loads`).
    - **Evaluation removes the model's own hooks** (lightning 2.6.6 ``_initialize_deepspeed_inference``, every ZeRO
      stage): before building an inference engine Lightning's ``remove_module_hooks`` empties every module's hook
      tables, meant for an earlier engine's hooks, so the forward hooks that add tunelab's in-house branches
      (``method=adapter|mam|unipelt``, :func:`tunelab.methods.inhouse.attach`) are gone from then on: an evaluation
      before fitting scores the base model, and fitting then trains no branch (``method=adapter`` fails with
      DeepSpeed's "loss must be a scalar tensor"; mam and unipelt silently train their prefix alone). Here that call
      removes DeepSpeed's own hooks only (:func:`remove_deepspeed_hooks`); the model's stay, ahead of the engine's,
      as when fitting comes first.

    ``test_deepspeed_zero3_still_breaks_under_a_second_engine``,
    ``test_deepspeed_zero3_inference_engine_still_cannot_load_a_training_checkpoint`` and
    ``test_lightning_deepspeed_still_removes_the_models_hooks_for_evaluation`` fail once DeepSpeed or Lightning no
    longer does this, and the matching override can go.
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
        import lightning.pytorch.strategies.deepspeed as lightning_deepspeed

        with mock.patch.object(lightning_deepspeed, "remove_module_hooks", remove_deepspeed_hooks):
            super()._initialize_deepspeed_inference(model)
        self._inference_engine = self.model

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load, with DeepSpeed's file reads as data only (:func:`weights_only_engine_loads`)."""
        with weights_only_engine_loads():
            return super().load_checkpoint(checkpoint_path, weights_only)


class CPUDeepSpeedStrategy(TunelabDeepSpeedStrategy):
    """DeepSpeed over CPU processes: the same engine, without Lightning's CUDA-only checks.

    **Lightning allows DeepSpeed on CUDA only** (lightning 2.6.6 ``DeepSpeedStrategy``): ``setup_environment``
    refuses any other accelerator ("The DeepSpeed strategy is only supported on CUDA GPUs") and
    ``setup_distributed`` checks that each process's CUDA index equals its local rank, although DeepSpeed itself
    runs on CPU processes (gloo). Here the root device carries the local rank as its index, which DeepSpeed reads as
    the process's device rank; tensors on it are plain CPU tensors. ``test_lightning_deepspeed_still_refuses_the_cpu``
    fails once Lightning runs DeepSpeed on CPU, and this class can go.
    """

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
