"""Every reward as the RL objectives receive it: checked sample by sample, and several summed with weights.

:class:`CheckedReward` holds a reward to its contract: one finite float per completion. A reward that raises, or
returns a value that is not a finite number, is located by calling it again row by row (a sample's reward
depends on that sample only), then, per ``on_error``:

- ``fail``: a :class:`~tunelab.errors.RewardError` naming the reward and the sample (its index in the batch and
  its record's ``id`` where it has one);
- ``zero``: that sample's reward is 0, counted (:meth:`CheckedReward.take_zeroed`; the objectives log the count
  as ``train/reward_zeroed``).

A result of the wrong length, or not numbers, is always an error. No NaN reaches a loss either way.

:class:`WeightedSum` is ``r_i = sum_k w_k r_k,i`` over checked terms (e.g. correctness + format).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from tunelab.errors import RewardError

ON_ERROR = ("fail", "zero")


def sample_name(index: int, record: Mapping[str, Any]) -> str:
    """``sample 3`` or ``sample 3 (id 'q7')``."""
    return f"sample {index}" + (f" (id {record['id']!r})" if "id" in record else "")


class CheckedReward:
    """``reward`` (named ``name`` in errors) held to one finite float per completion (module docstring)."""

    def __init__(self, reward: Callable[..., Any], name: str, on_error: str) -> None:
        self.reward, self.name, self.on_error = reward, name, on_error
        self.zeroed = 0

    def to(self, device: torch.device) -> CheckedReward:
        """Moves a reward that holds a model (it defines ``to``) beside the policy."""
        place = getattr(self.reward, "to", None)
        if callable(place):
            place(device)
        return self

    def take_zeroed(self) -> int:
        """Samples zeroed since the last call."""
        zeroed, self.zeroed = self.zeroed, 0
        return zeroed

    def values(self, result: Any, expected: int) -> list[float]:
        """``result`` as ``expected`` floats (NaN kept for the caller to locate); RewardError otherwise."""
        if isinstance(result, torch.Tensor):
            result = result.detach().flatten().tolist()
        try:
            values = [float(value) for value in result]
        except (TypeError, ValueError) as error:
            raise RewardError(f"reward {self.name} must return a list of floats, got {result!r:.80}") from error
        if len(values) != expected:
            raise RewardError(f"reward {self.name} returned {len(values)} values for {expected} completions")
        return values

    def sample(self, completion: str, record: Mapping[str, Any]) -> float | BaseException:
        """One row's reward, or the exception it raised."""
        try:
            return self.values(self.reward([completion], [record]), 1)[0]
        except RewardError:
            raise
        except Exception as error:
            return error

    def __call__(self, completions: Sequence[str], records: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        try:
            values: list[float | BaseException] = list(self.values(self.reward(completions, records), len(records)))
        except RewardError:
            raise
        except Exception:
            values = [self.sample(completion, record) for completion, record in zip(completions, records, strict=True)]
        rewards = []
        for index, (value, record) in enumerate(zip(values, records, strict=True)):
            if isinstance(value, float) and math.isfinite(value):
                rewards.append(value)
                continue
            if self.on_error == "fail":
                failed = isinstance(value, BaseException)
                what = f"raised {type(value).__name__}: {value}" if failed else f"gave {value}"
                raise RewardError(
                    f"reward {self.name} {what} on {sample_name(index, record)}; task.reward.on_error=zero "
                    "scores such samples 0 (counted)"
                ) from (value if failed else None)
            self.zeroed += 1
            rewards.append(0.0)
        return torch.tensor(rewards, dtype=torch.float32)


class WeightedSum:
    """``r_i = sum_k w_k r_k,i`` of ``terms`` ``[(w_k, reward_k)]``; moves and counts through to each term."""

    def __init__(self, terms: Sequence[tuple[float, CheckedReward | WeightedSum]]) -> None:
        self.terms = list(terms)

    def to(self, device: torch.device) -> WeightedSum:
        for _, reward in self.terms:
            reward.to(device)
        return self

    def take_zeroed(self) -> int:
        return sum(reward.take_zeroed() for _, reward in self.terms)

    def __call__(self, completions: Sequence[str], records: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        return sum(weight * reward(completions, records) for weight, reward in self.terms)
