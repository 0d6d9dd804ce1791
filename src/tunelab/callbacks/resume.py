"""Keep the logging step equal to the optimizer step after a resume.

Lightning restores its logger step off by one when a validation at the last batch of an epoch wrote the
checkpoint, so the resumed curves in CSV / W&B would repeat or skip a step label: this callback realigns it
(:func:`tunelab.compat.lightning.realign_logging_step`, which names the Lightning versions) on the first batch
after a restore, once Lightning's own adjustments have run.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from tunelab.compat.lightning import realign_logging_step


class AlignLoggingStep(Callback):
    def __init__(self) -> None:
        self._restored = False

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._restored = True

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._restored:
            realign_logging_step(trainer, pl_module)
        self._restored = False
