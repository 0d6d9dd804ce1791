"""REINFORCE leave-one-out (task=rloo; Ahmadian et al., 2024, as trl's ``RLOOTrainer``): ``k = task.num_generations``
samples per prompt, each completion's baseline the mean reward of the prompt's ``k - 1`` other samples, and a
REINFORCE loss on the sequence's probability ratio with the same optional clipping as GRPO.

The rollout, rewards (and DAPO's overlong penalty / truncation masking), zero-variance groups, chunked
``num_iterations`` passes against the sampling policy's log-probs, logging and validation are task=grpo's
(:mod:`tunelab.tasks.grpo`, whose module this one specialises); what differs:

- advantages :func:`~tunelab.tasks.grpo_losses.leave_one_out_advantages`: ``A_i = r_i - (1 / (k - 1))
  sum_{j != i} r_j``, whitened over the whole training batch (all ranks, all resampled draws) when
  ``task.normalize_advantages``;
- loss :func:`~tunelab.tasks.grpo_losses.sequence_ratio_loss`: ``rho_i = exp(sum_t (log pi - log pi_old))``, the
  clipped surrogate ``-min(rho_i A_i, clamp(rho_i, 1 - epsilon_low, 1 + epsilon_high) A_i)``, mean over the
  completions (its gradient on the first pass, ``rho = 1``, is REINFORCE's; a wide ``epsilon`` switches the
  clipping off);
- the KL to the reference, when ``task.beta > 0``, is a reward penalty as in trl's ``RLOOTrainer``, not a loss
  term: ``r_i - beta KL_i`` before the advantages, with ``KL_i = sum_t (log pi_old(a_t) - log pi_ref(a_t))`` over
  the completion's tokens (:func:`~tunelab.tasks.grpo_losses.sequence_kl`, computed once without gradient at
  scoring time; ``train/kl`` is then its mean per completion token); at ``beta = 0`` (the default) no reference
  model is built.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from tunelab.methods.spec import Method
from tunelab.tasks.grpo import GRPOModule, check_group_config
from tunelab.tasks.grpo_losses import (
    PolicyLoss,
    leave_one_out_advantages,
    moments,
    sequence_kl,
    sequence_ratio_loss,
    whiten,
)
from tunelab.tasks.objective import OBJECTIVES, Objective
from tunelab.tasks.reward_sources import rollout_builder
from tunelab.tasks.rollout import Completions


class RLOOModule(GRPOModule):
    """task=grpo's loop with RLOO's advantages and loss (module docstring)."""

    @staticmethod
    def reference_weight(task_cfg: DictConfig) -> float:
        """No KL term in the loss (``task.beta`` penalizes the reward, :meth:`reward_penalty`)."""
        return 0.0

    @torch.no_grad()
    def reward_penalty(self, completions: Completions) -> torch.Tensor:
        """``beta KL_i`` of each completion (module docstring); 0 without a reference (``beta = 0``)."""
        beta = float(self.cfg.beta)
        if self.engine.reference is None:
            return super().reward_penalty(completions)
        args = (completions.input_ids, completions.attention_mask, completions.labels)
        mask = completions.mask.float()
        chunks = torch.arange(len(mask), device=mask.device).split(self.cfg.chunk_size)
        kl = torch.cat(
            [
                sequence_kl(
                    self.completion_logps(completions, chunk),
                    self.engine.reference_logps(self.model, *(arg[chunk] for arg in args)),
                    mask[chunk],
                )
                for chunk in chunks
            ]
        )
        self.log("train/kl", kl.sum() / mask.sum().clamp(min=1.0), batch_size=len(mask))
        return beta * kl

    @property
    def loss_type(self) -> str:
        """A mean over completions: chunks are weighted by their share of the rows."""
        return "rloo"

    def advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return leave_one_out_advantages(rewards, self.cfg.num_generations)

    def batch_advantages(self, advantages: torch.Tensor) -> torch.Tensor:
        """``task.normalize_advantages``: whitened over the whole batch, every rank's rows (their moments summed
        across ranks), so a run on several processes whitens as one process holding the global batch would."""
        if not self.cfg.normalize_advantages:
            return advantages
        population = moments(advantages).to(advantages.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            population = self.trainer.strategy.reduce(population, reduce_op="sum")
        return whiten(advantages, population, self.cfg.scale_eps)

    def loss(
        self,
        logps: torch.Tensor,
        old_logps: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        reference_logps: torch.Tensor | None,
    ) -> PolicyLoss:
        return sequence_ratio_loss(
            logps, old_logps, advantages, mask, epsilon_low=self.cfg.epsilon_low, epsilon_high=self.cfg.epsilon_high
        )


def check_rloo_config(cfg: DictConfig, method: Method) -> None:
    """task=rloo settings that cannot work: task=grpo's shared checks (every method works)."""
    check_group_config(cfg)


OBJECTIVES.register(
    Objective(
        name="rloo",
        build=rollout_builder(RLOOModule),
        data_kind="prompts",
        data_hint="data=arith_prompts or data=prompts",
        check=check_rloo_config,
    )
)
