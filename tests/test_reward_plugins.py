"""Rewards as plug-ins (task.reward, tunelab.tasks.reward_sources): a user's own ``module:function`` (the functions
below, named as ``tests.test_reward_plugins:<name>``) gets the prompts, the completions and every other record field;
several rewards sum with their weights; a reward that raises, is not finite or has the wrong length is a one-line
error naming it and the sample, or with ``on_error: zero`` a counted zero logged as ``train/reward_zeroed``; the
config is checked before any weights load; and grpo / rloo / ppo all take it."""

from __future__ import annotations

import math
import re

import pytest
import torch
from omegaconf import OmegaConf

from tunelab.errors import ConfigError, RewardError
from tunelab.methods import METHODS
from tunelab.tasks import OBJECTIVES
from tunelab.tasks.grpo import GRPOModule
from tunelab.tasks.reward_sources import REWARD_SOURCES, build_reward_fn, check_reward_config
from tunelab.tasks.rloo import RLOOModule

from .test_grpo import build_grpo, grpo_overrides
from .test_ppo import counting_prompts, logged, ppo_trainer, prompt_data_cfg
from .test_preference_data import write_jsonl

HERE = "tests.test_reward_plugins"
SEEN: list[dict] = []


def correct(prompts: list, completions: list[str], answer: list, **fields: list) -> list[float]:
    """1 when the completion is the record's answer."""
    SEEN.append({"prompts": prompts, "completions": completions, "answer": answer, **fields})
    return [
        float(completion.strip() == str(expected)) for completion, expected in zip(completions, answer, strict=True)
    ]


def tagged(prompts: list, completions: list[str], **fields: list) -> list[float]:
    """1 when the completion opens with ``<answer>``."""
    return [float(completion.startswith("<answer>")) for completion in completions]


def picky(prompts: list, completions: list[str], **fields: list) -> list[float]:
    """Raises on a completion holding ``boom``, NaN on one holding ``nan``, else its length."""
    if any("boom" in completion for completion in completions):
        raise ValueError("cannot score boom")
    return [math.nan if "nan" in completion else float(len(completion)) for completion in completions]


def short(prompts: list, completions: list[str], **fields: list) -> list[float]:
    """One value too few."""
    return [0.0] * (len(completions) - 1)


TRAINING_ANSWERS: list[list[str]] = []


def odd_fails(prompts: list, completions: list[str], answer: list, **fields: list) -> list[float]:
    """Raises on a record with an odd answer, else 1; records the answers of each training batch (12 rows)."""
    if len(completions) == 12:
        TRAINING_ANSWERS.append(answer)
    if any(int(value) % 2 for value in answer):
        raise RuntimeError("odd answer")
    return [1.0] * len(completions)


RECORDS = [
    {"prompt": "1+1?", "answer": "2", "id": "q0", "metadata": {"n": 0}},
    {"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4", "id": "q1"},
    {"prompt": "3+3?", "answer": "6", "id": "q2", "metadata": {"n": 2}},
]


def reward_of(**entry):
    entry = OmegaConf.create(entry)
    check_reward_config(entry)
    return build_reward_fn(entry, load_run=None)


def test_reward_sources_are_one_registry():
    assert sorted(REWARD_SOURCES) == ["function", "model", "sum", "verifiable"]


def test_a_user_function_gets_prompts_completions_and_every_field():
    SEEN.clear()
    rewards = reward_of(source="function", function=f"{HERE}:correct")(["2", " 5 ", "6\n"], RECORDS)
    assert rewards.dtype == torch.float32 and rewards.tolist() == [1.0, 0.0, 1.0]
    (call,) = SEEN
    assert call["prompts"] == [record["prompt"] for record in RECORDS]
    assert call["completions"] == ["2", " 5 ", "6\n"]
    assert call["answer"] == ["2", "4", "6"] and call["id"] == ["q0", "q1", "q2"]
    assert call["metadata"] == [{"n": 0}, None, {"n": 2}]  # None where a record lacks the field


def test_rewards_sum_with_their_weights():
    terms = [
        {"source": "function", "function": f"{HERE}:correct", "weight": 1.0},
        {"source": "function", "function": f"{HERE}:tagged", "weight": 0.25},
    ]
    rewards = reward_of(source="sum", terms=terms)(["<answer>2", "<answer>4", "6"], RECORDS)
    assert rewards.tolist() == [0.25, 0.25, 1.0]


def test_the_shipped_format_reward_sums_with_the_verifiable_one():
    """correctness + 0.5 x format: ``tunelab.rewards.format:answer_tag`` pays for exactly one tagged answer."""
    terms = [
        {"source": "verifiable"},
        {"source": "function", "function": "tunelab.rewards.format:answer_tag", "weight": 0.5},
    ]
    record = {"prompt": "What is 2 plus 3?", "answer": "5", "metadata": {"source_dataset": "basic_arithmetic"}}
    completions = ["<answer>5</answer>", "5", "<answer>4</answer>", "<answer>5</answer><answer>5</answer>"]
    rewards = reward_of(source="sum", terms=terms)(completions, [record] * 4)
    assert rewards.tolist() == [1.5, 1.0, 0.5, 1.0]


