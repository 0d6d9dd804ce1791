"""Render chat examples with the tokenizer's chat template and mask the prompt from the loss.

Contract: ``input_ids`` = template(prompt + [assistant: response]); ``labels`` equal ``input_ids`` on the
response tokens (including the template's end-of-turn tokens, so the model learns to stop) and -100 on
every prompt token. The prompt is rendered with ``add_generation_prompt=True``, exactly as at inference,
and must be a token prefix of the full conversation; a template for which it is not fails loudly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.data.records import ChatExample
from tunelab.errors import ConfigError, DataError

log = logging.getLogger("tunelab.data")

IGNORE_INDEX = -100
OVERFLOW_POLICIES = ("drop", "fail")


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    question: str  # the last user turn, for reports
    response: str
    source: str


def render_prompt_ids(tokenizer: Any, prompt: tuple[dict[str, str], ...]) -> list[int]:
    """Token ids of the prompt followed by the assistant header, as the model sees it at inference."""
    return list(tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, return_dict=False))


def encode_example(tokenizer: Any, example: ChatExample, max_length: int) -> EncodedExample | None:
    """Encode one example; ``None`` when truncation to ``max_length`` leaves no supervised token."""
    prompt_ids = render_prompt_ids(tokenizer, example.prompt)
    conversation = [*example.prompt, {"role": "assistant", "content": example.response}]
    full_ids = list(tokenizer.apply_chat_template(conversation, return_dict=False))
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(
            "the chat template renders the prompt differently with and without the answer, so the "
            "prompt cannot be masked; set model.chat_template to a template where it is a prefix",
            file=example.source,
        )
    if len(prompt_ids) >= max_length:
        return None
    input_ids = full_ids[:max_length]
    labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids) :]
    question = example.prompt[-1]["content"]
    return EncodedExample(input_ids, labels, len(prompt_ids), question, example.response, example.source)


def encode_examples(
    tokenizer: Any,
    examples: Sequence[Any],
    max_length: int,
    on_overflow: str = "drop",
    encode: Callable[[Any, Any, int], Any] = encode_example,
) -> tuple[list[Any], list[str]]:
    """``encode(tokenizer, example, max_length)`` of every example (ChatExamples by default) whose prompt leaves
    room for an answer token; the others (``encode`` returns None) are dropped (counted) or fail, per policy.
    Errors name ``example.source`` ("path:line")."""
    if on_overflow not in OVERFLOW_POLICIES:
        raise ConfigError(f"data.on_overflow={on_overflow!r} is not one of {list(OVERFLOW_POLICIES)}")
    encoded: list[Any] = []
    dropped: list[str] = []
    for example in examples:
        item = encode(tokenizer, example, max_length)
        if item is not None:
            encoded.append(item)
            continue
        reason = f"{example.source}: prompt fills data.max_length={max_length} tokens, no answer token is left"
        if on_overflow == "fail":
            raise DataError(f"prompt is longer than the context (data.max_length={max_length})", file=example.source)
        dropped.append(reason)
    if dropped:
        log.warning(
            "Dropped %d of %d examples with no supervised token left; first: %s",
            len(dropped),
            len(examples),
            dropped[0],
        )
    return encoded, dropped
