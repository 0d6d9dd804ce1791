"""What the reference-free preference objectives share (ORPO, SimPO, CPO): one forward of the policy over the
pairs, each reply's summed log-prob ``log pi(y|x)`` and its length ``|y|`` (supervised reply tokens), and no
reference model at all (no adapter switched off, no frozen copy, no cached table): half the forwards of DPO, and
with ``method=full`` half the weights held.

Logged per stage, besides the loss and the pair statistics of the objective's implicit rewards
(:mod:`tunelab.tasks.pairwise`): ``logps/chosen``, ``logps/rejected`` and ``logps/accuracy``, the policy's own
ranking of the pairs by summed log-probs (as DPO's with ``average_logps=false``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from omegaconf import DictConfig

from tunelab.data.datamodule import PreferenceDataModule
from tunelab.errors import ConfigError
from tunelab.methods.spec import Method
from tunelab.tasks.objective import BuildContext, Objective
from tunelab.tasks.pairwise import (
    LOGPS_STATISTICS,
    PREFERENCE_DATA,
    PairwiseModule,
    logps_statistics,
    pair_statistics,
    reply_lengths,
    reply_logps,
    split_pairs,
)

# (per-pair losses [B], chosen rewards [B], rejected rewards [B])
PairLosses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Replies(NamedTuple):
    """The policy's summed log-probs ``log pi(y|x)`` [B] of the chosen and rejected replies, and their lengths."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor

    @property
    def chosen_mean(self) -> torch.Tensor:
        """``mean_t log pi(y_c,t | x, y_c,<t) = log pi(y_c|x) / |y_c|``."""
        return self.chosen / self.chosen_lengths

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected / self.rejected_lengths


def check_number(task_cfg: DictConfig, key: str, valid: Callable[[float], bool], expected: str) -> None:
    """``task.<key>`` is a number for which ``valid`` holds; else one sentence naming the key and ``expected``."""
    value = task_cfg.get(key)
    if not (isinstance(value, int | float) and not isinstance(value, bool) and valid(value)):
        raise ConfigError(f"task.{key}={value} must be {expected}")


class ReferenceFreeModule(PairwiseModule):
    """A pairwise objective scored by the policy alone; a subclass defines :meth:`pair_losses`."""

    def __init__(self, model: torch.nn.Module, task_cfg: DictConfig, trains_all_weights: bool) -> None:
        super().__init__(model, task_cfg, trains_all_weights, extra_statistics=LOGPS_STATISTICS)

    def pair_losses(self, replies: Replies) -> PairLosses:
        """Per-pair losses and implicit rewards from the policy's reply log-probs."""
        raise NotImplementedError

    def pair_outputs(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        chosen, rejected = split_pairs(reply_logps(logits, batch, average=False))
        replies = Replies(chosen, rejected, *split_pairs(reply_lengths(batch).to(chosen.dtype)))
        losses, chosen_rewards, rejected_rewards = self.pair_losses(replies)
        return losses, {**pair_statistics(chosen_rewards, rejected_rewards), **logps_statistics(chosen, rejected)}


def build_reference_free(
    module: type[ReferenceFreeModule], context: BuildContext
) -> tuple[PreferenceDataModule, ReferenceFreeModule]:
    """Preference pairs and a ``module`` on the adapted model (nothing else: no reference)."""
    cfg = context.cfg
    datamodule = PreferenceDataModule(cfg.data, context.tokenizer, cfg.paths.cache_dir)
    return datamodule, module(context.model, cfg.task, context.method.trains_all_weights)


def reference_free_objective(
    name: str, module: type[ReferenceFreeModule], check: Callable[[DictConfig, Method], None]
) -> Objective:
    """The registry entry of a reference-free objective: it reads preference pairs into ``module``."""
    return Objective(
        name=name,
        build=partial(build_reference_free, module),
        data_kind="preference",
        data_hint=PREFERENCE_DATA,
        check=check,
    )
