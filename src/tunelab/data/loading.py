"""Read local data files record by record and convert every record into a :class:`ChatExample`.

Line files are read line by line, so one bad line is one bad record:

- ``.jsonl`` / ``.json``: one JSON object per line (a ``.json`` or ``.jsonl`` holding one JSON array is read
  whole, as below);
- ``.csv``: a header row, then one record per row (a quoted cell may span lines); every cell is text as written:
  no number or date parsing, an empty cell is ``""``.

A line ends at ``\\n``, ``\\r\\n`` or a lone ``\\r`` (old Mac files); a leading UTF-8 byte-order mark is ignored;
blank lines are not records. ``.parquet`` files and JSON arrays are read with ``datasets``, their records
numbered from 1.

A bad record is located by file, line (or record number) and field: a byte that is not UTF-8, invalid JSON (two
values on one line included), a line that is not a JSON object, a csv row whose cells do not match the header or
with a stray quote, and every check of the format's converter. ``on_error="fail"`` raises the first;
``"skip"`` drops bad records, lists them in :attr:`LoadResult.skipped` and warns. A file that cannot be read
record by record fails under both policies, in one located line: missing, an unsupported suffix, UTF-16, a
malformed JSON array, a bad csv header, a quoted csv cell still open at the end of the file, no record at all.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

from tunelab.data.formats import FORMATS
from tunelab.data.records import ChatExample
from tunelab.errors import ConfigError, DataError

log = logging.getLogger("tunelab.data")

ON_ERROR = ("fail", "skip")
WARN_REASONS = 3  # skipped-record reasons quoted in the warning
UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
UNDECODED = re.compile("[\udc80-\udcff]")  # a byte that ``surrogateescape`` kept because it did not decode
CSV_CELL_LIMIT = 2**31 - 1  # the csv module's own limit (128 KiB) would refuse a long cell
Row = dict[str, Any] | DataError  # a record, or why its line is not one (the reason, not yet located)
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


def unsupported(path: Path, suffixes: Iterable[str]) -> DataError:
    return DataError(f"unsupported file type {path.suffix!r}; expected one of {list(suffixes)}", file=str(path))


def must_exist(path: Path) -> None:
    if not path.is_file():
        raise DataError("file not found", file=str(path))


def text_lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(1-based number, text with its line ending) of every line of ``path``, blank ones included.

    A line ends at ``\\n``, ``\\r\\n`` or a lone ``\\r``. A leading UTF-8 byte-order mark is dropped; a byte that is
    not valid in ``encoding`` is kept as a lone surrogate (``surrogateescape``) for :func:`undecodable` to name.
    DataError when the file is missing or starts with a UTF-16 byte-order mark.
    """
    must_exist(path)
    number = 0
    with open(path, "rb") as handle:
        for index, chunk in enumerate(handle):  # a chunk ends at b"\n", so a \r\n pair stays in one chunk
            if index == 0:
                if chunk.startswith(UTF16_BOMS):
                    reason = (
                        f"the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as {encoding.upper()}"
                    )
                    raise DataError(reason, file=str(path))
                chunk = chunk.removeprefix(UTF8_BOM)
            for line in chunk.splitlines(keepends=True):  # bytes split at \n, \r\n and \r only
                number += 1
                yield number, line.decode(encoding, "surrogateescape")


def undecodable(text: str, unit: str = "column") -> str | None:
    """Why ``text`` (from :func:`text_lines`) is not valid UTF-8, naming its first bad byte and that byte's
    ``unit`` (1-based position in ``text``); ``None`` when it is valid."""
    found = UNDECODED.search(text)
    if found is None:
        return None
    byte = ord(found.group()) - 0xDC00
    return f"not valid UTF-8: byte 0x{byte:02x} at {unit} {found.start() + 1}; convert the file to UTF-8"


def json_row(text: str) -> Row:
    """The JSON object on one line, or why the line is not one."""
    reason = undecodable(text)
    if reason is not None:
        return DataError(reason)
    try:
        row = json.loads(text.rstrip("\r\n"))  # without its line ending, so an error names its column on the line
    except RecursionError:
        return DataError("invalid JSON: nested too deeply")
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":
            return DataError(f"invalid JSON: a second JSON value starts at column {error.colno}; one record per line")
        return DataError(f"invalid JSON: {error.msg} (column {error.colno})")
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        return DataError(f"invalid JSON: {error}")
    if not isinstance(row, dict):
        return DataError(f"expected a JSON object, got {type(row).__name__}")
    return row


