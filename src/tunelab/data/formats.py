"""Converters from published data formats to ``(prompt messages, response)``, or for a multiple-choice record
``(prompt messages, response, MultipleChoice)`` (its options; the right one's ``response`` is the record's).

Each converter takes one row (a mapping: a JSON object, a csv row or a ``datasets`` record) and raises
:class:`tunelab.errors.DataError` naming the field on a missing field, a wrong type, an empty answer or an
unknown role; the loader adds the file and line. A field whose value is ``None`` counts as missing
(``datasets`` fills the fields a parquet or JSON-array record lacks with ``None``).

- ``alpaca``: ``instruction`` (+ optional ``input``, appended after a blank line; optional ``system``) ->
  ``output``.
- ``messages``: ``messages`` = [{role, content}] or ShareGPT ``conversations`` = [{from, value}] with
  ``from`` in human / gpt / system; the last turn is the assistant's answer, the turn before it the user's.
- ``medqa``: ``question`` + ``options`` (letter -> text, or a list of texts lettered A, B, ...) +
  ``answer_idx`` (checked against ``answer`` when present) -> ``"<letter>. <option text>"``; multiple choice: every
  option's response is ``"<letter>. <option text>"``.

Each is a :class:`DataFormat` in :data:`FORMATS`; a plugin registers its own converter the same way.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tunelab.data.records import Choice, MultipleChoice
from tunelab.errors import DataError
from tunelab.registry import Registry

Message = dict[str, str]
Converted = tuple[tuple[Message, ...], str] | tuple[tuple[Message, ...], str, MultipleChoice]
Converter = Callable[[Mapping[str, Any]], Converted]

ROLES = ("system", "user", "assistant")
# conversation field -> (role key, content key, accepted role names -> our roles)
CHAT_STYLES: dict[str, tuple[str, str, dict[str, str]]] = {
    "messages": ("role", "content", {role: role for role in ROLES}),
    "conversations": ("from", "value", {"human": "user", "gpt": "assistant", "system": "system"}),
}
MEDQA_INSTRUCTION = "Answer with the letter and the text of the correct option."


def get_text(container: Mapping[str, Any], key: str, field: str | None = None, *, required: bool = True) -> str:
    """``container[key]`` as a string; ``None`` or absent is a missing field (``""`` when not required).

    ``field`` names the value in errors (default: ``key``), e.g. ``messages[2].content``.
    """
    field = field or key
    value = container.get(key)
    if value is None:
        if required:
            raise DataError("missing field", field=field)
        return ""
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=field)
    return value


def non_blank(text: str, field: str, what: str = "answer") -> str:
    """``text`` stripped; an empty or whitespace-only text is an error naming ``field``."""
    if not text.strip():
        raise DataError(f"empty {what} (blank or whitespace only)", field=field)
    return text.strip()


def convert_alpaca(row: Mapping[str, Any]) -> Converted:
    """Alpaca: instruction (+ input after a blank line) as the user turn, optional system, output."""
    instruction = non_blank(get_text(row, "instruction"), "instruction", "instruction")
    extra = get_text(row, "input", required=False).strip()
    system = get_text(row, "system", required=False).strip()
    user = f"{instruction}\n\n{extra}" if extra else instruction
    prompt = ({"role": "system", "content": system},) if system else ()
    return (*prompt, {"role": "user", "content": user}), non_blank(get_text(row, "output"), "output")


def convert_messages(row: Mapping[str, Any]) -> Converted:
    """Chat turns (``messages`` or ShareGPT ``conversations``): all but the last are the prompt."""
    field = "conversations" if row.get("messages") is None and row.get("conversations") is not None else "messages"
    role_key, content_key, roles = CHAT_STYLES[field]
    turns = row.get(field)
    if turns is None:
        raise DataError("missing field (or ShareGPT 'conversations')", field=field)
    if not isinstance(turns, list) or not turns:
        raise DataError("expected a non-empty list of turns", field=field)
    messages: list[Message] = []
    for index, turn in enumerate(turns):
        where = f"{field}[{index}]"
        if not isinstance(turn, Mapping):
            raise DataError(f"expected an object with {role_key!r} and {content_key!r}", field=where)
        role = turn.get(role_key)
        if role not in roles:
            raise DataError(f"unknown role {role!r}; expected one of {list(roles)}", field=f"{where}.{role_key}")
        content = get_text(turn, content_key, f"{where}.{content_key}")
        messages.append({"role": roles[role], "content": content})
    *prompt, last = messages
    last_field = f"{field}[{len(messages) - 1}]"
    if last["role"] != "assistant":
        raise DataError(f"the last turn must be the assistant's answer, got {last['role']!r}", field=last_field)
    if not prompt or prompt[-1]["role"] != "user":
        raise DataError("the turn before the assistant's answer must be the user's", field=field)
    return tuple(prompt), non_blank(last["content"], f"{last_field}.{content_key}")


def medqa_options(row: Mapping[str, Any]) -> dict[str, str]:
    """Letter -> stripped option text; a list is lettered A, B, ...; ``None`` values are absent options
    (arrow fills the letters other rows have with ``None``)."""
    options = row.get("options")
    if isinstance(options, list) and len(options) <= len(string.ascii_uppercase):
        options = dict(zip(string.ascii_uppercase, options, strict=False))
    if not isinstance(options, Mapping) or not options:
        raise DataError("expected a non-empty object of letter -> text, or a list of up to 26 texts", field="options")
    return {
        str(key): non_blank(get_text(options, key, f"options.{key}"), f"options.{key}", "option text")
        for key, text in options.items()
        if text is not None
    }


def convert_medqa(row: Mapping[str, Any]) -> Converted:
    """MedQA: the question and lettered options as the user turn; ``"<answer_idx>. <option>"``; the options as
    multiple choice, each answered ``"<letter>. <option>"``."""
    question = non_blank(get_text(row, "question"), "question", "question")
    options = medqa_options(row)
    answer_idx = get_text(row, "answer_idx").strip()
    if answer_idx not in options:
        raise DataError(f"{answer_idx!r} is not an option; valid keys: {list(options)}", field="answer_idx")
    answer = get_text(row, "answer", required=False).strip()
    if answer and answer != options[answer_idx]:
        raise DataError(f"{answer!r} does not match options[{answer_idx!r}] = {options[answer_idx]!r}", field="answer")
    lines = [question, *(f"{key}. {text}" for key, text in options.items()), MEDQA_INSTRUCTION]
    choices = tuple(Choice(key, text, f"{key}. {text}") for key, text in options.items())
    prompt = ({"role": "user", "content": "\n".join(lines)},)
    return prompt, f"{answer_idx}. {options[answer_idx]}", MultipleChoice(choices, answer_idx)


@dataclass(frozen=True)
class DataFormat:
    """One ``data.format`` of instruction data: ``convert(row) -> (prompt messages, response)``, plus the record's
    :class:`MultipleChoice` as a third item when it has options."""

    name: str
    convert: Converter


FORMATS: Registry[DataFormat] = Registry("data.format")
for entry in (
    DataFormat("alpaca", convert_alpaca),
    DataFormat("messages", convert_messages),
    DataFormat("medqa", convert_medqa),
):
    FORMATS.register(entry)
