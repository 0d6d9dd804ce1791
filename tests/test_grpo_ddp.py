"""task=grpo under DDP on 2 CPU processes (gloo): each rank samples all G completions of its own prompts, so no
group is split across ranks and every group's advantages are those a single process computes over the whole
group (tests/grpo_ddp_probe.py records what each rank scored); and a rank whose groups all lack signal (left out by
``dynamic_sampling=skip``) still meets the other rank in every gradient all-reduce. The same for task=rloo, whose
``normalize_advantages`` whitens over the global batch, as one process holding it would."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.tasks.grpo_losses import group_advantages, leave_one_out_advantages

from .conftest import launch_distributed
from .grpo_ddp_probe import PROBE_DIR
from .test_ppo import counting_prompts
from .test_preference_data import write_jsonl

pytestmark = pytest.mark.slow  # multi-process runs (2 CPU processes, subprocess)

GENERATIONS, BATCH, STEPS = 4, 2, 2


def ranks_at(ranks: list, step: int) -> list[dict]:
    return [ranks[rank][step] for rank in (0, 1)]


def rewards_at(ranks: list, step: int) -> torch.Tensor:
    return torch.tensor([reward for part in ranks_at(ranks, step) for reward in part["rewards"]])


def single_process(task: str, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-group advantages as scored, the advantages of the update) of one process holding the global batch."""
    if task == "grpo":
        whole, _ = group_advantages(rewards, GENERATIONS, scale=True, eps=1e-4)
        return whole, whole
    return leave_one_out_advantages(rewards, GENERATIONS)[0], leave_one_out_advantages(
        rewards, GENERATIONS, normalize=True
    )[0]


@pytest.mark.parametrize(("task", "extra"), [("grpo", ()), ("rloo", ("task.normalize_advantages=true",))])
def test_every_group_is_scored_whole_on_one_rank(tmp_path, task, extra):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", counting_prompts(40))
    output_dir, probe = tmp_path / "run", tmp_path / "probe"
    probe.mkdir()
    overrides = [
        "model=tiny",
        f"task={task}",
        *extra,
        "data=prompts",
        f"data.path={prompts}",
        f"paths.output_dir={output_dir}",
        f"data.batch_size={BATCH}",
        "data.eval_batch_size=4",
        "data.val_size=4",
        "data.test_size=4",
        f"task.num_generations={GENERATIONS}",
        "task.rollout.max_new_tokens=8",
        "trainer.strategy.timeout_s=60",  # a rank left waiting in a collective fails the run within a minute
        f"trainer.max_steps={STEPS}",
        "trainer.enable_progress_bar=false",
        "plugins=[tests.grpo_ddp_probe]",
        "task.reward.source=function",
        "task.reward.function=tests.grpo_ddp_probe:reward",
    ]
    result = launch_distributed(output_dir, "ddp", overrides, timeout=300, env={PROBE_DIR: str(probe)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout
    ranks = [[json.loads(line) for line in (probe / f"rank{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)]
    updates = [
        [json.loads(line) for line in (probe / f"rank{r}_update.jsonl").read_text().splitlines()] for r in (0, 1)
    ]
    assert [len(steps) for steps in ranks] == [STEPS, STEPS]
    assert set(ranks[1][0]["rewards"]) == {1.0}  # rank 1's first batch: no signal, no rows in its update
    assert set(ranks[0][0]["rewards"]) != {1.0}
    for step in range(STEPS):
        local = ranks_at(ranks, step)
        answers = [answer for part in local for answer in part["answers"]]
        assert len(answers) == len(set(answers)) == 2 * BATCH  # the ranks drew different prompts
        for part in local:  # rows g G ... g G + G - 1: the G completions of the rank's prompt g, scored together
            assert part["row_answers"] == [answer for answer in part["answers"] for _ in range(GENERATIONS)]
            assert len(part["rewards"]) == BATCH * GENERATIONS
        # a single process holding the global batch (rank 0's prompts, then rank 1's) computes the same advantages
        rewards = rewards_at(ranks, step)
        scored, updated = single_process(task, rewards)
        ranked = torch.tensor([advantage for part in local for advantage in part["advantages"]])
        torch.testing.assert_close(ranked, scored, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.tensor(updates[0][step] + updates[1][step]), updated, rtol=0, atol=1e-6)
        assert rewards.view(-1, GENERATIONS).std(-1).gt(0).any()  # some group carries signal
    if task == "rloo":  # whitening each rank's half alone would differ: the check above can fail
        halves = [
            leave_one_out_advantages(torch.tensor(part["rewards"]), GENERATIONS, normalize=True)[0]
            for part in ranks_at(ranks, 0)
        ]
        assert not torch.allclose(torch.cat(halves), single_process(task, rewards_at(ranks, 0))[1], atol=1e-3)
