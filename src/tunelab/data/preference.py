"""Preference pairs (a prompt, a chosen and a rejected reply) from local json lines, for reward modelling and DPO.

Two record forms, one JSON object per line:

- plain: ``{"prompt": str, "chosen": str, "rejected": str}``; the prompt becomes one user turn.
- messages: ``{"chosen": [turns], "rejected": [turns]}`` with turns ``{"role": system|user|assistant,
  "content": str}``, optionally with ``"prompt": [turns]`` (then ``chosen`` / ``rejected`` hold only what
  follows the prompt, as in trl's explicit-prompt format). ``prompt + chosen`` and ``prompt + rejected`` must
  each end with one assistant turn (the reply) preceded by the same turns (the shared prompt, ending with a
  user turn).

Record errors name the file, the line and the field: a missing or mistyped field, an empty reply, a chosen
reply equal to the rejected one, conversations that do not share the prompt or do not end with an assistant
turn; and a line that is not a JSON object (not UTF-8, invalid JSON, another JSON value). ``on_error="fail"``
raises the first; ``"skip"`` drops bad records, lists them in :attr:`LoadResult.skipped` and warns. A missing file
or a JSON array fails under both policies, as in :mod:`tunelab.data.loading`.

Encoding renders ``prompt + [assistant: reply]`` with the tokenizer's chat template for each reply, exactly as
SFT does (:func:`tunelab.data.tokenization.encode_example`): prompt tokens are labelled -100.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.data.collate import TrainingCollator
from tunelab.data.formats import ROLES, Message, get_text, non_blank
from tunelab.data.loading import LoadResult, checked_load, load_json_lines
from tunelab.data.records import ChatExample
from tunelab.data.tokenization import EncodedExample, encode_example
from tunelab.errors import DataError

log = logging.getLogger("tunelab.data")


@dataclass(frozen=True)
class PreferenceExample:
    prompt: tuple[Message, ...]  # shared conversation before the reply; ends with a user turn
    chosen: str  # preferred assistant reply (stripped, non-empty)
    rejected: str  # dispreferred assistant reply (stripped, non-empty, != chosen)
    line: int  # 1-based line of the file
    source: str  # "path:line", for errors


def parse_turns(value: Any, name: str) -> list[Message]:
    """A list of ``{role, content}`` turns; errors name ``name[i].role`` / ``name[i].content``."""
    if not isinstance(value, list) or not value:
        raise DataError("expected a non-empty list of {role, content} turns", field=name)
    parsed = []
    for index, turn in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(turn, Mapping):
            raise DataError("expected an object with 'role' and 'content'", field=where)
        if turn.get("role") not in ROLES:
            raise DataError(f"unknown role {turn.get('role')!r}; expected one of {list(ROLES)}", field=f"{where}.role")
        parsed.append({"role": turn["role"], "content": get_text(turn, "content", f"{where}.content")})
    return parsed


def _reply(prompt: list[Message], row: Mapping[str, Any], name: str) -> tuple[list[Message], str]:
    """(turns before the reply, reply) of ``prompt + row[name]``, which must end with an assistant turn."""
    turns = parse_turns(row.get(name), name)
    last = f"{name}[{len(turns) - 1}]"
    if turns[-1]["role"] != "assistant":
        raise DataError(
            f"the conversation must end with the assistant's reply, got {turns[-1]['role']!r}", field=f"{last}.role"
        )
    return prompt + turns[:-1], non_blank(turns[-1]["content"], f"{last}.content", f"{name} reply")


def _from_messages(row: Mapping[str, Any]) -> tuple[tuple[Message, ...], str, str]:
    """(shared prompt, chosen reply, rejected reply) of a messages-form record."""
    prompt = parse_turns(row["prompt"], "prompt") if row.get("prompt") is not None else []
    shared, chosen = _reply(prompt, row, "chosen")
    rejected_prompt, rejected = _reply(prompt, row, "rejected")
    if rejected_prompt != shared:
        differ = next((i for i, (a, b) in enumerate(zip(shared, rejected_prompt, strict=False)) if a != b), None)
        where = f"differ at turn {differ}" if differ is not None else "have different numbers of turns"
        raise DataError(f"chosen and rejected do not share the prompt turns (they {where})", field="rejected")
    if not shared or shared[-1]["role"] != "user":
        raise DataError("the turn before the assistant's reply must be the user's", field="chosen")
    return tuple(shared), chosen, rejected


def convert_preference(row: Mapping[str, Any]) -> tuple[tuple[Message, ...], str, str]:
    """(prompt turns, chosen reply, rejected reply) of one record of either form; DataError naming the field."""
    if row.get("chosen") is None:
        raise DataError("missing field", field="chosen")
    if isinstance(row["chosen"], list):
        prompt, chosen, rejected = _from_messages(row)
    else:
        user = non_blank(get_text(row, "prompt"), "prompt", "prompt")
        prompt = ({"role": "user", "content": user},)
        chosen = non_blank(get_text(row, "chosen"), "chosen", "chosen reply")
        rejected = non_blank(get_text(row, "rejected"), "rejected", "rejected reply")
    if chosen == rejected:
        raise DataError("the rejected reply equals the chosen one", field="rejected")
    return prompt, chosen, rejected


def load_preferences(path: str | Path, *, on_error: str = "fail") -> LoadResult:
    """The preference pairs of the json-lines file ``path`` (see the module docstring for forms and checks)."""

    def convert(row: dict[str, Any], number: int) -> PreferenceExample:
        return PreferenceExample(*convert_preference(row), line=number, source=f"{path}:{number}")

    examples, skipped = load_json_lines(path, convert, on_error=on_error)
    return checked_load(Path(path), LoadResult(examples, skipped))


def encode_preference(tokenizer: Any, example: PreferenceExample, max_length: int) -> dict[str, EncodedExample] | None:
    """``{"chosen": ..., "rejected": ...}``, each ``template(prompt + [assistant: reply])`` truncated to
    ``max_length`` with the prompt tokens labelled -100 (as SFT); ``None`` when the prompt fills ``max_length``."""
    chosen = encode_example(tokenizer, ChatExample(example.prompt, example.chosen, example.source), max_length)
    if chosen is None:
        return None
    rejected = encode_example(tokenizer, ChatExample(example.prompt, example.rejected, example.source), max_length)
    return {"chosen": chosen, "rejected": rejected}


class PreferenceCollator:
    """One batch of 2B rows: the B chosen rows, then the B rejected rows in the same order, so row ``i`` and row
    ``B + i`` are a pair. ``input_ids`` / ``attention_mask`` / ``labels`` right-padded as :class:`TrainingCollator`;
    ``index`` [B] passes through pairs' ``index`` where they carry one. ``ROWS`` names the items' two rows.
    """

    ROWS = ("chosen", "rejected")

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.rows = TrainingCollator(pad_token_id, pad_to_multiple_of)

    def __call__(self, pairs: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        first, second = self.ROWS
        batch = self.rows([pair[first] for pair in pairs] + [pair[second] for pair in pairs])
        if "index" in pairs[0]:  # the pair's position in its split (cached reference log-probs are looked up by it)
            batch["index"] = torch.tensor([pair["index"] for pair in pairs])
        return batch
