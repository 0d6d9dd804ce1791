"""Load local data files with ``datasets`` and convert every record into a :class:`ChatExample`.

Supported files: ``.jsonl`` / ``.json`` (json lines, or one json array), ``.csv`` (every column read as
text) and ``.parquet``. Errors name the file, the line (json lines) or record number (csv, parquet, json
array) and the field. ``on_error="fail"`` stops at the first bad record; ``"skip"`` drops bad records,
lists them in :attr:`LoadResult.skipped` and warns. A file that cannot be parsed at all (e.g. a malformed
json line) fails under both policies: the error names its first bad line.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from tunelab.data.formats import FORMATS
from tunelab.data.records import ChatExample
from tunelab.errors import ConfigError, DataError

log = logging.getLogger("tunelab.data")

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ON_ERROR = ("fail", "skip")
WARN_REASONS = 3  # skipped-record reasons quoted in the warning
Loaded = TypeVar("Loaded")
Item = TypeVar("Item")


@dataclass
class LoadResult(Generic[Item]):
    """The good examples of a file (ChatExamples, preference pairs, prompts, ...) and why the others were skipped."""

    examples: list[Item]
    skipped: list[str] = field(default_factory=list)  # one located message per skipped record


def no_examples(path: Path, skipped: list[str] | None = None) -> DataError:
    detail = f" ({len(skipped)} bad record(s) skipped, first: {skipped[0]})" if skipped else ""
    return DataError(f"no usable examples in {path}{detail}")


def nonblank_lines(path: Path) -> Iterable[tuple[int, bytes]]:
    """(1-based line number, line) for the non-blank lines: the records of a json-lines file, in order."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield number, line


def is_json_array(path: Path) -> bool:
    """Whether a .json/.jsonl file holds one json array (else it is read as json lines)."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"[")


def invalid_json(path: Path, error: ValueError, line: int | None) -> DataError:
    """A located "invalid JSON" error; ``line`` defaults to the decoder's line (json array files)."""
    if isinstance(error, json.JSONDecodeError):
        line = error.lineno if line is None else line
        return DataError(f"invalid JSON: {error.msg} (column {error.colno})", file=str(path), line=line)
    return DataError(f"invalid JSON: {error}", file=str(path), line=line)  # e.g. not utf-8


def locate_json_error(path: Path, json_lines: bool) -> DataError | None:
    """The first unparseable json line (or the position in a json array), or ``None`` if it all parses."""
    if not json_lines:
        try:
            rows = json.loads(path.read_bytes())
        except ValueError as error:
            return invalid_json(path, error, None)
        return no_examples(path) if rows == [] else None
    for number, line in nonblank_lines(path):
        try:
            row = json.loads(line)
        except ValueError as error:
            return invalid_json(path, error, number)
        if not isinstance(row, dict):
            return DataError(f"expected a JSON object, got {type(row).__name__}", file=str(path), line=number)
    return None


def csv_columns(path: Path) -> list[str]:
    """The header of a csv file; a file without data rows has no usable examples."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or not any(reader):
            raise no_examples(path)
    return header


def parquet_is_empty(path: Path) -> bool:
    """Whether a parquet file has no rows (``False`` when unreadable: ``datasets`` then says why)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows == 0
    except pa.ArrowException:
        return False


