"""The reward of an RL objective, ``task.reward``, shared by task=ppo, grpo and rloo, and :data:`REWARD_SOURCES`,
the registry of its ``source``:

- ``verifiable``: the data's own scorer (:class:`tunelab.rewards.verifiable.VerifiableReward`);
- ``model``: a trained reward model, ``model_path`` a task=reward run's export
  (:class:`tunelab.rewards.model.RewardModelScorer`);
- ``function``: a user's function, ``function: module:function`` (signature in :mod:`tunelab.rewards.function`);
- ``sum``: ``r = sum_k weight_k r_k`` over ``terms``, a list of reward entries of the other sources, each with a
  ``weight`` (default 1) and its own ``on_error`` (default the sum's).

Each reward other than ``sum`` is a :class:`~tunelab.rewards.checked.CheckedReward` named in errors by its source
(the function's ``module:function``): ``on_error: fail`` (a one-line error naming the sample) or ``zero`` (a
counted zero) for a sample that raises or is not finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tunelab.data.prompts import PromptDataModule
from tunelab.errors import ConfigError
from tunelab.registry import Registry
from tunelab.rewards.checked import ON_ERROR, CheckedReward, WeightedSum
from tunelab.tasks.objective import BuildContext, LoadRun
from tunelab.tasks.rollout import RewardFn


@dataclass(frozen=True)
class RewardSource:
    """One ``task.reward.source``: ``check(entry, where)`` refuses an entry that cannot work (``where``: its config
    path, e.g. ``task.reward.terms[1]``) before weights load; ``build(entry, load_run)`` is its reward."""

    name: str
    build: Callable[[DictConfig, LoadRun], RewardFn]
    check: Callable[[DictConfig, str], None]


REWARD_SOURCES: Registry[RewardSource] = Registry("task.reward.source")


def check_reward_config(entry: DictConfig, where: str = "task.reward") -> None:
    """Refuse an unknown source or ``on_error``, and what the source's own check refuses."""
    source = REWARD_SOURCES[entry.get("source")]
    on_error = entry.get("on_error", "fail")
    if on_error not in ON_ERROR:
        raise ConfigError(f"{where}.on_error={on_error!r} is not one of {list(ON_ERROR)}")
    source.check(entry, where)


def build_reward_fn(entry: DictConfig, load_run: LoadRun) -> RewardFn:
    """The reward of ``entry`` (``task.reward``, checked by :func:`check_reward_config`); ``load_run`` loads a reward
    model's run."""
    return REWARD_SOURCES[entry.source].build(entry, load_run)


def checked(entry: DictConfig, reward: RewardFn, name: str) -> CheckedReward:
    return CheckedReward(reward, name, entry.get("on_error", "fail"))


def no_check(entry: DictConfig, where: str) -> None:
    """A source with nothing to check."""


def build_verifiable(entry: DictConfig, load_run: LoadRun) -> RewardFn:
    from tunelab.rewards.verifiable import VerifiableReward

    return checked(entry, VerifiableReward(), "verifiable")


def check_model(entry: DictConfig, where: str) -> None:
    if not entry.get("model_path"):
        raise ConfigError(f"{where}.source=model needs {where}.model_path=<reward run>/adapter")


def build_model(entry: DictConfig, load_run: LoadRun) -> RewardFn:
    from tunelab.rewards.model import RewardModelScorer
    from tunelab.tasks.reward import check_reward_run

    model, tokenizer, run_cfg = load_run(str(entry.model_path))
    check_reward_run(run_cfg, str(entry.model_path))
    return checked(entry, RewardModelScorer(model, tokenizer), f"model {entry.model_path}")


def check_function(entry: DictConfig, where: str) -> None:
    """The named function imports (a typo fails before any weights load)."""
    from tunelab.rewards.function import import_reward_function

    if not entry.get("function"):
        raise ConfigError(f"{where}.source=function needs {where}.function=<module>:<function>")
    import_reward_function(str(entry.function))


def build_function(entry: DictConfig, load_run: LoadRun) -> RewardFn:
    from tunelab.rewards.function import FunctionReward, import_reward_function

    function = import_reward_function(str(entry.function))
    return checked(entry, FunctionReward(function), str(entry.function))


def sum_terms(entry: DictConfig) -> list[DictConfig]:
    """The sum's terms, each with the sum's ``on_error`` unless it sets its own."""
    inherited = OmegaConf.create({"on_error": entry.get("on_error", "fail")})
    return [OmegaConf.merge(inherited, term) for term in entry.get("terms") or []]


def check_sum(entry: DictConfig, where: str) -> None:
    terms = sum_terms(entry)
    if not terms:
        raise ConfigError(f"{where}.source=sum needs {where}.terms=[{{source: ..., weight: ...}}, ...]")
    for index, term in enumerate(terms):
        weight = term.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"{where}.terms[{index}].weight={weight!r} must be a finite number")
        check_reward_config(term, f"{where}.terms[{index}]")


def build_sum(entry: DictConfig, load_run: LoadRun) -> RewardFn:
    return WeightedSum([(float(term.get("weight", 1.0)), build_reward_fn(term, load_run)) for term in sum_terms(entry)])


for source in (
    RewardSource("verifiable", build_verifiable, no_check),
    RewardSource("model", build_model, check_model),
    RewardSource("function", build_function, check_function),
    RewardSource("sum", build_sum, check_sum),
):
    REWARD_SOURCES.register(source)


def rollout_builder(module_class: type) -> Callable[[BuildContext], tuple[PromptDataModule, Any]]:
    """The ``Objective.build`` of an RL task (ppo, grpo, rloo): the prompt data module and ``module_class`` built
    as ``(model, tokenizer, task cfg, trains_all_weights, reward_fn, trains_base_in_place)``, with the reward of
    ``task.reward`` (:func:`build_reward_fn`)."""

    def build(context: BuildContext) -> tuple[PromptDataModule, Any]:
        cfg, method = context.cfg, context.method
        datamodule = PromptDataModule(cfg.data, context.tokenizer, cfg.paths.cache_dir)
        reward_fn = build_reward_fn(cfg.task.reward, context.load_run)
        module = module_class(
            context.model,
            context.tokenizer,
            cfg.task,
            method.trains_all_weights,
            reward_fn,
            method.trains_base_in_place,
        )
        return datamodule, module

    return build
