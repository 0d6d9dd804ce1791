"""Prompts without answers, for reinforcement learning (task=ppo): the policy writes the completions.

One JSON object per line: ``{"prompt": str | [turns], ...any other fields}``. A string prompt becomes one user
turn; a list holds ``{"role": system|user|assistant, "content": str}`` turns ending with a user turn. The whole
row is kept as the example's ``record``: reward functions read what they need from it (a verifiable reward the
``answer`` and ``metadata``; a reward model the prompt itself, through :func:`prompt_turns`).

Record errors name the file, the line and the field (a missing, blank or mistyped prompt, an unknown role, a
conversation that does not end with the user's turn, a line that is not a JSON object: not UTF-8, invalid JSON,
another JSON value). ``on_error="fail"`` raises the first; ``"skip"`` drops bad records, lists them in
:attr:`LoadResult.skipped` and warns. A missing file or a JSON array fails under both policies, as in
:mod:`tunelab.data.loading`.

Encoding renders the prompt with the tokenizer's chat template and ``add_generation_prompt=True``, exactly as at
inference (:func:`tunelab.data.tokenization.render_prompt_ids`); a prompt longer than ``data.max_prompt_length``
tokens is dropped (counted, warned) or fails, per ``data.on_overflow``. Batches are left-padded, so generation
appends every completion at the same position.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.nn.utils.rnn import pad_sequence

from tunelab.data.datamodule import RecordDataModule
from tunelab.data.formats import Message, get_text, non_blank
from tunelab.data.loading import LoadResult, checked_load, load_json_lines
from tunelab.data.preference import parse_turns
from tunelab.data.tokenization import OVERFLOW_POLICIES, render_prompt_ids
from tunelab.errors import ConfigError, DataError

log = logging.getLogger("tunelab.data")
Example = TypeVar("Example")


@dataclass(frozen=True)
class PromptExample:
    prompt: tuple[Message, ...]  # the conversation so far; ends with a user turn
    record: dict[str, Any]  # the whole JSON row, as read (for the reward function)
    line: int  # 1-based line in the file
    source: str  # "path:line", for errors


@dataclass(frozen=True)
class EncodedPrompt:
    input_ids: list[int]  # template(prompt) followed by the assistant header
    record: dict[str, Any]
    source: str  # "path:line", for errors


def prompt_turns(row: Mapping[str, Any]) -> tuple[Message, ...]:
    """The prompt turns of a record (``row["prompt"]``: a string or turns ending with a user turn); DataError
    naming the field."""
    value = row.get("prompt")
    if isinstance(value, list):
        turns = parse_turns(value, "prompt")
        if turns[-1]["role"] != "user":
            last = f"prompt[{len(turns) - 1}].role"
            raise DataError(f"the prompt must end with the user's turn, got {turns[-1]['role']!r}", field=last)
        return tuple(turns)
    if value is not None and not isinstance(value, str):
        what = type(value).__name__
        raise DataError(f"expected a string or a list of {{role, content}} turns, got {what}", field="prompt")
    return ({"role": "user", "content": non_blank(get_text(row, "prompt"), "prompt", "prompt")},)


def load_prompts(path: str | Path, *, on_error: str = "fail") -> LoadResult:
    """The prompts of the json-lines file ``path`` (see the module docstring for the forms and checks)."""
    examples, skipped = load_json_lines(
        path, lambda row, line: PromptExample(prompt_turns(row), row, line, f"{path}:{line}"), on_error=on_error
    )
    return checked_load(Path(path), LoadResult(examples, skipped))


def encode_prompts(
    tokenizer: Any, examples: Sequence[PromptExample], max_prompt_length: int, on_overflow: str = "drop"
) -> tuple[list[EncodedPrompt], list[str]]:
    """Chat-template token ids of each prompt (with the generation prompt); those longer than
    ``max_prompt_length`` tokens are dropped (their located reasons returned) or fail, per ``on_overflow``."""
    if on_overflow not in OVERFLOW_POLICIES:
        raise ConfigError(f"data.on_overflow={on_overflow!r} is not one of {list(OVERFLOW_POLICIES)}")
    encoded: list[EncodedPrompt] = []
    dropped: list[str] = []
    for example in examples:
        ids = render_prompt_ids(tokenizer, example.prompt)
        if len(ids) <= max_prompt_length:
            encoded.append(EncodedPrompt(ids, example.record, example.source))
            continue
        reason = f"prompt of {len(ids)} tokens is longer than data.max_prompt_length={max_prompt_length}"
        if on_overflow == "fail":
            raise DataError(reason, file=example.source)
        dropped.append(f"{example.source}: {reason}")
    if dropped:
        log.warning("Dropped %d of %d prompts; first: %s", len(dropped), len(examples), dropped[0])
    return encoded, dropped


class PromptCollator:
    """``input_ids`` / ``attention_mask`` left-padded to the longest prompt, and the prompts' ``records``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, prompts: Sequence[EncodedPrompt]) -> dict[str, Any]:
        ids = [torch.tensor(prompt.input_ids, dtype=torch.long) for prompt in prompts]
        return {
            "input_ids": pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id, padding_side="left"),
            "attention_mask": pad_sequence(
                [torch.ones_like(row) for row in ids], batch_first=True, padding_value=0, padding_side="left"
            ),
            "records": [prompt.record for prompt in prompts],
        }


class PromptDataModule(RecordDataModule):
    """Encoded prompts in train / val / test splits; every loader yields :class:`PromptCollator` batches. Prompts
    longer than ``max_prompt_length`` tokens are dropped (counted) or fail."""

    def collator(self) -> PromptCollator:
        return PromptCollator(self.tokenizer.pad_token_id)

    def read(self, path: str | Path) -> LoadResult:
        return load_prompts(path, on_error=self.cfg.on_error)

    def encode(self, items: list[PromptExample]) -> tuple[list[EncodedPrompt], list[str]]:
        return encode_prompts(self.tokenizer, items, self.cfg.max_prompt_length, self.cfg.on_overflow)
