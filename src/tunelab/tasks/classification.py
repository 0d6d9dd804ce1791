"""Sequence classification (task=classification) with a head on an encoder or a decoder backbone.

Optimizes: cross-entropy of the head's logits over the C classes, optionally class-weighted,
``loss = sum_i w[y_i] * CE_i / sum_i w[y_i]``. ``task.class_weights``: ``null`` (all 1), ``balanced``
(``w_c = N / (C * n_c)`` from the training split's counts, as scikit-learn's ``compute_class_weight``) or a
list of C numbers. Encoders pool as their head does ([CLS] + pooler for BERT); decoders
(``*ForSequenceClassification`` of Llama-like models) score the last non-pad token.
Validation / test: loss, accuracy, macro-F1, per-class F1 (``val/f1_<label>``) and the confusion matrix
(rows: true class, columns: predicted), kept in :attr:`confusion` and, with W&B on, logged as a table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from tunelab.data.datamodule import ClassificationDataModule
from tunelab.errors import ConfigError
from tunelab.tasks.base import TaskModule
from tunelab.tasks.objective import OBJECTIVES, BuildContext, Objective, labeled_head


def class_weights(setting: Any, counts: Sequence[int]) -> torch.Tensor | None:
    """Per-class loss weights from ``task.class_weights`` (see module docstring) and training counts."""
    if setting is None:
        return None
    if setting == "balanced":
        if min(counts) == 0:
            raise ConfigError(f"task.class_weights=balanced: a class has no training examples (counts {list(counts)})")
        total = sum(counts)
        return torch.tensor([total / (len(counts) * n) for n in counts], dtype=torch.float32)
    if isinstance(setting, (list, tuple, ListConfig)) and len(setting) == len(counts):
        return torch.tensor([float(w) for w in setting], dtype=torch.float32)
    raise ConfigError(f"task.class_weights={setting!r}: use null, balanced, or a list of {len(counts)} numbers")


class ClassificationModule(TaskModule):
    def __init__(
        self, model: torch.nn.Module, task_cfg: DictConfig, labels: Sequence[str], trains_all_weights: bool
    ) -> None:
        super().__init__(model, task_cfg, trains_all_weights)
        self.labels = list(labels)
        classes = len(self.labels)
        self.stage_metrics = torch.nn.ModuleDict(
            {
                stage: MetricCollection(
                    {
                        "acc": MulticlassAccuracy(classes, average="micro"),
                        "macro_f1": MulticlassF1Score(classes, average="macro"),
                        "class_f1": MulticlassF1Score(classes, average="none"),
                        "confusion": MulticlassConfusionMatrix(classes),
                    }
                )
                for stage in ("val", "test")
            }
        )
        self.stage_loss = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})
        self.register_buffer("class_weight", torch.ones(classes), persistent=False)
        self.confusion: dict[str, list[list[int]]] = {}

    def setup(self, stage: str) -> None:
        counts = self.trainer.datamodule.label_counts() if self.trainer is not None else [1] * len(self.labels)
        weights = class_weights(self.cfg.class_weights, counts)
        if weights is not None:
            self.class_weight.copy_(weights)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits, shape (batch, C)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, weight=self.class_weight)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def _eval_step(self, stage: str, batch: dict[str, torch.Tensor], dataloader_idx: int = 0) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        self.stage_loss[stage].update(self.loss(logits, batch["labels"]), weight=batch["labels"].shape[0])
        self.stage_metrics[stage].update(logits.argmax(-1), batch["labels"])

    def _eval_epoch_end(self, stage: str) -> None:
        computed = self.stage_metrics[stage].compute()
        values = {
            f"{stage}/loss": self.stage_loss[stage].compute(),
            f"{stage}/acc": computed["acc"],
            f"{stage}/macro_f1": computed["macro_f1"],
        }
        values.update({f"{stage}/f1_{label}": f1 for label, f1 in zip(self.labels, computed["class_f1"], strict=True)})
        self.log_dict(values, prog_bar=stage == "val", sync_dist=False)
        self.confusion[stage] = computed["confusion"].tolist()
        self._log_confusion_table(stage)
        self.stage_metrics[stage].reset()
        self.stage_loss[stage].reset()

    def _log_confusion_table(self, stage: str) -> None:
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger":
                rows = [[true, *counts] for true, counts in zip(self.labels, self.confusion[stage], strict=True)]
                logger.log_table(f"{stage}/confusion_matrix", columns=["true \\ predicted", *self.labels], data=rows)

    def summary(self) -> dict[str, Any]:
        """Confusion matrices of the last validation and test passes, for metrics.json."""
        return {"labels": self.labels, **{f"{stage}/confusion_matrix": m for stage, m in self.confusion.items()}}


def classification_datamodule(context: BuildContext) -> ClassificationDataModule:
    return ClassificationDataModule(context.cfg.data, context.tokenizer, context.cfg.paths.cache_dir)


def build_classification(context: BuildContext) -> tuple[ClassificationDataModule, ClassificationModule]:
    datamodule = classification_datamodule(context)
    module = ClassificationModule(context.model, context.cfg.task, datamodule.labels, context.method.trains_all_weights)
    return datamodule, module


OBJECTIVES.register(Objective(name="classification", build=build_classification, head=labeled_head))
