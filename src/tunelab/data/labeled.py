"""Labeled texts for classification: local json lines or the Financial PhraseBank ``sentence@label`` format.

- ``jsonl``: one JSON object per line with a text field and a label field (names are knobs).
- ``phrasebank``: one ``<sentence>@<label>`` per line (the split is at the last ``@``), as in the Financial
  PhraseBank files ``Sentences_50Agree.txt`` ... ``Sentences_AllAgree.txt``, which are ISO-8859-1 encoded.

Every record is checked in order. Problems are counted per kind in :attr:`LabeledLoad.report`:
``label outside the label set`` and ``empty text`` are record errors (``on_error``: ``fail`` stops with the
file, line and field; ``skip`` drops and counts them); ``duplicate text`` (the same whitespace-collapsed text
again) is governed by ``duplicates``: ``drop`` (first kept, counted), ``keep`` (counted) or ``fail``.
A line that is not a JSON object, or a phrasebank line without ``@``, always fails: the file is malformed.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import ConfigError, DataError

log = logging.getLogger("tunelab.data")

FORMATS = ("jsonl", "phrasebank")
ON_ERROR = ("fail", "skip")
DUPLICATES = ("drop", "keep", "fail")
PHRASEBANK_ENCODING = "iso-8859-1"
PROBLEMS = ("label outside the label set", "empty text", "duplicate text")


@dataclass(frozen=True)
class LabeledExample:
    text: str
    label: int  # index into the label set
    line: int  # 1-based line in ``source``
    source: str


@dataclass
class LabeledLoad:
    examples: list[LabeledExample]
    report: Counter[str] = field(default_factory=Counter)  # problem kind -> records affected


def _jsonl_rows(path: Path, text_field: str, label_field: str) -> Iterator[tuple[int, object, object]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise DataError(f"invalid JSON: {error}", file=str(path), line=number) from None
            if not isinstance(row, dict):
                raise DataError(f"expected a JSON object, got {type(row).__name__}", file=str(path), line=number)
            for name in (text_field, label_field):
                if name not in row:
                    raise DataError(f"missing field (keys: {sorted(row)})", file=str(path), line=number, field=name)
            yield number, row[text_field], row[label_field]


def _phrasebank_rows(path: Path) -> Iterator[tuple[int, object, object]]:
    with open(path, encoding=PHRASEBANK_ENCODING) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            if "@" not in line:
                raise DataError("expected '<sentence>@<label>'", file=str(path), line=number, field="label")
            text, label = line.rstrip("\r\n").rsplit("@", 1)
            yield number, text, label.strip()


def _problem(text: object, label: object, labels: Sequence[str]) -> tuple[str, str] | None:
    """(kind, field) of a record error, or None."""
    if not isinstance(text, str) or not text.strip():
        return PROBLEMS[1], "text"
    if label not in labels:
        return PROBLEMS[0], "label"
    return None


def load_labeled(
    path: str | Path,
    fmt: str,
    labels: Sequence[str],
    *,
    on_error: str = "fail",
    duplicates: str = "drop",
    text_field: str = "text",
    label_field: str = "label",
) -> LabeledLoad:
    """The labeled examples of ``path`` (see module docstring for the checks and the policies)."""
    for name, value, choices in (("format", fmt, FORMATS), ("on_error", on_error, ON_ERROR)):
        if value not in choices:
            raise ConfigError(f"data.{name}={value!r} is not one of {list(choices)}")
    if duplicates not in DUPLICATES:
        raise ConfigError(f"data.duplicates={duplicates!r} is not one of {list(DUPLICATES)}")
    path = Path(path)
    rows = _phrasebank_rows(path) if fmt == "phrasebank" else _jsonl_rows(path, text_field, label_field)
    result = LabeledLoad(examples=[], report=Counter(dict.fromkeys(PROBLEMS, 0)))
    seen: set[str] = set()
    for number, text, label in rows:
        problem = _problem(text, label, labels)
        if problem is not None:
            kind, bad_field = problem
            if on_error == "fail":
                detail = f"{label!r} not in {list(labels)}" if kind == PROBLEMS[0] else "no text"
                raise DataError(
                    f"{kind}: {detail} (data.on_error=skip drops and counts such records)",
                    file=str(path),
                    line=number,
                    field=label_field if bad_field == "label" else text_field,
                )
            result.report[kind] += 1
            continue
        key = " ".join(str(text).split())
        if key in seen:
            result.report[PROBLEMS[2]] += 1
            if duplicates == "fail":
                raise DataError("duplicate text (data.duplicates=drop keeps the first)", file=str(path), line=number)
            if duplicates == "drop":
                continue
        seen.add(key)
        result.examples.append(LabeledExample(text=key, label=labels.index(label), line=number, source=str(path)))
    if not result.examples:
        raise DataError(f"no usable examples in {path} ({dict(result.report)})")
    if any(result.report.values()):
        log.warning("%s: %d examples; %s", path, len(result.examples), dict(result.report))
    return result
