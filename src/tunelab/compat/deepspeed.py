"""Workarounds for DeepSpeed and for Lightning's DeepSpeed strategy (checked on deepspeed 0.19.8 with lightning
2.6.6, both pinned in pyproject).

Each class names the behaviour it works around and the test in ``tests/test_compat.py`` that fails once the
behaviour is gone (then that part can go).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class TunelabDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed across the stages of one Trainer (validate -> fit -> test).

    - **A second ZeRO-3 engine on the same module breaks its hooks** (deepspeed 0.19.8): the engine of an
      evaluation stage leaves its parameter-gathering hooks on every module, and the training engine Lightning
      builds next adds its own (unlike its inference setup, Lightning's ``_initialize_deepspeed_train`` removes
      none), so training can fail with "pop from an empty deque" (it does after an evaluation of one batch). The
      evaluation engine is destroyed before the training engine is built.
    - **A ZeRO-3 inference engine cannot load a training checkpoint** (deepspeed 0.19.8, deepspeedai/DeepSpeed#7272):
      its ``DeepSpeedZeRoOffload`` lacks ``_restore_from_bit16_weights``, so testing the best checkpoint after
      fitting fails. Evaluation after fitting reuses the training engine.

    ``test_deepspeed_zero3_still_breaks_under_a_second_engine`` and
    ``test_deepspeed_zero3_inference_engine_still_cannot_load_a_training_checkpoint`` fail once DeepSpeed no
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
        super()._initialize_deepspeed_inference(model)
        self._inference_engine = self.model


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
