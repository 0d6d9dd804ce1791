"""REINFORCE leave-one-out (task=rloo; Ahmadian et al., 2024, as trl's ``RLOOTrainer``): ``k = task.num_generations``
samples per prompt, each completion's baseline the mean reward of the prompt's ``k - 1`` other samples, and a
REINFORCE loss on the sequence's probability ratio with the same optional clipping as GRPO.

The rollout, rewards (and DAPO's overlong penalty / truncation masking), zero-variance groups, chunked
``num_iterations`` passes against the sampling policy's log-probs, logging and validation are task=grpo's
(:mod:`tunelab.tasks.grpo`, whose module this one specialises); what differs:

- advantages :func:`~tunelab.tasks.grpo_losses.leave_one_out_advantages`: ``A_i = r_i - (1 / (k - 1))
  sum_{j != i} r_j``, whitened over the batch when ``task.normalize_advantages``;
- loss :func:`~tunelab.tasks.grpo_losses.sequence_ratio_loss`: ``rho_i = exp(sum_t (log pi - log pi_old))``, the
  clipped surrogate ``-min(rho_i A_i, clamp(rho_i, 1 - epsilon_low, 1 + epsilon_high) A_i)``, mean over the
  completions (its gradient on the first pass, ``rho = 1``, is REINFORCE's; a wide ``epsilon`` switches the
  clipping off);
- no KL term and no reference model (trl's ``beta`` reward penalty is not implemented).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from tunelab.data.prompts import PromptDataModule
from tunelab.methods.spec import Method
from tunelab.tasks.grpo import GRPOModule, check_group_config
from tunelab.tasks.grpo_losses import PolicyLoss, leave_one_out_advantages, sequence_ratio_loss
from tunelab.tasks.objective import OBJECTIVES, BuildContext, Objective
from tunelab.tasks.reward_sources import build_reward_fn


class RLOOModule(GRPOModule):
    """task=grpo's loop with RLOO's advantages and loss (module docstring)."""

    @staticmethod
    def reference_weight(task_cfg: DictConfig) -> float:
        return 0.0

    @property
    def loss_type(self) -> str:
        """A mean over completions: chunks are weighted by their share of the rows."""
        return "rloo"

    def advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        return leave_one_out_advantages(
            rewards, cfg.num_generations, normalize=cfg.normalize_advantages, eps=cfg.scale_eps
        )

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


def build_rloo(context: BuildContext) -> tuple[PromptDataModule, RLOOModule]:
    cfg, method = context.cfg, context.method
    datamodule = PromptDataModule(cfg.data, context.tokenizer, cfg.paths.cache_dir)
    reward_fn = build_reward_fn(cfg.task.reward, context.load_run)
    module = RLOOModule(
        context.model, context.tokenizer, cfg.task, method.trains_all_weights, reward_fn, method.trains_base_in_place
    )
    return datamodule, module


OBJECTIVES.register(
    Objective(
        name="rloo",
        build=build_rloo,
        data_kind="prompts",
        data_hint="data=arith_prompts or data=prompts",
        check=check_rloo_config,
    )
)
