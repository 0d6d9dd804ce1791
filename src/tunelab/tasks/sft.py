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
Validation (last dataloader, when the split's records carry options, e.g. ``data.format=medqa``): every
multiple-choice question, scored two ways (:mod:`tunelab.metrics.mcq`): ``mcq_acc``, the letter its greedy
answer (``task.generation.max_new_tokens``) states, unparsed ones wrong and counted in ``mcq_unparsed``; and
``mcq_acc_ll`` / ``mcq_acc_ll_norm``, the option with the highest log-probability (summed / per character of
its response). The scored continuation of option j is exactly what training supervises had j been right: the
tokens after the prompt (chat template with the generation prompt) of
``template(prompt + [assistant: "<letter_j>. <text_j>"])``, i.e. the response and the template's end-of-turn
tokens, truncated to ``data.max_length`` like a training example (:mod:`tunelab.data.choices`).
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
from tunelab.metrics.mcq import MultipleChoiceMetrics, sequence_logprobs
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
        metrics = {
            "loss": MeanMetric(),
            "token_acc": MeanMetric(),
            "text": GenerationMetrics(prefix=f"{stage}/"),
            "mcq": MultipleChoiceMetrics(prefix=f"{stage}/"),
        }
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
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits aligned with ``input_ids`` (soft-prompt methods prepend virtual positions: dropped here). A packed
        batch has ``position_ids`` restarting per example and no attention mask (see ``PackedCollator``); without a
        KV cache, from which transformers would otherwise build a plain causal mask across the examples. Its
        ``segment_lengths`` go to the model when it runs segment attention (one attention call per example).
        ``logits_to_keep`` = N > 0: only the last N positions' logits (transformers' ``logits_to_keep``; N at most
        ``input_ids``' length, so none of them is virtual), which spares the vocabulary-wide logits of the rest."""
        extra: dict[str, Any] = {"position_ids": position_ids, "use_cache": False} if position_ids is not None else {}
        if segment_lengths is not None and self.segment_attention:
            extra["segment_lengths"] = segment_lengths
        if logits_to_keep:
            extra["logits_to_keep"] = logits_to_keep
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
        virtual = logits.shape[1] - (logits_to_keep or input_ids.shape[1])
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

    def choice_logprobs(self, batch: dict[str, Any]) -> torch.Tensor:
        """Summed log-probability of each option row's supervised tokens (``ChoiceCollator`` rows) [rows]. The rows
        are right-padded, so every supervised token lies after the earliest first one: logits are computed from the
        position before it on (long prompts, short options: most of the vocabulary-wide logits are never needed)."""
        scores = []
        for rows in batch["choice_rows"]:
            labels = rows["labels"]
            supervised = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()
            keep = labels.shape[1] - int(supervised[0]) if len(supervised) else 1
            logits = self(rows["input_ids"], rows["attention_mask"], logits_to_keep=keep)
            scores.append(sequence_logprobs(logits, labels[:, -keep:]))
        return torch.cat(scores)

    def _generate(self, batch: dict[str, Any]) -> list[str]:
        return generate_answers(
            self.model,
            self.tokenizer,
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            self.cfg.generation.max_new_tokens,
        )

    def _eval_step(self, stage: str, batch: dict[str, Any], dataloader_idx: int = 0) -> None:
        """One batch of the loss loader (``labels``), the multiple-choice loader (``choice_rows``) or the
        generation loader (prompts only)."""
        metrics = self.stage_metrics[stage]
        if "labels" in batch:
            logits = self(batch["input_ids"], batch["attention_mask"])
            loss, count = causal_lm_loss(logits, batch["labels"])
            metrics["loss"].update(loss, weight=count)
            metrics["token_acc"].update(token_accuracy(logits, batch["labels"]), weight=count)
        elif "choice_rows" in batch:
            logprobs = self.choice_logprobs(batch)
            predictions = self._generate(batch)
            metrics["mcq"].update(predictions, batch["options"], batch["answers"], logprobs, batch["choice_chars"])
        else:
            predictions = self._generate(batch)
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
        values.update(metrics["mcq"].compute(lambda counts: self.trainer.strategy.reduce(counts, reduce_op="sum")))
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
