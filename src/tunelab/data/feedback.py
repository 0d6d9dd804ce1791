"""Unpaired feedback (one reply to a prompt, with a thumbs-up or thumbs-down) from local json lines, for KTO.

Two record forms, one JSON object per line (trl's unpaired preference shapes):

- plain: ``{"prompt": str, "completion": str, "label": true | false}``; the prompt becomes one user turn.
- conversational: ``{"prompt": [turns], "completion": [{"role": "assistant", "content": str}], "label": ...}``
  with turns ``{"role": system|user|assistant, "content": str}``; the prompt ends with a user turn.

``label`` is JSON ``true`` (desirable, thumbs-up) or ``false`` (undesirable, thumbs-down); ``1``, ``"true"`` and
``null`` are refused. Record errors name the file, the line, the field and the fix: a missing or non-boolean label,
an empty completion, a completion that is not one assistant turn, and the errors of
:mod:`tunelab.data.preference` for the prompt. ``on_error="skip"`` drops bad records and counts them.

Preference pairs are feedback too (:func:`feedback_from_pairs`): each pair gives a desirable example (its chosen
reply) and an undesirable one (its rejected reply), so KTO reads the same pairs DPO does; pairs are split into
train / val / test first, so both halves of a pair land in the same split.

KTO's reference point needs each example's prompt with a completion that does not answer it
(:func:`with_mismatched`): the completion of the next example of the split with another prompt, fixed per split, so
the reference's log-probs of it can be precomputed like those of the example itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.data.formats import Message, get_text, non_blank
from tunelab.data.loading import LoadResult, checked_load, load_json_lines
from tunelab.data.preference import PreferenceCollator, PreferenceExample, load_preferences, parse_turns
from tunelab.data.records import ChatExample
from tunelab.data.tokenization import IGNORE_INDEX, EncodedExample, encode_example
from tunelab.errors import DataError

LABEL_FIX = 'set "label": true (thumbs-up) or false (thumbs-down)'


@dataclass(frozen=True)
class FeedbackExample:
    prompt: tuple[Message, ...]  # the conversation before the reply; ends with a user turn
    completion: str  # the assistant reply that got the feedback (stripped, non-empty)
    desirable: bool  # thumbs-up (True) or thumbs-down (False)
    source: str  # "path:line", for errors


def feedback_label(row: Mapping[str, Any]) -> bool:
    """The record's ``label``: JSON ``true`` or ``false`` only."""
    if "label" not in row or row["label"] is None:
        raise DataError(f"missing field; {LABEL_FIX}", field="label")
    label = row["label"]
    if not isinstance(label, bool):
        raise DataError(f"expected true or false, got {label!r}; {LABEL_FIX}", field="label")
    return label


def conversational_completion(value: Any) -> str:
    """The reply of a conversational ``completion``: exactly one assistant turn."""
    turns = parse_turns(value, "completion")
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise DataError("expected exactly one turn, the assistant's reply", field="completion")
    return non_blank(turns[0]["content"], "completion[0].content", "completion")


def convert_feedback(row: Mapping[str, Any]) -> tuple[tuple[Message, ...], str, bool]:
    """(prompt turns, completion, desirable) of one record of either form; DataError naming the field."""
    label = feedback_label(row)
    if isinstance(row.get("prompt"), list):
        prompt = tuple(parse_turns(row["prompt"], "prompt"))
        if prompt[-1]["role"] != "user":
            raise DataError("the prompt must end with the user's turn", field=f"prompt[{len(prompt) - 1}].role")
        return prompt, conversational_completion(row.get("completion")), label
    user = non_blank(get_text(row, "prompt"), "prompt", "prompt")
    completion = non_blank(get_text(row, "completion"), "completion", "completion")
    return ({"role": "user", "content": user},), completion, label


def load_feedback(path: str | Path, *, on_error: str = "fail") -> LoadResult:
    """The feedback examples of the json-lines file ``path`` (see the module docstring for forms and checks)."""

    def convert(row: dict[str, Any], number: int) -> FeedbackExample:
        return FeedbackExample(*convert_feedback(row), source=f"{path}:{number}")

    examples, skipped = load_json_lines(path, convert, on_error=on_error)
    return checked_load(Path(path), LoadResult(examples, skipped))


