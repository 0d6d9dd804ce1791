"""Causal-LM supervised fine-tuning (task=sft).

Optimizes: the mean next-token cross-entropy over response tokens only (prompt and padding labels are
-100), ``loss = sum_t CE(logits[t], labels[t + 1]) / #supervised tokens``, the mean taken over the optimizer
step's whole batch (every accumulated micro-batch on every rank, counted by the sampler): batch 8, batch 1 x
accumulation 8 and 2 ranks x batch 4 optimize the same loss. ``train/loss`` is logged once per optimizer step.
Validation (dataloader 0): the same loss averaged over all supervised tokens of the split, its perplexity
``exp(loss)`` and next-token accuracy. Validation (dataloader 1, optional): greedy answers to the first
``task.generation.num_samples`` prompts, scored with SacreBLEU and ROUGE-1/2/L/Lsum against references;
with ``task.generation.labels`` set, also the accuracy / macro-F1 of the label each answer states on its
``"<label_field>: <label>"`` line (classification and generation in one answer, e.g. sentiment + analysis).
Test mirrors validation under the ``test/`` prefix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics import MeanMetric

from tunelab.data.datamodule import SFTDataModule
from tunelab.data.tokenization import IGNORE_INDEX
from tunelab.generation import generate_answers
from tunelab.metrics.text import GeneratedLabelMetrics, GenerationMetrics, token_accuracy
from tunelab.models.segment_attention import runs_segment_attention
from tunelab.tasks.base import TaskModule
from tunelab.tasks.objective import OBJECTIVES, BuildContext, Objective


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]`` and the supervised-token count.

    The labels are shifted (left, padded with -100) rather than the logits, so the ``(batch, seq, vocab)`` logits
    are flattened as a view instead of copied: the largest activation of a small model is not duplicated."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    count = (targets != IGNORE_INDEX).sum()
    summed = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return summed / count.clamp(min=1), count


class SFTModule(TaskModule):
    def __init__(self, model: torch.nn.Module, tokenizer: Any, task_cfg: DictConfig, trains_all_weights: bool):
        super().__init__(model, task_cfg, trains_all_weights)
        self.tokenizer = tokenizer
        self.segment_attention = runs_segment_attention(model)
        self.stage_metrics = torch.nn.ModuleDict({stage: self._stage_metrics(stage) for stage in ("val", "test")})
        self.test_samples: list[dict[str, str]] = []
        self._step_loss: torch.Tensor | float = 0.0  # this rank's part of the current optimizer step's loss

    def _stage_metrics(self, stage: str) -> torch.nn.ModuleDict:
        metrics = {"loss": MeanMetric(), "token_acc": MeanMetric(), "text": GenerationMetrics(prefix=f"{stage}/")}
        if self.cfg.generation.get("labels"):
            labels, field = self.cfg.generation.labels, self.cfg.generation.label_field
            metrics["labels"] = GeneratedLabelMetrics(labels, field, prefix=f"{stage}/")
        return torch.nn.ModuleDict(metrics)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        segment_lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """Logits aligned with ``input_ids`` (soft-prompt methods prepend virtual positions: dropped here). A packed
        batch has ``position_ids`` restarting per example and no attention mask (see ``PackedCollator``); without a
        KV cache, from which transformers would otherwise build a plain causal mask across the examples. Its
        ``segment_lengths`` go to the model when it runs segment attention (one attention call per example)."""
        packed = {"position_ids": position_ids, "use_cache": False} if position_ids is not None else {}
        if segment_lengths is not None and self.segment_attention:
            packed["segment_lengths"] = segment_lengths
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **packed).logits
        virtual = logits.shape[1] - input_ids.shape[1]
        return logits[:, virtual:] if virtual else logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """This micro-batch's part of the step's loss: its token mean weighted by its share of the step's tokens,
        times accumulation x ranks, which Lightning (1 / accumulation) and DDP (rank mean) divide back out."""
        logits = self(
            batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"), batch.get("segment_lengths")
        )
        loss, count = causal_lm_loss(logits, batch["labels"])
        splits = self.trainer.accumulate_grad_batches * self.trainer.world_size
        # without the sampler's token total (a data module without loss_sizes): the mean of micro-batch means
        share = count / batch["global_batch_size"] if "global_batch_size" in batch else 1.0 / splits
        self._step_loss = self._step_loss + loss.detach() * share
        return loss * share * splits

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log ``train/loss`` (the token mean over the step's global batch) once the step's last micro-batch ran."""
        trainer = self.trainer
        if (batch_idx + 1) % trainer.accumulate_grad_batches and batch_idx + 1 != trainer.num_training_batches:
            return
        step_loss = trainer.strategy.reduce(self._step_loss, reduce_op="sum")
        self.log("train/loss", step_loss, prog_bar=True, batch_size=1)
        self._step_loss = 0.0

    def _eval_step(self, stage: str, batch: dict[str, Any], dataloader_idx: int = 0) -> None:
        metrics = self.stage_metrics[stage]
        if dataloader_idx == 0:
            logits = self(batch["input_ids"], batch["attention_mask"])
            loss, count = causal_lm_loss(logits, batch["labels"])
            metrics["loss"].update(loss, weight=count)
            metrics["token_acc"].update(token_accuracy(logits, batch["labels"]), weight=count)
        else:
            predictions = generate_answers(
                self.model,
                self.tokenizer,
                batch["prompt_input_ids"],
                batch["prompt_attention_mask"],
                self.cfg.generation.max_new_tokens,
            )
            metrics["text"].update(predictions, batch["references"])
            if "labels" in metrics:
                metrics["labels"].update(predictions, batch["references"])
            if stage == "test":
                self.test_samples += [
                    {"question": q, "prediction": p, "reference": r}
                    for q, p, r in zip(batch["questions"], predictions, batch["references"], strict=True)
                ]

    def _eval_epoch_end(self, stage: str) -> None:
        metrics = self.stage_metrics[stage]
        loss = metrics["loss"].compute()
        values = {
            f"{stage}/loss": loss,
            f"{stage}/ppl": torch.exp(loss.clamp(max=50)),
            f"{stage}/token_acc": metrics["token_acc"].compute(),
        }
        if self.cfg.generation.num_samples:
            values.update(metrics["text"].compute())
            values.update(metrics["labels"].compute() if "labels" in metrics else {})
        self.log_dict(values, prog_bar=stage == "val", sync_dist=False)
        for metric in metrics.values():
            metric.reset()


def sft_datamodule(context: BuildContext) -> SFTDataModule:
    cfg = context.cfg
    return SFTDataModule(cfg.data, context.tokenizer, cfg.paths.cache_dir, cfg.task.generation.num_samples)


def build_sft(context: BuildContext) -> tuple[SFTDataModule, SFTModule]:
    module = SFTModule(context.model, context.tokenizer, context.cfg.task, context.method.trains_all_weights)
    return sft_datamodule(context), module


OBJECTIVES.register(Objective(name="sft", build=build_sft, packs=True))
