"""Reward model (task=reward): the backbone with a scalar head, trained on preference pairs.

``r(x, y)`` is the head's score of prompt + reply (a decoder scores its last non-pad token, an encoder its
[CLS]); ``loss = mean_i -log sigmoid(r(x_i, y_c) - r(x_i, y_r))`` (Bradley-Terry). Validation / test: the
loss, preference accuracy ``mean(r_c > r_r)``, mean margin and mean reward of chosen / rejected replies.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from tunelab.data.datamodule import PreferenceDataModule
from tunelab.errors import ConfigError
from tunelab.tasks.objective import OBJECTIVES, BuildContext, Head, Objective
from tunelab.tasks.pairwise import PREFERENCE_DATA, PairwiseModule, pair_statistics, split_pairs
from tunelab.tasks.preference_losses import bradley_terry_loss


class RewardModule(PairwiseModule):
    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar reward of every row [2B]."""
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()

    def pair_outputs(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = split_pairs(self.scores(batch))
        return bradley_terry_loss(chosen, rejected), pair_statistics(chosen.detach(), rejected.detach())


REWARD_LABELS = ["reward"]  # the reward model's one output: a scalar score


def reward_head(cfg: DictConfig) -> Head:
    return "sequence_classification", REWARD_LABELS


def build_reward(context: BuildContext) -> tuple[PreferenceDataModule, RewardModule]:
    datamodule = PreferenceDataModule(context.cfg.data, context.tokenizer, context.cfg.paths.cache_dir)
    return datamodule, RewardModule(context.model, context.cfg.task, context.method.trains_all_weights)


def check_reward_run(run_cfg: DictConfig, export_dir: str) -> None:
    """A reward model for scoring comes from a task=reward run's export."""
    if run_cfg.task.name != "reward":
        raise ConfigError(
            f"task.reward.model_path={export_dir} is a task={run_cfg.task.name} run; a reward model comes from a "
            "task=reward run's adapter/ folder"
        )


OBJECTIVES.register(
    Objective(
        name="reward",
        build=build_reward,
        head=reward_head,
        data_kind="preference",
        data_hint=PREFERENCE_DATA,
    )
)
