"""A callback that stops training after a fixed number of optimizer steps, like a killed job would."""

from lightning.pytorch import Callback


class StopAfterSteps(Callback):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True