@pytest.mark.parametrize(
    ("completions", "message"),
    [
        (["a", "b", "boom"], f"reward {HERE}:picky raised ValueError: cannot score boom on sample 2 (id 'q2')"),
        (["a", "nan", "b"], f"reward {HERE}:picky gave nan on sample 1 (id 'q1')"),
    ],
    ids=["raises", "not finite"],
)
def test_a_failing_sample_is_a_one_line_error_naming_the_function_and_the_sample(completions, message):
    reward = reward_of(source="function", function=f"{HERE}:picky")
    with pytest.raises(RewardError, match=re.escape(message)) as caught:
        reward(completions, RECORDS)
    assert "\n" not in str(caught.value)


def test_a_wrong_length_is_an_error_even_with_on_error_zero():
    reward = reward_of(source="function", function=f"{HERE}:short", on_error="zero")
    with pytest.raises(RewardError, match=re.escape(f"reward {HERE}:short returned 2 values for 3 completions")):
        reward(["a", "b", "c"], RECORDS)


def test_on_error_zero_scores_failing_samples_zero_and_counts_them():
    """The raising sample and the NaN one are 0 (counted), the others keep their reward; a sum's term inherits the
    sum's on_error."""
    terms = [{"source": "function", "function": f"{HERE}:picky", "weight": 2.0}]
    reward = reward_of(source="sum", terms=terms, on_error="zero")
    rewards = reward(["abc", "nan", "boom"], RECORDS)
    assert rewards.tolist() == [6.0, 0.0, 0.0] and torch.isfinite(rewards).all()
    assert reward.take_zeroed() == 2 and reward.take_zeroed() == 0


BAD_ENTRIES = {
    "unknown source": ({"source": "human"}, "task.reward.source='human' is not one of"),
    "bad on_error": ({"source": "verifiable", "on_error": "skip"}, "task.reward.on_error='skip' is not one of"),
    "no function": ({"source": "function"}, "task.reward.source=function needs task.reward.function="),
    "not module:function": ({"source": "function", "function": "correct"}, "as 'module:function'"),
    "no such module": ({"source": "function", "function": "no_such_module:f"}, "cannot import 'no_such_module'"),
    "no such function": ({"source": "function", "function": f"{HERE}:nothing"}, "has no callable 'nothing'"),
    "model without path": ({"source": "model"}, "task.reward.source=model needs task.reward.model_path="),
    "sum without terms": ({"source": "sum"}, "task.reward.source=sum needs task.reward.terms="),
    "bad weight": (
        {"source": "sum", "terms": [{"source": "verifiable", "weight": "high"}]},
        "task.reward.terms[0].weight='high' must be a finite number",
    ),
    "bad term": (
        {"source": "sum", "terms": [{"source": "verifiable"}, {"source": "model"}]},
        "task.reward.terms[1].source=model needs task.reward.terms[1].model_path=",
    ),
}


@pytest.mark.parametrize(("entry", "reason"), list(BAD_ENTRIES.values()), ids=list(BAD_ENTRIES))
def test_a_reward_entry_that_cannot_work_is_refused(entry, reason):
    with pytest.raises(ConfigError, match=re.escape(reason)):
        check_reward_config(OmegaConf.create(entry))


@pytest.mark.parametrize("task", ["grpo", "rloo", "ppo"])
def test_every_rl_objective_checks_the_reward_before_weights_load(compose_cfg, tmp_path, task):
    overrides = [o.replace("task=grpo", f"task={task}") for o in grpo_overrides(tmp_path)]
    good = [*overrides, "task.reward.source=function", f"task.reward.function={HERE}:tagged"]
    OBJECTIVES[task].check(compose_cfg(good), METHODS["lora"])
    with pytest.raises(ConfigError, match="has no callable 'nothing'"):
        OBJECTIVES[task].check(compose_cfg([*good[:-1], f"task.reward.function={HERE}:nothing"]), METHODS["lora"])


@pytest.mark.parametrize("module_class", [GRPOModule, RLOOModule], ids=["grpo", "rloo"])
def test_a_run_with_summed_rewards_logs_the_zeroed_count(compose_cfg, tmp_path, module_class):
    """Two batches of 3 prompts x 4 samples; the sum's ``odd_fails`` term raises on every sample whose answer is odd
    (located row by row), so ``train/reward_zeroed`` is 4 x the batch's odd prompts, and every reward is finite."""
    task = module_class.__module__.rsplit(".", 1)[-1]
    terms = f"[{{source:function,function:'{HERE}:tagged',weight:0.5}},{{source:function,function:'{HERE}:odd_fails'}}]"
    overrides = [o.replace("task=grpo", f"task={task}") for o in grpo_overrides(tmp_path, "trainer.max_steps=2")]
    cfg = compose_cfg([*overrides, "task.reward.source=sum", "task.reward.on_error=zero", f"task.reward.terms={terms}"])
    OBJECTIVES[task].check(cfg, METHODS["lora"])
    data_cfg = prompt_data_cfg(write_jsonl(tmp_path / "p.jsonl", counting_prompts(20)), batch_size=3)
    TRAINING_ANSWERS.clear()
    cfg.task.dynamic_sampling = "off"  # every batch takes its step, whatever the rewards
    module, datamodule = build_grpo(cfg, data_cfg, build_reward_fn(cfg.task.reward, None), module_class)
    trainer = ppo_trainer(cfg, module, callbacks=[])
    trainer.fit(module, datamodule=datamodule)
    odd = [sum(int(value) % 2 for value in answers) for answers in TRAINING_ANSWERS]
    assert len(odd) == 2 and 0 < sum(odd) < 24, TRAINING_ANSWERS
    assert logged(tmp_path, "train/reward_zeroed") == [float(count) for count in odd]
    assert all(math.isfinite(value) for value in logged(tmp_path, "train/reward_mean"))
