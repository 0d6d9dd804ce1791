"""What reward modelling and DPO share: a loss per preference pair, a reward for each of its two replies, and the
same pair statistics for training, validation and test.

Batches hold 2B rows, the B chosen replies then the B rejected ones
(:class:`tunelab.data.preference.PreferenceCollator`).
Logged per stage: ``loss`` and ``rewards/{chosen,rejected}`` (mean reward of each reply), ``rewards/accuracy``
(share of pairs with ``r_chosen > r_rejected``; ties count as wrong) and ``rewards/margin`` (mean ``r_c - r_r``),
plus the statistics a subclass names in ``extra_statistics``.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torchmetrics import MeanMetric

from tunelab.data.tokenization import IGNORE_INDEX
from tunelab.tasks.base import TaskModule
from tunelab.tasks.preference_losses import sequence_logps

PREFERENCE_DATA = "data=arith_prefs or data=preference"  # data configs of kind preference, for refusals
PAIR_STATISTICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")
LOGPS_STATISTICS = ("logps/chosen", "logps/rejected", "logps/accuracy")


def pair_statistics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean chosen / rejected reward, accuracy ``mean(chosen > rejected)`` and margin ``mean(chosen - rejected)``."""
    values = (chosen.mean(), rejected.mean(), (chosen > rejected).float().mean(), (chosen - rejected).mean())
    return dict(zip(PAIR_STATISTICS, values, strict=True))


def logps_statistics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean chosen / rejected reply log-prob under the policy, and the share of pairs it ranks right
    (``mean(chosen > rejected)``)."""
    values = (chosen.detach().mean(), rejected.detach().mean(), (chosen > rejected).float().mean())
    return dict(zip(LOGPS_STATISTICS, values, strict=True))


def reply_logps(logits: torch.Tensor, batch: dict[str, torch.Tensor], average: bool) -> torch.Tensor:
    """``log p(reply | prompt)`` of every row [2B] from the ``logits`` of a forward over the batch (summed over
    reply tokens, or their mean if ``average``; positions a soft prompt prepends are cut off)."""
    return sequence_logps(logits[:, -batch["input_ids"].shape[1] :], batch["labels"], average=average)


def reply_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Supervised reply tokens of every row [2B] (at least 1: a reply's mean log-prob is ``sum / length``)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) halves of a [2B] per-row tensor."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


class PairwiseModule(TaskModule):
    """Subclasses define :meth:`pair_outputs`; this class trains on their mean loss and logs the statistics."""

    def __init__(
        self,
        model: torch.nn.Module,
        task_cfg: DictConfig,
        trains_all_weights: bool,
        extra_statistics: tuple[str, ...] = (),
    ) -> None:
        super().__init__(model, task_cfg, trains_all_weights)
        names = ("loss", *PAIR_STATISTICS, *extra_statistics)
        self.eval_metrics = torch.nn.ModuleDict(
            {stage: torch.nn.ModuleDict({self._key(n): MeanMetric() for n in names}) for stage in ("val", "test")}
        )

    @staticmethod
    def _key(name: str) -> str:
        return name.replace("/", "__")  # module names cannot hold "/" or "."

    def pair_outputs(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(per-pair losses [B], statistics): :func:`pair_statistics` plus the subclass's ``extra_statistics``."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses, statistics = self.pair_outputs(batch, "train")
        loss = losses.mean()
        pairs = losses.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=pairs)
        self.log_dict({f"train/{k}": v for k, v in statistics.items()}, batch_size=pairs)
        return loss

    def _eval_step(self, stage: str, batch: dict[str, torch.Tensor], dataloader_idx: int = 0) -> None:
        with torch.no_grad():
            losses, statistics = self.pair_outputs(batch, stage)
        values = {"loss": losses.mean(), **statistics}
        metrics = self.eval_metrics[stage]
        for name, value in values.items():
            metrics[self._key(name)].update(value, weight=losses.shape[0])

    def _eval_epoch_end(self, stage: str) -> None:
        metrics = self.eval_metrics[stage]
        self.log_dict({f"{stage}/{k.replace('__', '/')}": m.compute() for k, m in metrics.items()}, prog_bar=False)
        for metric in metrics.values():
            metric.reset()
