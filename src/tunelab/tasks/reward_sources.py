"""The reward of an RL objective's ``task.reward`` config, shared by task=ppo, grpo and rloo: ``source=verifiable``
(the data's own scorer, :class:`tunelab.rewards.verifiable.VerifiableReward`) or ``source=model`` (a task=reward
run's export, :class:`tunelab.rewards.model.RewardModelScorer`)."""

from __future__ import annotations

from omegaconf import DictConfig

from tunelab.errors import ConfigError
from tunelab.tasks.objective import LoadRun
from tunelab.tasks.rollout import RewardFn

REWARD_SOURCES = ("verifiable", "model")


def check_reward_config(reward_cfg: DictConfig) -> None:
    """Refuse an unknown ``task.reward.source`` and ``source=model`` without ``model_path``."""
    if reward_cfg.source not in REWARD_SOURCES:
        raise ConfigError(f"task.reward.source={reward_cfg.source!r} is not one of {list(REWARD_SOURCES)}")
    if reward_cfg.source == "model" and not reward_cfg.get("model_path"):
        raise ConfigError("task.reward.source=model needs task.reward.model_path=<reward run>/adapter")


def build_reward_fn(reward_cfg: DictConfig, load_run: LoadRun) -> RewardFn:
    """The reward of ``task.reward``: the data's verifiable scorer, or a trained reward model (a task=reward run's
    export, loaded with ``load_run``)."""
    if reward_cfg.source == "model":
        from tunelab.rewards.model import RewardModelScorer
        from tunelab.tasks.reward import check_reward_run

        model, tokenizer, run_cfg = load_run(str(reward_cfg.model_path))
        check_reward_run(run_cfg, str(reward_cfg.model_path))
        return RewardModelScorer(model, tokenizer)
    from tunelab.rewards.verifiable import VerifiableReward

    return VerifiableReward()
