"""Batch collation: right-padded or packed training batches, left-padded prompts for generation, labeled texts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tunelab.data.tokenization import IGNORE_INDEX, EncodedExample


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool, multiple_of: int | None) -> torch.Tensor:
    length = max(len(row) for row in rows)
    if multiple_of:
        length = -(-length // multiple_of) * multiple_of
    padded = [
        ([value] * (length - len(row)) + list(row)) if left else (list(row) + [value] * (length - len(row)))
        for row in rows
    ]
    return torch.tensor(padded, dtype=torch.long)


class TrainingCollator:
    """``input_ids`` / ``attention_mask`` / ``labels`` right-padded to the longest row (or a multiple)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of

    def __call__(self, examples: Sequence[EncodedExample]) -> dict[str, torch.Tensor]:
        ids = [ex.input_ids for ex in examples]
        return {
            "input_ids": _pad(ids, self.pad_token_id, False, self.pad_to_multiple_of),
            "attention_mask": _pad([[1] * len(r) for r in ids], 0, False, self.pad_to_multiple_of),
            "labels": _pad([ex.labels for ex in examples], IGNORE_INDEX, False, self.pad_to_multiple_of),
        }


class PackedCollator:
    """A padding-free training batch: the micro-batch's examples concatenated into one row ``[1, total]``, with
    ``position_ids`` restarting at 0 for each example and no attention mask. transformers builds a
    block-diagonal causal mask from such position ids, so no token attends to another example and each example
    sees the positions it would see alone; ``segment_lengths`` (a list of ints, kept on the host) lets segment
    attention (``tunelab.models.segment_attention``) skip the masked blocks. Each example's first label is -100:
    unpacked, the first token is never a target, and packed, the previous example's last token must not learn to
    predict it."""

    def __call__(self, examples: Sequence[EncodedExample]) -> dict[str, torch.Tensor | list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for ex in examples:
            ids += ex.input_ids
            labels += [IGNORE_INDEX, *ex.labels[1:]]
            positions += range(len(ex.input_ids))
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "segment_lengths": [len(ex.input_ids) for ex in examples],
        }


class GenerationCollator:
    """Left-padded prompts (so generation appends at the same position) plus the reference answers."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[EncodedExample]) -> dict[str, object]:
        prompts = [ex.input_ids[: ex.prompt_length] for ex in examples]
        return {
            "prompt_input_ids": _pad(prompts, self.pad_token_id, True, None),
            "prompt_attention_mask": _pad([[1] * len(p) for p in prompts], 0, True, None),
            "questions": [ex.question for ex in examples],
            "references": [ex.response for ex in examples],
        }


@dataclass(frozen=True)
class EncodedLabeled:
    input_ids: list[int]
    label: int


class ClassificationCollator:
    """``input_ids`` / ``attention_mask`` right-padded to the longest row (or a multiple), and class ``labels``."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of

    def __call__(self, examples: Sequence[EncodedLabeled]) -> dict[str, torch.Tensor]:
        ids = [ex.input_ids for ex in examples]
        return {
            "input_ids": _pad(ids, self.pad_token_id, False, self.pad_to_multiple_of),
            "attention_mask": _pad([[1] * len(r) for r in ids], 0, False, self.pad_to_multiple_of),
            "labels": torch.tensor([ex.label for ex in examples], dtype=torch.long),
        }
