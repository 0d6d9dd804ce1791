"""The reasoning-gym arithmetic sets and the verifiable reward: every chosen reply is right and every rejected one
wrong by the generator's own scorer, questions are unique, and rewards are the scorer's values."""

from __future__ import annotations

import json

import pytest
import reasoning_gym

from tunelab.assets.arithmetic import GENERATOR, GENERATOR_OPTIONS, ensure_arith_prefs, ensure_arith_prompts
from tunelab.errors import DataError
from tunelab.rewards.verifiable import VerifiableReward


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_preference_pairs_are_right_versus_checked_wrong(cache_dir):
    pairs = rows(ensure_arith_prefs(cache_dir))
    scorer = reasoning_gym.create_dataset(GENERATOR, size=1, seed=0, **GENERATOR_OPTIONS)
    assert len(pairs) > 1000
    assert len({pair["prompt"] for pair in pairs}) == len(pairs)
    for pair in pairs:
        assert pair["chosen"] == str(eval(pair["metadata"]["expression"]))  # the arithmetic itself
        assert scorer.score_answer(answer=pair["chosen"], entry=pair) == 1.0
        assert scorer.score_answer(answer=pair["rejected"], entry=pair) == 0.0
        assert 1 <= abs(int(pair["rejected"]) - int(pair["chosen"])) <= 10


def test_prompts_carry_what_the_scorer_needs(cache_dir):
    prompts = rows(ensure_arith_prompts(cache_dir))
    assert len({row["prompt"] for row in prompts}) == len(prompts) > 1000
    rewards = VerifiableReward()([row["answer"] for row in prompts[:50]], prompts[:50])
    assert rewards.tolist() == [1.0] * 50


def test_verifiable_reward_is_the_generator_scorer():
    record = {"id": "q", "answer": "17", "metadata": {"source_dataset": GENERATOR}}
    replies = ["17", " 17\n", "The answer is 17", "<answer>17</answer>", "18", ""]
    scorer = reasoning_gym.create_dataset(GENERATOR, size=1, seed=0)
    expected = [scorer.score_answer(answer=r, entry=record) for r in ["17", "17", "The answer is 17", "17", "18", ""]]
    assert VerifiableReward()(replies, [record] * len(replies)).tolist() == pytest.approx(expected)
    assert expected[2] == pytest.approx(2 / 16)  # partial credit: len(answer) / len(reply)


def test_a_record_without_the_generator_entry_is_named():
    with pytest.raises(DataError, match=r"field 'metadata.source_dataset'.*prompt 'q7'"):
        VerifiableReward()(["1"], [{"id": "q7", "answer": "1"}])
