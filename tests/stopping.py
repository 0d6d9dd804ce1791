"""Callbacks that end training early: a clean stop after N steps, and a SIGKILL at a chosen point."""

import os
import signal
from io import BytesIO

import torch
from lightning.pytorch import Callback

REAL_TORCH_SAVE = torch.save


class StopAfterSteps(Callback):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


class KillAt(Callback):
    """SIGKILL this process (as an OOM killer or a pre-empted node would) at optimizer step ``step``, at the hook
    ``at``: ``"train_batch_end"``, ``"validation_end"`` (before the checkpoint callbacks, which Lightning runs
    last) or ``"checkpoint_write"`` (half-way through writing the first checkpoint file of that step)."""

    def __init__(self, step: int, at: str = "train_batch_end") -> None:
        self.step, self.at = step, at

    def _kill(self, trainer) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.at == "train_batch_end":
            self._kill(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.at == "validation_end" and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._kill(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.at != "checkpoint_write":
            return
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def torn_save(checkpoint, path, storage_options=None):
            if trainer.global_step == self.step:
                torch.save = half_then_kill
            save(checkpoint, path, storage_options)

        io.save_checkpoint = torn_save


def half_then_kill(obj, file) -> None:
    """``torch.save`` that writes the first half of the file, then SIGKILLs the process."""
    buffer = BytesIO()
    REAL_TORCH_SAVE(obj, buffer)
    data = buffer.getvalue()
    with open(file, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
