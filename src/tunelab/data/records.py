"""The one internal record shape every data format converts into."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    """One option of a multiple-choice record."""

    letter: str  # its label in the prompt, e.g. "B"
    text: str  # the option text, e.g. "Vitamin C"
    response: str  # the assistant answer that picks it, as its format trains it (medqa: "B. Vitamin C")


@dataclass(frozen=True)
class MultipleChoice:
    """The options of a multiple-choice record and the letter of the right one (its ``response`` is the record's)."""

    options: tuple[Choice, ...]
    answer: str

    @property
    def answer_index(self) -> int:
        """Position of the right option in ``options``."""
        return [option.letter for option in self.options].index(self.answer)


@dataclass(frozen=True)
class ChatExample:
    """One supervised example: the conversation so far (prompt) and the assistant answer to learn."""

    prompt: tuple[dict[str, str], ...]  # {"role": system|user|assistant, "content": str}; ends with user
    response: str  # non-empty assistant answer: the only supervised text
    source: str  # "path:line" (json lines; csv: its first line) or "path:record N" (parquet, json array), for errors
    choices: MultipleChoice | None = None  # a multiple-choice record's options (its answer's response is `response`)
