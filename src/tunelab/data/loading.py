"""Load local data files with ``datasets`` and convert every record into a :class:`ChatExample`.

Errors name the file, the line (json lines) or record number (csv / parquet / json array) and the field.
``on_error="fail"`` stops at the first bad record; ``"skip"`` drops bad records, counts them and warns.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.data.formats import FORMATS
from tunelab.data.records import ChatExample
from tunelab.errors import DataError

log = logging.getLogger("tunelab.data")

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ON_ERROR = ("fail", "skip")


@dataclass
class LoadResult:
    examples: list[ChatExample]
    skipped: list[str] = field(default_factory=list)  # one located message per skipped record


def first_invalid_json_line(path: Path) -> DataError | None:
    """The first line of a json-lines file that does not parse, as a located error."""
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                return DataError(f"invalid JSON: {error.msg} (column {error.colno})", file=str(path), line=number)
            if not isinstance(row, dict):
                return DataError(f"expected a JSON object, got {type(row).__name__}", file=str(path), line=number)
    return None


def line_numbers(path: Path) -> list[int]:
    """1-based line numbers of the non-blank lines of a json-lines file (record i -> line)."""
    with open(path, encoding="utf-8") as handle:
        return [number for number, text in enumerate(handle, 1) if text.strip()]


def read_rows(path: Path) -> list[dict]:
    """The file's records as dicts, via ``datasets``; malformed json lines are reported by line."""
    import datasets

    if not path.exists():
        raise DataError("file not found", file=str(path))
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"unsupported file type; expected one of {sorted(BUILDERS)}", file=str(path))
    if path.stat().st_size == 0:
        return []
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:
        if path.suffix.lower() != ".jsonl":
            raise DataError(f"cannot read: {error}", file=str(path)) from error
        located = first_invalid_json_line(path)
        if located is not None:
            raise located from error
        # every line parses but arrow could not unify the types: read them as-is, the converter names the field
        with open(path, encoding="utf-8") as handle:
            return [json.loads(text) for text in handle if text.strip()]
    return table.to_list()


def load_examples(path: str | Path, fmt: str, *, on_error: str = "fail", limit: int | None = None) -> LoadResult:
    """Convert every record of ``path`` (format ``fmt``) into a ChatExample; see the module docstring."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {sorted(FORMATS)}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r} is not one of {list(ON_ERROR)}")
    path = Path(path)
    rows = read_rows(path)
    lines = line_numbers(path) if path.suffix.lower() == ".jsonl" else None
    convert = FORMATS[fmt]
    result = LoadResult(examples=[])
    for index, row in enumerate(rows):
        line = lines[index] if lines else None
        record = None if lines else index + 1
        try:
            prompt, response = convert(row)
        except DataError as error:
            located = DataError(error.reason, file=str(path), line=line, record=record, field=error.field)
            if on_error == "fail":
                raise located from None
            result.skipped.append(str(located))
            continue
        source = f"{path}, line {line}" if line else f"{path}, record {record}"
        result.examples.append(ChatExample(prompt=prompt, response=response, source=source))
        if limit is not None and len(result.examples) >= limit:
            break
    if result.skipped:
        log.warning("Skipped %d bad records of %s; first: %s", len(result.skipped), path, result.skipped[0])
    if not result.examples:
        raise DataError("no usable examples", file=str(path))
    return result
