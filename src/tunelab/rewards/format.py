"""A format reward to add to the verifiable one (``task.reward.source=sum``), in the signature of
:mod:`tunelab.rewards.function`: ``tunelab.rewards.format:answer_tag`` is 1.0 for a completion that holds exactly one
``<answer>...</answer>`` pair (reasoning-gym's convention, the span the verifiable scorer then reads), else 0.0."""

from __future__ import annotations

import re

ANSWER_TAG = re.compile(r"<answer>.*?</answer>", re.DOTALL)


def answer_tag(prompts: list, completions: list[str], **fields: list) -> list[float]:
    """1.0 per completion with exactly one ``<answer>...</answer>``, else 0.0."""
    return [float(len(ANSWER_TAG.findall(completion)) == 1) for completion in completions]
