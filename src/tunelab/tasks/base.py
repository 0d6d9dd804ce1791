"""What every task module shares: the optimizer and schedule over the whole run, checkpoints that hold only the
trained tensors of a parameter-efficient method, and the validation / test loop around a task's metrics."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from omegaconf import DictConfig

from tunelab.tasks.optim import build_optimizer, unit_scale


class TaskModule(LightningModule):
    """Base of the task modules: ``self.model`` is the adapted backbone, ``self.cfg`` the task config. Validation
    and test run the same evaluation under their own prefix: a subclass defines :meth:`_eval_step` and
    :meth:`_eval_epoch_end` for a stage (``"val"`` or ``"test"``). ``lr_scale(param_name)`` is the method's
    learning-rate scale per parameter (the composition root sets it from the method entry; default 1)."""

    def __init__(self, model: torch.nn.Module, task_cfg: DictConfig, trains_all_weights: bool) -> None:
        super().__init__()
        self.model, self.cfg = model, task_cfg
        self.trains_all_weights = trains_all_weights
        self.strict_loading = trains_all_weights
        self.lr_scale: Callable[[str], float] = unit_scale

    def configure_optimizers(self) -> dict[str, Any]:
        steps = self.total_training_steps()
        return build_optimizer(self.model, self.cfg.optimizer, self.cfg.scheduler, steps, self.lr_scale)

    def total_training_steps(self) -> int:
        """Optimizer steps of the whole run, from the data length (never ``estimated_stepping_batches``)."""
        trainer = self.trainer
        per_epoch = math.ceil(trainer.datamodule.num_train_batches() / trainer.accumulate_grad_batches)
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            epochs_steps = per_epoch * trainer.max_epochs
            return min(epochs_steps, trainer.max_steps) if trainer.max_steps > 0 else epochs_steps
        return trainer.max_steps if trainer.max_steps > 0 else per_epoch

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Lightning's clipping, except under FSDP, whose root clips by the norm over every rank's shards
        (Lightning's FSDP precision refuses ``norm`` clipping: :func:`tunelab.compat.lightning.clip_gradients`)."""
        from tunelab.compat.lightning import clip_gradients

        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def trained_names(self) -> set[str]:
        """State-dict names of the tensors this module trains (as an unwrapped module names them)."""
        from tunelab.strategies import unwrapped_name

        return {unwrapped_name(name) for name, param in self.named_parameters() if param.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Parameter-efficient methods checkpoint only what trains; the frozen base comes from the config."""
        if self.trains_all_weights:
            return
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in self.trained_names()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint that lacks some trained tensor (sharded strategies load the weights themselves
        and hand over the checkpoint without its ``state_dict``)."""
        if "state_dict" not in checkpoint:
            return
        missing = sorted(self.trained_names() - set(checkpoint["state_dict"]))
        if missing:
            raise RuntimeError(
                f"checkpoint lacks {len(missing)} trainable tensors of this method (e.g. {missing[0]}); "
                "was it written with another method= or model=?"
            )

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def log_and_reset(self, stage: str, metrics: torch.nn.ModuleDict) -> None:
        """Log each of ``metrics`` (torchmetrics) over the epoch as ``<stage>/<name>`` (on the progress bar for
        ``val``), then reset them; a metric no batch updated (one that does not apply to this data) is not logged."""
        values = {f"{stage}/{name}": metric.compute() for name, metric in metrics.items() if metric.update_called}
        self.log_dict(values, prog_bar=stage == "val")
        for metric in metrics.values():
            metric.reset()

    def _eval_step(self, stage: str, batch: Any, dataloader_idx: int = 0) -> None:
        """Update the metrics of ``stage`` with one batch of its evaluation dataloader ``dataloader_idx``."""
        raise NotImplementedError

    def _eval_epoch_end(self, stage: str) -> None:
        """Log the metrics of ``stage`` over the epoch's batches under ``<stage>/``, then reset them."""
        raise NotImplementedError