def json_line_rows(path: Path) -> Iterator[tuple[int, Row]]:
    """(line, JSON object or why the line is not one) of every non-blank line of ``path``."""
    for number, text in text_lines(path):
        if text.strip():
            yield number, json_row(text)


def csv_cells(path: Path) -> Iterator[tuple[int, list[str] | csv.Error]]:
    """(line where the row starts, its cells or why they do not parse) of every non-blank row of a csv file;
    DataError when a quoted cell is still open at the end of the file (it would hold every line after it)."""
    reader = csv.reader((text for _, text in text_lines(path)), strict=True)
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            if str(error) == "unexpected end of data":  # strict mode, at the end of the file inside quotes
                reason = "a quote opened in the row that starts here is never closed; close it"
                raise DataError(reason, file=str(path), line=start) from None
            yield start, error
            continue
        if cells:
            yield start, cells


def csv_header(path: Path, line: int, header: list[str] | csv.Error) -> list[str]:
    """The column names of a csv file's first row; DataError when they do not parse, are not UTF-8 or repeat."""
    if isinstance(header, csv.Error):
        raise DataError(f"invalid CSV header: {header}", file=str(path), line=line)
    for cell in header:
        reason = undecodable(cell, "character")
        if reason is not None:
            raise DataError(f"header: {reason}", file=str(path), line=line)
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(
            f"column(s) {repeated} appear more than once in the header; rename them", file=str(path), line=line
        )
    return header


def csv_record(header: list[str], cells: list[str] | csv.Error) -> Row:
    """``{column: cell}`` of one data row, or why it is not a record (the field names the bad cell's column)."""
    if isinstance(cells, csv.Error):
        return DataError(f"invalid CSV: {cells} (inside a quoted cell, write a quote as two quotes)")
    if len(cells) != len(header):
        return DataError(f"{len(cells)} cell(s) where the header has {len(header)}; quote a cell that holds a comma")
    for column, cell in zip(header, cells, strict=True):
        reason = undecodable(cell, "character")
        if reason is not None:
            return DataError(reason, field=column)
    return dict(zip(header, cells, strict=True))


def csv_rows(path: Path) -> Iterator[tuple[int, Row]]:
    """(line where the record starts, ``{column: cell}`` or why the row is not a record) of every data row of the
    csv file ``path``, whose first row is the header (see :func:`csv_header`, :func:`csv_record`)."""
    previous = csv.field_size_limit(CSV_CELL_LIMIT)
    try:
        rows = csv_cells(path)
        line, first = next(rows, (0, None))
        if first is None:
            return
        header = csv_header(path, line, first)
        for start, cells in rows:
            yield start, csv_record(header, cells)
    finally:
        csv.field_size_limit(previous)


LINE_READERS: dict[str, Callable[[Path], Iterator[tuple[int, Row]]]] = {
    ".jsonl": json_line_rows,
    ".json": json_line_rows,
    ".csv": csv_rows,
}
SUFFIXES = (*LINE_READERS, ".parquet")


def is_json_array(path: Path) -> bool:
    """Whether a .json/.jsonl file holds one JSON array (else it is read as JSON lines); DataError when missing."""
    must_exist(path)
    with open(path, "rb") as handle:
        head = handle.read(1 << 16).removeprefix(UTF8_BOM).lstrip()
    return head.startswith(b"[")


def line_rows(path: Path) -> Iterator[tuple[int, Row]]:
    """(line, record or why it is not one) of every record of a line file, read as its suffix says
    (:data:`LINE_READERS`); DataError when it is missing, has another suffix or holds a JSON array."""
    must_exist(path)
    reader = LINE_READERS.get(path.suffix.lower())
    if reader is None:
        raise unsupported(path, LINE_READERS)
    if reader is json_line_rows and is_json_array(path):
        raise DataError("expected JSON lines (one object per line), found a JSON array", file=str(path))
    return reader(path)


def json_array_error(path: Path) -> DataError | None:
    """Why the JSON array file ``path`` does not parse, located by line; ``None`` when it parses (an empty array
    has no usable examples)."""
    for number, text in text_lines(path):
        reason = undecodable(text)
        if reason is not None:
            return DataError(reason, file=str(path), line=number)
    try:
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
    except RecursionError:
        return DataError("invalid JSON: nested too deeply", file=str(path))
    except json.JSONDecodeError as error:
        return DataError(f"invalid JSON: {error.msg} (column {error.colno})", file=str(path), line=error.lineno)
    except ValueError as error:
        return DataError(f"invalid JSON: {error}", file=str(path))
    return no_examples(path) if rows == [] else None


