"""A plugin for tests/test_grpo_ddp.py (``plugins=[tests.grpo_ddp_probe]``, imported by every rank): records each
rank's scored groups (its prompts' answers, the answer of each completion's record as the reward saw it, the
rewards and the advantages) as json lines in ``$GRPO_PROBE_DIR/rank<r>.jsonl``, the advantages each update
receives (after the whole-batch step, RLOO's whitening) in ``rank<r>_update.jsonl``, and :func:`reward`, the run's
reward (``task.reward.function``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tunelab.tasks.grpo import GRPOModule, ScoredGroups

PROBE_DIR = "GRPO_PROBE_DIR"


SCORED_ANSWERS: list[list[str]] = []  # the answer field of each row, per reward call


TRAINING_ROWS = 8  # data.batch_size x task.num_generations of the test's run (validation scores fewer rows)


def reward(prompts: list, completions: list[str], answer: list, **fields: list) -> list[float]:
    """A deterministic reward with variance inside most groups, the completion's length modulo 5; but 1 for every
    completion of rank 1's first training batch, so that rank has no group with signal while rank 0 has some."""
    SCORED_ANSWERS.append(answer)
    first = sum(len(rows) == TRAINING_ROWS for rows in SCORED_ANSWERS) == 1
    if first and len(completions) == TRAINING_ROWS and os.environ.get("LOCAL_RANK") == "1":
        return [1.0] * len(completions)
    return [float(len(completion) % 5) for completion in completions]


def recording(self: GRPOModule, batch: dict[str, Any]) -> ScoredGroups:
    scored = scoring(self, batch)
    row = {
        "answers": [record["answer"] for record in batch["records"]],
        "row_answers": SCORED_ANSWERS[-1],
        "rewards": scored.rewards.tolist(),
        "advantages": scored.advantages.tolist(),
    }
    with open(Path(os.environ[PROBE_DIR]) / f"rank{self.global_rank}.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")
    return scored


def recording_update(self: GRPOModule, completions: Any, advantages: Any, *args: Any) -> Any:
    with open(Path(os.environ[PROBE_DIR]) / f"rank{self.global_rank}_update.jsonl", "a") as handle:
        handle.write(json.dumps(advantages.tolist()) + "\n")
    return updating(self, completions, advantages, *args)


scoring, updating = GRPOModule.score_groups, GRPOModule.update
if PROBE_DIR in os.environ:  # the run's ranks; importing PROBE_DIR into the test's own process patches nothing
    GRPOModule.score_groups, GRPOModule.update = recording, recording_update
