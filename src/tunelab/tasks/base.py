"""What every task module shares: the optimizer and schedule over the whole run, and checkpoints that hold
only the trained tensors of a parameter-efficient method."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import LightningModule
from omegaconf import DictConfig

from tunelab.tasks.optim import build_optimizer


class TaskModule(LightningModule):
    """Base of the task modules: ``self.model`` is the adapted backbone, ``self.cfg`` the task config."""

    def __init__(self, model: torch.nn.Module, task_cfg: DictConfig, trains_all_weights: bool) -> None:
        super().__init__()
        self.model, self.cfg = model, task_cfg
        self.trains_all_weights = trains_all_weights
        self.strict_loading = trains_all_weights

    def configure_optimizers(self) -> dict[str, Any]:
        return build_optimizer(self.model, self.cfg.optimizer, self.cfg.scheduler, self.total_training_steps())

    def total_training_steps(self) -> int:
        """Optimizer steps of the whole run, from the data length (never ``estimated_stepping_batches``)."""
        trainer = self.trainer
        per_epoch = math.ceil(trainer.datamodule.num_train_batches() / trainer.accumulate_grad_batches)
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            epochs_steps = per_epoch * trainer.max_epochs
            return min(epochs_steps, trainer.max_steps) if trainer.max_steps > 0 else epochs_steps
        return trainer.max_steps if trainer.max_steps > 0 else per_epoch

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Parameter-efficient methods checkpoint only what trains; the frozen base comes from the config."""
        if self.trains_all_weights:
            return
        trainable = {name for name, param in self.named_parameters() if param.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, param in self.named_parameters() if param.requires_grad}
        missing = sorted(trainable - set(checkpoint["state_dict"]))
        if missing:
            raise RuntimeError(
                f"checkpoint lacks {len(missing)} trainable tensors of this method (e.g. {missing[0]}); "
                "was it written with another method= or model=?"
            )
