"""The one internal record shape every data format converts into."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatExample:
    """One supervised example: the conversation so far (prompt) and the assistant answer to learn."""

    prompt: tuple[dict[str, str], ...]  # {"role": system|user|assistant, "content": str}; ends with user
    response: str  # non-empty assistant answer: the only supervised text
    source: str  # "path:line" (json lines; csv: its first line) or "path:record N" (parquet, json array), for errors