def parquet_is_empty(path: Path) -> bool:
    """Whether a parquet file has no rows (``False`` when unreadable: ``datasets`` then says why)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows == 0
    except pa.ArrowException:
        return False


def dataset_rows(path: Path, cache_dir: str | Path | None) -> Any:
    """The records of a parquet file or a JSON array (a ``datasets.Dataset``; empty when it has none)."""
    import datasets

    builder = "parquet" if path.suffix.lower() == ".parquet" else "json"
    if builder == "parquet" and (path.stat().st_size == 0 or parquet_is_empty(path)):
        return []
    try:
        return datasets.load_dataset(
            builder, data_files=str(path), split="train", cache_dir=str(cache_dir) if cache_dir else None
        )
    except Exception as error:  # datasets raises its own, pyarrow's or pandas' errors depending on the reader
        located = json_array_error(path) if builder == "json" else None
        raise located or DataError(f"cannot read as {builder}: {error.__cause__ or error}", file=str(path)) from error


def read_records(path: Path, cache_dir: str | Path | None) -> Iterator[tuple[int | None, int | None, Row]]:
    """(line, record number, record or why it is not one) of every record of ``path``: line files by line,
    parquet files and JSON arrays by record number (the other position is ``None``)."""
    must_exist(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise unsupported(path, SUFFIXES)
    if suffix == ".parquet" or (LINE_READERS[suffix] is json_line_rows and is_json_array(path)):
        for number, row in enumerate(dataset_rows(path, cache_dir), 1):
            yield None, number, row
        return
    for number, row in line_rows(path):
        yield number, None, row


def as_record(row: Row) -> dict[str, Any]:
    """``row`` itself, or raise the DataError that says why its line is not a record."""
    if isinstance(row, DataError):
        raise row
    return row


def skip_or_fail(
    path: Path,
    error: DataError,
    on_error: str,
    skipped: list[str],
    *,
    line: int | None = None,
    record: int | None = None,
    fix: str = "",
) -> None:
    """Locate a bad record's ``error`` in ``path``: raise it with ``fix`` appended (``on_error="fail"``), or append it
    to ``skipped`` (``"skip"``)."""
    located = partial(DataError, file=str(path), line=line, record=record, field=error.field)
    if on_error == "fail":
        raise located(error.reason + fix) from None
    skipped.append(str(located(error.reason)))


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
    ``limit`` keeps the first ``limit`` good examples. ``cache_dir`` is the ``datasets`` cache for parquet files and
    JSON arrays (default: its own). Raises DataError when no example is usable.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {list(FORMATS)}")
    convert = FORMATS[fmt].convert
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r} is not one of {list(ON_ERROR)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be None or >= 1")
    path = Path(path)
    result = LoadResult(examples=[])
    for line, number, row in read_records(path, cache_dir):
        try:
            prompt, response, *choices = convert(as_record(row))  # choices: [MultipleChoice] or []
        except DataError as error:
            skip_or_fail(path, error, on_error, result.skipped, line=line, record=number)
            continue
        source = f"{path}:{line}" if line else f"{path}:record {number}"
        result.examples.append(ChatExample(prompt, response, source, *choices))
        if limit is not None and len(result.examples) == limit:
            break
    return checked_load(path, result)


def load_json_lines(
    path: str | Path, convert: Callable[[dict[str, Any], int], Item], *, on_error: str
) -> tuple[list[Item], list[str]]:
    """``convert(row, line)`` of every JSON object line of ``path`` and the located reasons of the skipped ones.

    A line that is not a JSON object (not UTF-8, invalid JSON, another JSON value) or a DataError from ``convert``
    is located with the file and line, then raised (``on_error="fail"``) or collected (``"skip"``). A missing file
    or a JSON array fails under both policies.
    """
    if on_error not in ON_ERROR:
        raise ConfigError(f"data.on_error={on_error!r} is not one of {list(ON_ERROR)}")
    path = Path(path)
    if is_json_array(path):
        raise DataError("expected JSON lines (one object per line), found a JSON array", file=str(path))
    examples, skipped = [], []
    for number, row in json_line_rows(path):
        try:
            examples.append(convert(as_record(row), number))
        except DataError as error:
            skip_or_fail(path, error, on_error, skipped, line=number)
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
