"""Converters from published data formats to ``(prompt messages, response)``.

Each converter takes one row (a mapping) and raises :class:`tunelab.errors.DataError` naming the field on a
missing field, a wrong type, an empty answer or an unknown role; the loader adds the file and line.

- ``alpaca``: ``instruction`` (+ optional ``input``, appended after a blank line; optional ``system``) ->
  ``output``.
- ``messages``: ``messages`` = [{role, content}] or ShareGPT ``conversations`` = [{from, value}]; the last
  turn must be the assistant's (supervised), the turn before it the user's.
- ``medqa``: ``question`` + ``options`` (dict letter -> text, or a list) + ``answer_idx`` (-> ``answer``):
  the response is ``"<letter>. <option text>"``.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from typing import Any

from tunelab.errors import DataError

Message = dict[str, str]
Converted = tuple[tuple[Message, ...], str]
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
MEDQA_INSTRUCTION = "Answer with the letter and the text of the correct option."


def required_text(row: Mapping[str, Any], field: str) -> str:
    """The stripped, non-empty string in ``row[field]``."""
    value = row.get(field)
    if value is None:
        raise DataError("missing field", field=field)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=field)
    if not value.strip():
        raise DataError("empty text", field=field)
    return value.strip()


def optional_text(row: Mapping[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=field)
    return value.strip()


def convert_alpaca(row: Mapping[str, Any]) -> Converted:
    instruction = required_text(row, "instruction")
    extra = optional_text(row, "input")
    system = optional_text(row, "system")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    prompt = ({"role": "system", "content": system},) if system else ()
    return (*prompt, {"role": "user", "content": user}), required_text(row, "output")


def convert_messages(row: Mapping[str, Any]) -> Converted:
    field, role_key, content_key = "messages", "role", "content"
    if row.get("messages") is None and row.get("conversations") is not None:
        field, role_key, content_key = "conversations", "from", "value"
    turns = row.get(field)
    if not isinstance(turns, list) or not turns:
        raise DataError("expected a non-empty list of turns", field="messages")
    messages: list[Message] = []
    for index, turn in enumerate(turns):
        where = f"{field}[{index}]"
        if not isinstance(turn, Mapping):
            raise DataError(f"expected an object, got {type(turn).__name__}", field=where)
        raw_role = turn.get(role_key)
        role = SHAREGPT_ROLES.get(raw_role) if field == "conversations" else raw_role
        if role not in ROLES:
            raise DataError(f"unknown role {raw_role!r}; expected one of {list(ROLES)}", field=f"{where}.{role_key}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise DataError("missing or non-string content", field=f"{where}.{content_key}")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise DataError("the last turn must be the assistant's answer", field=f"{field}[{len(messages) - 1}]")
    if not messages[-1]["content"].strip():
        raise DataError("empty answer", field=f"{field}[{len(messages) - 1}].{content_key}")
    if len(messages) < 2 or messages[-2]["role"] != "user":
        raise DataError("the turn before the answer must be the user's", field=field)
    return tuple(messages[:-1]), messages[-1]["content"].strip()


def medqa_options(row: Mapping[str, Any]) -> dict[str, str]:
    options = row.get("options")
    if isinstance(options, list):
        options = dict(zip(string.ascii_uppercase, options, strict=False))
    if not isinstance(options, Mapping) or not options:
        raise DataError("expected a non-empty object of letter -> option text", field="options")
    cleaned = {}
    for key, text in options.items():
        if text is None:
            continue
        if not isinstance(text, str) or not text.strip():
            raise DataError("empty option text", field=f"options.{key}")
        cleaned[str(key)] = text.strip()
    return cleaned


def convert_medqa(row: Mapping[str, Any]) -> Converted:
    question = required_text(row, "question")
    options = medqa_options(row)
    answer_idx = required_text(row, "answer_idx")
    if answer_idx not in options:
        raise DataError(f"{answer_idx!r} is not an option; valid keys: {sorted(options)}", field="answer_idx")
    answer = optional_text(row, "answer")
    if answer and answer != options[answer_idx]:
        raise DataError(f"{answer!r} differs from options[{answer_idx!r}] = {options[answer_idx]!r}", field="answer")
    lines = [question, "", *(f"{key}. {text}" for key, text in options.items()), "", MEDQA_INSTRUCTION]
    return ({"role": "user", "content": "\n".join(lines)},), f"{answer_idx}. {options[answer_idx]}"


FORMATS: dict[str, Callable[[Mapping[str, Any]], Converted]] = {
    "alpaca": convert_alpaca,
    "messages": convert_messages,
    "medqa": convert_medqa,
}
