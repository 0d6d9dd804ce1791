"""A user's own method and objective, outside ``src/``: what ``plugins=[tests.plugins.toy]`` registers.

- ``method=toy_norm`` (norm tuning): only the RMSNorm / LayerNorm gains train.
- ``task=toy_lm``: next-token cross-entropy on the response tokens (prompt masked), logged as ``train/loss`` and
  ``val/loss`` / ``test/loss``; nothing else (no generation).

tests/test_plugins.py trains them through ``python train.py``; no file under ``src/`` names either.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torchmetrics import MeanMetric

from tunelab.data.datamodule import SFTDataModule
from tunelab.methods.spec import METHODS, Method
from tunelab.tasks.base import TaskModule
from tunelab.tasks.objective import OBJECTIVES, BuildContext, Objective
from tunelab.tasks.sft import causal_lm_loss


def adapt_toy_norm(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Freeze everything but the parameters of modules whose class name ends in ``Norm``."""
    model.requires_grad_(False)
    for module in model.modules():
        if type(module).__name__.endswith("Norm"):
            module.requires_grad_(True)
    return model


class ToyLMModule(TaskModule):
    def __init__(self, model: torch.nn.Module, task_cfg: DictConfig, trains_all_weights: bool) -> None:
        super().__init__(model, task_cfg, trains_all_weights)
        self.losses = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return causal_lm_loss(logits, batch["labels"])[0]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, batch_size=batch["input_ids"].shape[0])
        return loss

    def _eval_step(self, stage: str, batch: dict[str, Any], dataloader_idx: int = 0) -> None:
        self.losses[stage].update(self.loss(batch), batch["input_ids"].shape[0])

    def _eval_epoch_end(self, stage: str) -> None:
        self.log(f"{stage}/loss", self.losses[stage].compute())
        self.losses[stage].reset()


def build_toy_lm(context: BuildContext) -> tuple[SFTDataModule, ToyLMModule]:
    cfg = context.cfg
    datamodule = SFTDataModule(cfg.data, context.tokenizer, cfg.paths.cache_dir, 0)
    return datamodule, ToyLMModule(context.model, cfg.task, context.method.trains_all_weights)


METHODS.register(Method(name="toy_norm", adapt=adapt_toy_norm))
OBJECTIVES.register(Objective(name="toy_lm", build=build_toy_lm))
