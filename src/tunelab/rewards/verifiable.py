"""Verifiable rewards: a reasoning-gym generator's own scorer applied to a model's reply.

``reward = scorer(reply.strip(), record)`` where ``record`` is the generator's entry (``answer``, ``metadata``
with ``source_dataset``): 1.0 for the exact answer, ``len(answer) / len(reply)`` for a reply that contains it
(so padding the answer with words is paid for), 0.0 otherwise (reasoning-gym's ``score_answer``; generators
with several valid answers override it). Replies may wrap the answer in ``<answer>...</answer>``, reasoning-gym's
convention; then only the tagged text is scored.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tunelab.errors import DataError


@functools.cache
def scorer(generator: str) -> Any:
    """A reasoning-gym dataset of ``generator`` (its ``score_answer`` does not depend on size or seed)."""
    import reasoning_gym

    return reasoning_gym.create_dataset(generator, size=1, seed=0)


def extract_reply(reply: str) -> str:
    """The text inside the last ``<answer>...</answer>`` of ``reply`` if there is one, else ``reply``; stripped."""
    from reasoning_gym.utils import extract_answer

    tagged = extract_answer(reply, tag_name="answer") if "<answer>" in reply else None
    return (tagged if tagged is not None else reply).strip()


class VerifiableReward:
    """``(replies, records) -> rewards [B]`` with each record's generator scorer (see module docstring)."""

    def __call__(self, replies: Sequence[str], records: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        return torch.tensor([self.score(reply, record) for reply, record in zip(replies, records, strict=True)])

    @staticmethod
    def score(reply: str, record: Mapping[str, Any]) -> float:
        generator = (record.get("metadata") or {}).get("source_dataset")
        if not generator or "answer" not in record:
            raise DataError(
                f"prompt {record.get('id', '?')!r}: a verifiable reward needs the generator's entry "
                "('answer' and 'metadata.source_dataset')",
                field="metadata.source_dataset" if not generator else "answer",
            )
        return float(scorer(generator).score_answer(answer=extract_reply(reply), entry=dict(record)))
