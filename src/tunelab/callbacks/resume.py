"""Keep the logging step equal to the optimizer step after a resume.

Lightning restores its logger step (``_batches_that_stepped``) one short when a checkpoint was written
after the last batch of an epoch, so the first resumed step repeats the previous step's label in CSV /
W&B curves. With one optimizer under automatic optimization the logger step counts optimizer steps, i.e.
equals ``trainer.global_step`` at every batch start; this callback re-establishes that on the first batch
after a restore (Lightning's own adjustments have run by then).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class AlignLoggingStep(Callback):
    def __init__(self) -> None:
        self._restored = False

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._restored = True

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._restored and pl_module.automatic_optimization and len(trainer.optimizers) == 1:
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
        self._restored = False
