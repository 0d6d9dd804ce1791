"""Multiple-choice records for evaluation: every option scored as the answer, and the prompt for generation.

An SFT example whose record carries options (``ChatExample.choices``, e.g. the ``medqa`` format) is encoded as
:class:`EncodedChoices`: the training example itself (the right option as the answer, as every example) plus
its prompt and options. :class:`ChoiceCollator` turns a batch of them into

- one teacher-forced row per (question, option): exactly the training encoding of that question with that
  option's ``response`` as the answer (``tokenization.encode_example``: chat template of prompt + assistant turn,
  truncated to ``max_length``, labels -100 on the prompt), so an option's score is the log-probability of the
  tokens the model would be trained to emit had that option been right;
- the left-padded prompts, for the greedy answer whose stated letter is parsed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.data.collate import GenerationCollator, TrainingCollator
from tunelab.data.records import ChatExample, MultipleChoice
from tunelab.data.tokenization import EncodedExample, encode_example


@dataclass(frozen=True)
class EncodedChoices(EncodedExample):
    """An encoded training example (its right option as the answer) that keeps its prompt and options."""

    prompt: tuple[dict[str, str], ...]
    choices: MultipleChoice


def encode_sft_example(tokenizer: Any, example: ChatExample, max_length: int) -> EncodedExample | None:
    """``encode_example``, as :class:`EncodedChoices` when the record carries options."""
    encoded = encode_example(tokenizer, example, max_length)
    if encoded is None or example.choices is None:
        return encoded
    return EncodedChoices(**vars(encoded), prompt=example.prompt, choices=example.choices)


class ChoiceCollator:
    """A batch of :class:`EncodedChoices` -> option rows (question-major) and prompts.

    Keys: ``choice_rows``, the option rows (one per option of each question, in order) as consecutive
    ``{input_ids, attention_mask, labels}`` batches of at most ``rows_per_forward`` right-padded rows;
    ``choice_chars`` (characters of each row's ``response``), ``answers`` (index of the right option per
    question), ``options`` ((letter, text) per option, per question), and :class:`GenerationCollator`'s
    ``prompt_input_ids`` / ``prompt_attention_mask`` / ``questions`` / ``references``, so one batch's questions
    are answered in one generation call.
    """

    def __init__(
        self, tokenizer: Any, max_length: int, rows_per_forward: int, pad_to_multiple_of: int | None = None
    ) -> None:
        self.tokenizer, self.max_length, self.rows_per_forward = tokenizer, max_length, rows_per_forward
        self.rows = TrainingCollator(tokenizer.pad_token_id, pad_to_multiple_of)
        self.prompts = GenerationCollator(tokenizer.pad_token_id)

    def option_rows(self, example: EncodedChoices) -> list[EncodedExample]:
        """The training encoding of ``example`` with each option's response as the answer, in option order."""
        # never None: the prompt is the training example's, which left room for an answer token
        return [
            encode_example(
                self.tokenizer, ChatExample(example.prompt, option.response, example.source), self.max_length
            )
            for option in example.choices.options
        ]

    def __call__(self, examples: Sequence[EncodedChoices]) -> dict[str, Any]:
        rows = [row for example in examples for row in self.option_rows(example)]
        return {
            "choice_rows": [
                self.rows(rows[start : start + self.rows_per_forward])
                for start in range(0, len(rows), self.rows_per_forward)
            ],
            "choice_chars": [len(option.response) for ex in examples for option in ex.choices.options],
            "answers": [ex.choices.answer_index for ex in examples],
            "options": [[(option.letter, option.text) for option in ex.choices.options] for ex in examples],
            **self.prompts(examples),
        }
