"""A user's own reward function, named in the config as ``module:function`` (``task.reward.source=function``).

The documented signature, trl's (so trl reward functions work unchanged)::

    def my_reward(prompts: list, completions: list[str], **fields: list) -> list[float]: ...

``prompts[i]`` is sample ``i``'s ``prompt`` field as the data holds it (a string or a list of turns),
``completions[i]`` its decoded completion, and each other field of the records is passed as a keyword holding one
value per sample (``answer=[...]``, ``metadata=[...]``; ``None`` where a record lacks it). One finite float per
completion comes back; a sample's reward may depend on that sample only (a failure is located by calling the
function row by row, :class:`tunelab.rewards.checked.CheckedReward`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tunelab.errors import ConfigError

UserRewardFn = Callable[..., Sequence[float]]


def import_reward_function(spec: str) -> UserRewardFn:
    """The callable named ``module:function`` (``module`` importable, e.g. from ``PYTHONPATH``); a ConfigError names
    what is missing."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"task.reward.function={spec!r} must name a function as 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"task.reward.function={spec!r}: cannot import {module_name!r} ({error})") from error
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"task.reward.function={spec!r}: {module_name} has no callable {name!r}")
    return function


class FunctionReward:
    """``(completions, records) -> rewards`` of a user function with the module docstring's signature."""

    def __init__(self, function: UserRewardFn) -> None:
        self.function = function

    def __call__(self, completions: Sequence[str], records: Sequence[Mapping[str, Any]]) -> Sequence[float]:
        keys = dict.fromkeys(key for record in records for key in record if key != "prompt")
        fields = {key: [record.get(key) for record in records] for key in keys}
        prompts = [record.get("prompt") for record in records]
        return self.function(prompts=prompts, completions=list(completions), **fields)
