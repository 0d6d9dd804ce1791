"""What the RL objectives (PPO, the GRPO family) measure of a policy's greedy answers at validation and test.

Per stage (``val``, ``test``), over the epoch's prompts and synchronised across ranks:

- ``reward_mean``: mean reward of the answers;
- ``reward_stderr``: its standard error over prompts, ``s / sqrt(n)`` with ``s`` the sample standard deviation
  (``n - 1``): two policies' test rewards differ beyond noise when their gap is several of these;
- ``exact_match``: share of answers that are exactly the record's ``answer`` (the reply stripped, or the text in
  its last ``<answer>...</answer>``, as :mod:`tunelab.rewards.verifiable` reads it), logged only for data whose
  records carry an ``answer`` (the arithmetic prompts do: there it is the scorer's 1.0 case);
- a mean per name the objective adds (answer length, KL).

:func:`answer_samples` keeps the test answers with their rewards for ``evaluate.py``'s report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics import MeanMetric, Metric

from tunelab.data.prompts import prompt_turns
from tunelab.rewards.verifiable import extract_reply
from tunelab.tasks.grpo_losses import mean_and_std


class StandardError(Metric):
    """Standard error of the mean of the values seen since the last reset: ``sqrt((sum x^2 - n mean^2) / (n - 1)
    / n)`` from the count, sum and sum of squares (summed over ranks); ``nan`` below 2 values."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("count", "total", "squares"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        self.count += values.numel()
        self.total += values.sum()
        self.squares += (values**2).sum()

    def compute(self) -> torch.Tensor:
        if self.count < 2:
            return torch.tensor(float("nan"))
        _, std = mean_and_std(self.count, self.total, self.squares)
        return (std / self.count.sqrt()).float()


def exact_matches(texts: Sequence[str], records: Sequence[Mapping[str, Any]]) -> torch.Tensor | None:
    """1.0 per answer whose reply (see module docstring) is ``str(record["answer"])`` stripped, else 0.0; ``None``
    when a record has no ``answer``."""
    if not all("answer" in record for record in records):
        return None
    pairs = zip(texts, records, strict=True)
    return torch.tensor([float(extract_reply(text) == str(record["answer"]).strip()) for text, record in pairs])


def answer_metrics(*means: str) -> torch.nn.ModuleDict:
    """``{stage: {name: metric}}`` for ``val`` and ``test``: the module docstring's metrics plus a mean per name."""
    return torch.nn.ModuleDict(
        {
            stage: torch.nn.ModuleDict(
                {
                    "reward_mean": MeanMetric(),
                    "reward_stderr": StandardError(),
                    "exact_match": MeanMetric(),
                    **{name: MeanMetric() for name in means},
                }
            )
            for stage in ("val", "test")
        }
    )


def update_answer_metrics(
    metrics: torch.nn.ModuleDict, rewards: torch.Tensor, texts: Sequence[str], records: Sequence[Mapping[str, Any]]
) -> None:
    """Add one batch of greedy answers (their ``rewards`` [B], decoded ``texts`` and data ``records``)."""
    metrics["reward_mean"].update(rewards)
    metrics["reward_stderr"].update(rewards)
    exact = exact_matches(texts, records)
    if exact is not None:
        metrics["exact_match"].update(exact.to(rewards.device))


def answer_samples(
    texts: Sequence[str], records: Sequence[Mapping[str, Any]], rewards: torch.Tensor
) -> list[dict[str, Any]]:
    """One ``{question, prediction, reference, reward}`` per answer, for ``evaluate.py``'s report."""
    return [
        {
            "question": prompt_turns(record)[-1]["content"],
            "prediction": text,
            "reference": str(record.get("answer", "")),
            "reward": float(reward),
        }
        for record, text, reward in zip(records, texts, rewards, strict=True)
    ]