def feedback_from_pairs(pairs: Sequence[PreferenceExample]) -> list[FeedbackExample]:
    """Each pair as two examples, in order: its chosen reply desirable, its rejected reply undesirable."""
    return [
        FeedbackExample(pair.prompt, reply, desirable, pair.source)
        for pair in pairs
        for reply, desirable in ((pair.chosen, True), (pair.rejected, False))
    ]


def feedback_of(items: Sequence[FeedbackExample | PreferenceExample]) -> list[FeedbackExample]:
    """Feedback examples as they are, and each preference pair as its two (:func:`feedback_from_pairs`)."""
    return [
        example
        for item in items
        for example in (feedback_from_pairs([item]) if isinstance(item, PreferenceExample) else [item])
    ]


# data.kind -> the reader of its files (pairs become feedback per split: :func:`feedback_of`)
FEEDBACK_READERS: dict[str, Callable[..., LoadResult]] = {
    "feedback": load_feedback,
    "preference": load_preferences,
}


def thin_to_share(examples: list[FeedbackExample], share: float, seed: int) -> list[FeedbackExample]:
    """``examples`` with a seeded random subset of the over-represented label dropped, so that ``share`` of those
    kept are desirable (``floor``: at most that many of the thinned label); order is kept."""
    desirable = [i for i, example in enumerate(examples) if example.desirable]
    undesirable = [i for i, example in enumerate(examples) if not example.desirable]
    if len(desirable) > share * len(examples):
        thinned, other, ratio = desirable, undesirable, share / (1 - share)
    else:
        thinned, other, ratio = undesirable, desirable, (1 - share) / share
    keep = math.floor(round(ratio * len(other), 6))  # 0.6 / 0.4 * 10 is 14.999...: rounded first
    generator = torch.Generator().manual_seed(seed)
    kept = {thinned[i] for i in torch.randperm(len(thinned), generator=generator)[:keep].tolist()} | set(other)
    return [example for i, example in enumerate(examples) if i in kept]


def encode_feedback(tokenizer: Any, example: FeedbackExample, max_length: int) -> dict[str, Any] | None:
    """``{"completion": template(prompt + [assistant: completion]), "desirable"}`` truncated to ``max_length``
    with the prompt tokens labelled -100 (as SFT); ``None`` when the prompt fills ``max_length``."""
    encoded = encode_example(tokenizer, ChatExample(example.prompt, example.completion, example.source), max_length)
    return None if encoded is None else {"completion": encoded, "desirable": example.desirable}


def prompt_ids(example: EncodedExample) -> list[int]:
    return example.input_ids[: example.prompt_length]


def mismatched(prompt: EncodedExample, reply: EncodedExample, max_length: int) -> EncodedExample:
    """``prompt``'s prompt tokens followed by ``reply``'s completion tokens (labelled), cut to ``max_length``: the
    chat template of ``prompt``'s conversation answered with ``reply``'s completion."""
    input_ids = (prompt_ids(prompt) + reply.input_ids[reply.prompt_length :])[:max_length]
    labels = ([IGNORE_INDEX] * prompt.prompt_length + reply.labels[reply.prompt_length :])[:max_length]
    return EncodedExample(input_ids, labels, prompt.prompt_length, prompt.question, reply.response, prompt.source)


def partner(examples: Sequence[EncodedExample], index: int) -> int:
    """The next example after ``index`` (cyclically) whose prompt differs, or the next one when all share it."""
    count = len(examples)
    for step in range(1, count):
        other = (index + step) % count
        if prompt_ids(examples[other]) != prompt_ids(examples[index]):
            return other
    return (index + 1) % count


def with_mismatched(items: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Each encoded item with its ``mismatched`` row (its prompt, the completion of its :func:`partner`) and its
    ``index`` in the split."""
    completions = [item["completion"] for item in items]
    return [
        {**item, "mismatched": mismatched(completions[i], completions[partner(completions, i)], max_length), "index": i}
        for i, item in enumerate(items)
    ]


class FeedbackCollator(PreferenceCollator):
    """One batch of 2N rows: the N completions, then the N mismatched rows in the same order (row ``i`` and row
    ``N + i`` share a prompt), with ``desirable`` [N] (bool) and ``index`` [N]."""

    ROWS = ("completion", "mismatched")

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(items)
        batch["desirable"] = torch.tensor([item["desirable"] for item in items], dtype=torch.bool)
        return batch
