"""Labeled texts for classification: local record files or the Financial PhraseBank ``sentence@label`` format.

- ``jsonl``: records with a text field and a label field (names are knobs), read as the file's suffix says,
  like every record file (:func:`tunelab.data.loading.line_rows`): ``.jsonl`` / ``.json`` one JSON object per
  line, ``.csv`` a header row naming the columns, then one record per row (cells are text as written).
- ``phrasebank``: one ``<sentence>@<label>`` per line (the split is at the last ``@``), as in the Financial
  PhraseBank files ``Sentences_50Agree.txt`` ... ``Sentences_AllAgree.txt``, which are ISO-8859-1 encoded.

Lines end at ``\\n``, ``\\r\\n`` or a lone ``\\r``; blank lines are not records. Every record is checked in order.
Problems are counted per kind in :attr:`LabeledLoad.report`. Record errors: ``label outside the label set``,
``empty text`` and ``malformed record`` (not UTF-8, invalid JSON or CSV, not a JSON object, a missing field, a
text that is not a string, a phrasebank line without ``@``); ``on_error``: ``fail`` stops with the file, line
and field; ``skip`` drops and counts them and lists their located reasons in :attr:`LabeledLoad.skipped`.
``duplicate text`` (the same whitespace-collapsed text again) is governed by ``duplicates``: ``drop`` (first
kept, counted), ``keep`` (counted) or ``fail``. A file that cannot be read record by record (missing, an
unsupported suffix, a JSON array, a bad csv header) fails under both policies.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.data.loading import WARN_REASONS, Row, line_rows, no_examples, skip_or_fail, text_lines
from tunelab.errors import ConfigError, DataError

log = logging.getLogger("tunelab.data")

FORMATS = ("jsonl", "phrasebank")
ON_ERROR = ("fail", "skip")
DUPLICATES = ("drop", "keep", "fail")
PHRASEBANK_ENCODING = "iso-8859-1"
PROBLEMS = ("label outside the label set", "empty text", "duplicate text", "malformed record")
SKIP_FIX = " (data.on_error=skip drops and counts such records)"
Fields = tuple[object, object] | DataError  # (text, label) of a record, or why its line is not one


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
    skipped: list[str] = field(default_factory=list)  # one located message per record dropped under on_error=skip


def _fields(row: Row, text_field: str, label_field: str) -> Fields:
    if isinstance(row, DataError):
        return row
    for name in (text_field, label_field):
        if name not in row:
            return DataError(f"missing field (keys: {sorted(row)})", field=name)
    return row[text_field], row[label_field]


def _record_rows(path: Path, text_field: str, label_field: str) -> Iterator[tuple[int, Fields]]:
    for number, row in line_rows(path):
        yield number, _fields(row, text_field, label_field)


def _phrasebank_rows(path: Path) -> Iterator[tuple[int, Fields]]:
    for number, line in text_lines(path, PHRASEBANK_ENCODING):
        if not line.strip():
            continue
        if "@" not in line:
            yield number, DataError("expected '<sentence>@<label>' (no '@' on the line)", field="label")
            continue
        text, label = line.rstrip("\r\n").rsplit("@", 1)
        yield number, (text, label.strip())


def _problem(fields: Fields, labels: Sequence[str], text_field: str, label_field: str) -> tuple[str, DataError] | None:
    """(kind, unlocated error) of a record error, or None."""
    if isinstance(fields, DataError):
        return PROBLEMS[3], fields
    text, label = fields
    if text is None or (isinstance(text, str) and not text.strip()):
        return PROBLEMS[1], DataError(f"{PROBLEMS[1]}: no text", field=text_field)
    if not isinstance(text, str):
        return PROBLEMS[3], DataError(f"expected a string, got {type(text).__name__}", field=text_field)
    if label not in labels:
        return PROBLEMS[0], DataError(f"{PROBLEMS[0]}: {label!r} not in {list(labels)}", field=label_field)
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
    """The labeled examples of ``path`` (see module docstring for the checks and the policies); DataError when
    none is usable."""
    for name, value, choices in (("format", fmt, FORMATS), ("on_error", on_error, ON_ERROR)):
        if value not in choices:
            raise ConfigError(f"data.{name}={value!r} is not one of {list(choices)}")
    if duplicates not in DUPLICATES:
        raise ConfigError(f"data.duplicates={duplicates!r} is not one of {list(DUPLICATES)}")
    path = Path(path)
    rows = _phrasebank_rows(path) if fmt == "phrasebank" else _record_rows(path, text_field, label_field)
    result = LabeledLoad(examples=[], report=Counter(dict.fromkeys(PROBLEMS, 0)))
    seen: set[str] = set()
    for number, fields in rows:
        problem = _problem(fields, labels, text_field, label_field)
        if problem is not None:
            kind, error = problem
            skip_or_fail(path, error, on_error, result.skipped, line=number, fix=SKIP_FIX)
            result.report[kind] += 1
            continue
        text, label = fields
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
        raise no_examples(path, result.skipped)
    if any(result.report.values()):
        reasons = f"; skipped, e.g.: {'; '.join(result.skipped[:WARN_REASONS])}" if result.skipped else ""
        log.warning("%s: %d examples; %s%s", path, len(result.examples), dict(result.report), reasons)
    return result