def read_records(path: Path, cache_dir: str | Path | None) -> tuple[Any, list[int] | None]:
    """The file's records (a ``datasets.Dataset``) and, for json lines, each record's line number."""
    import datasets

    if not path.is_file():
        raise DataError("file not found", file=str(path))
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"unsupported file type {path.suffix!r}; expected one of {list(BUILDERS)}", file=str(path))
    if path.stat().st_size == 0:
        raise no_examples(path)
    json_lines = builder == "json" and not is_json_array(path)
    lines = [number for number, _ in nonblank_lines(path)] if json_lines else None
    if lines == [] or (builder == "parquet" and parquet_is_empty(path)):
        raise no_examples(path)
    options: dict[str, Any] = {}
    if builder == "csv":  # text as written: no number parsing, an empty cell is ""
        columns = csv_columns(path)
        options = {"features": datasets.Features(dict.fromkeys(columns, datasets.Value("string")))}
        options["keep_default_na"] = False
    try:
        dataset = datasets.load_dataset(
            builder,
            data_files=str(path),
            split="train",
            cache_dir=str(cache_dir) if cache_dir else None,
            **options,
        )
    except Exception as error:  # datasets raises its own, pyarrow's or pandas' errors depending on the reader
        located = locate_json_error(path, json_lines) if builder == "json" else None
        raise located or DataError(f"cannot read as {builder}: {error.__cause__ or error}", file=str(path)) from error
    return dataset, lines


def load_examples(
    path: str | Path,
    fmt: str,
    *,
    on_error: str = "fail",
    limit: int | None = None,
    cache_dir: str | Path | None = None,
) -> LoadResult:
    """Convert the records of ``path`` with the ``fmt`` converter (see ``FORMATS``) into ChatExamples.

    ``on_error``: ``"fail"`` raises the first bad record's DataError; ``"skip"`` collects it in ``skipped``.
    ``limit`` keeps the first ``limit`` good examples. ``cache_dir`` is the ``datasets`` cache (default: its
    own). Raises DataError when no example is usable.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {list(FORMATS)}")
    convert = FORMATS[fmt].convert
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r} is not one of {list(ON_ERROR)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be None or >= 1")
    path = Path(path)
    records, lines = read_records(path, cache_dir)
    result = LoadResult(examples=[])
    for index, row in enumerate(records):
        line, record = (lines[index], None) if lines else (None, index + 1)
        try:
            prompt, response = convert(row)
        except DataError as error:
            located = DataError(error.reason, file=str(path), line=line, record=record, field=error.field)
            if on_error == "fail":
                raise located from None
            result.skipped.append(str(located))
            continue
        source = f"{path}:{line}" if line else f"{path}:record {record}"
        result.examples.append(ChatExample(prompt=prompt, response=response, source=source))
        if limit is not None and len(result.examples) == limit:
            break
    return checked_load(path, result)


def load_json_lines(
    path: str | Path, convert: Callable[[dict[str, Any], int], Item], *, on_error: str
) -> tuple[list[Item], list[str]]:
    """``convert(row, line)`` of every JSON object line of ``path`` and the located reasons of the skipped ones.

    A DataError from ``convert`` is located with the file and line, then raised (``on_error="fail"``) or
    collected (``"skip"``). A missing file, a JSON array, an unparseable line or one that is not an object
    fail under both policies.
    """
    if on_error not in ON_ERROR:
        raise ConfigError(f"data.on_error={on_error!r} is not one of {list(ON_ERROR)}")
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", file=str(path))
    if is_json_array(path):
        raise DataError("expected JSON lines (one object per line), found a JSON array", file=str(path))
    examples, skipped = [], []
    for number, line in nonblank_lines(path):
        try:
            row = json.loads(line)
        except ValueError as error:
            raise invalid_json(path, error, number) from None
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}", file=str(path), line=number)
        try:
            examples.append(convert(row, number))
        except DataError as error:
            located = DataError(error.reason, file=str(path), line=number, field=error.field)
            if on_error == "fail":
                raise located from None
            skipped.append(str(located))
    return examples, skipped


def checked_load(path: Path, result: Loaded) -> Loaded:
    """``result`` (any load with ``examples`` and located ``skipped`` reasons) after warning about what was skipped;
    DataError when no example of ``path`` is usable."""
    skipped = result.skipped
    if skipped:
        log.warning("Skipped %d bad record(s) of %s, e.g.: %s", len(skipped), path, "; ".join(skipped[:WARN_REASONS]))
    if not result.examples:
        raise no_examples(path, skipped)
    return result
