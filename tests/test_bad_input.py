"""Bad input: every data reader ends with one located line (``data.on_error=fail``) or a counted skip (``skip``),
never a raw traceback and never a silently dropped record."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from tunelab.data.datamodule import ClassificationDataModule, SFTDataModule
from tunelab.data.labeled import load_labeled
from tunelab.data.loading import LoadResult, load_examples
from tunelab.data.preference import load_preferences
from tunelab.data.prompts import load_prompts
from tunelab.errors import DataError

from .conftest import CONFIGS

LABELS = ["negative", "neutral", "positive"]
GOOD = b'{"instruction": "q", "output": "a"}'
GOOD_TEXT = b'{"text": "Shares rose", "label": "positive"}'
SKIP_FIX = " (data.on_error=skip drops and counts such records)"
NO_PROBLEMS = {"label outside the label set": 0, "empty text": 0, "duplicate text": 0, "malformed record": 0}


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def sft(path: Path, fmt: str = "alpaca", **kwargs: Any) -> LoadResult:
    return load_examples(path, fmt, cache_dir=path.parent / "hf-cache", **kwargs)


def labeled(path: Path, fmt: str = "jsonl", **kwargs: Any):
    return load_labeled(path, fmt, LABELS, **kwargs)


def failure(load: Callable[..., object], path: Path, **kwargs: Any) -> str:
    """The one-line DataError of ``load(path, **kwargs)``."""
    with pytest.raises(DataError) as info:
        load(path, **kwargs)
    return str(info.value)


# --- bytes that are not UTF-8 ----------------------------------------------------------------------------------


def test_non_utf8_byte_in_a_json_line_is_located_or_skipped(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", GOOD + b'\n{"instruction": "caf\xe9", "output": "a"}\n' + GOOD + b"\n")
    reason = f"{path}, line 2: not valid UTF-8: byte 0xe9 at column 21; convert the file to UTF-8"
    assert failure(sft, path) == reason
    result = sft(path, on_error="skip")
    assert result.skipped == [reason]
    assert [e.source for e in result.examples] == [f"{path}:1", f"{path}:3"]


def test_non_utf8_byte_in_labeled_json_lines_was_a_bare_unicode_error(tmp_path: Path) -> None:
    path = write(tmp_path / "l.jsonl", GOOD_TEXT + b'\n{"text": "Caf\xe9 opens", "label": "neutral"}\n')
    reason = f"{path}, line 2: not valid UTF-8: byte 0xe9 at column 14; convert the file to UTF-8"
    assert failure(labeled, path) == reason + SKIP_FIX
    loaded = labeled(path, on_error="skip")
    assert loaded.skipped == [reason]
    assert loaded.report == {**NO_PROBLEMS, "malformed record": 1}
    assert [ex.line for ex in loaded.examples] == [1]


def test_non_utf8_byte_in_a_csv_cell_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", b"instruction,output\nq1,a1\nq2,caf\xe9\nq3,a3\n")
    reason = f"{path}, line 3: field 'output': not valid UTF-8: byte 0xe9 at character 4; convert the file to UTF-8"
    assert failure(sft, path) == reason
    result = sft(path, on_error="skip")
    assert result.skipped == [reason]
    assert [e.source for e in result.examples] == [f"{path}:2", f"{path}:4"]


@pytest.mark.parametrize(
    ("load", "good"),
    [
        (load_preferences, b'{"prompt": "q", "chosen": "a", "rejected": "b"}'),
        (load_prompts, b'{"prompt": "What is 2 plus 3?"}'),
    ],
)
def test_non_utf8_and_broken_json_lines_of_pairs_and_prompts_are_counted(tmp_path: Path, load, good: bytes) -> None:
    path = write(tmp_path / "p.jsonl", good + b"\n\xff\xfe{}\n" + good + b"\n{\n")
    first = f"{path}, line 2: not valid UTF-8: byte 0xff at column 1; convert the file to UTF-8"
    assert failure(load, path, on_error="fail") == first
    result = load(path, on_error="skip")
    assert result.skipped == [
        first,
        f"{path}, line 4: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
    ]
    assert [example.line for example in result.examples] == [1, 3]


def test_non_utf8_byte_in_a_json_array_is_located_by_line(tmp_path: Path) -> None:
    path = write(tmp_path / "rows.json", b'[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "\xff"}\n]\n')
    for policy in ("fail", "skip"):  # an array cannot lose one record: the file is refused
        assert failure(sft, path, on_error=policy) == (
            f"{path}, line 3: not valid UTF-8: byte 0xff at column 20; convert the file to UTF-8"
        )


def test_utf16_file_is_refused_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "u16.jsonl", '{"instruction": "q", "output": "a"}\n'.encode("utf-16"))
    reason = f"{path}: the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8"
    for policy in ("fail", "skip"):
        assert failure(sft, path, on_error=policy) == reason


# --- lines that are not one JSON object --------------------------------------------------------------------------


def test_broken_json_line_is_skipped_and_counted(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", GOOD + b'\n{"instruction": "q", "output": \n' + GOOD + b"\n[1, 2]\n")
    broken = f"{path}, line 2: invalid JSON: Expecting value (column 32)"
    assert failure(sft, path) == broken
    result = sft(path, on_error="skip")
    assert result.skipped == [broken, f"{path}, line 4: expected a JSON object, got list"]
    assert [e.source for e in result.examples] == [f"{path}:1", f"{path}:3"]


def test_broken_labeled_json_line_is_a_counted_malformed_record(tmp_path: Path) -> None:
    path = write(tmp_path / "l.jsonl", GOOD_TEXT + b'\n{"text": "Profit fell", "label": \n')
    broken = f"{path}, line 2: invalid JSON: Expecting value (column 34)"
    assert failure(labeled, path) == broken + SKIP_FIX
    loaded = labeled(path, on_error="skip")
    assert (loaded.skipped, loaded.report) == ([broken], {**NO_PROBLEMS, "malformed record": 1})


def test_two_json_objects_on_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", GOOD + b"\n" + GOOD + b" " + GOOD + b"\n")
    reason = f"{path}, line 2: invalid JSON: a second JSON value starts at column 37; one record per line"
    assert failure(sft, path) == reason
    assert sft(path, on_error="skip").skipped == [reason]


def test_a_megabyte_of_nesting_is_refused_not_a_recursion_error(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", GOOD + b"\n" + b"[" * 1_000_000 + b"\n")
    reason = f"{path}, line 2: invalid JSON: nested too deeply"
    assert failure(sft, path) == reason
    assert sft(path, on_error="skip").skipped == [reason]


# --- Financial PhraseBank ------------------------------------------------------------------------------------------


def test_bad_phrasebank_lines_are_located_or_counted(tmp_path: Path) -> None:
    path = write(
        tmp_path / "Sentences_50Agree.txt",
        b"Profit rose .@positive\r\nno separator here\r\nSales fell .@bullish\r\nBoard meets .@neutral\r\n",
    )
    no_at = f"{path}, line 2: field 'label': expected '<sentence>@<label>' (no '@' on the line)"
    bullish = f"{path}, line 3: field 'label': label outside the label set: 'bullish' not in {LABELS}"
    assert failure(labeled, path, fmt="phrasebank") == no_at + SKIP_FIX
    loaded = labeled(path, "phrasebank", on_error="skip")
    assert [(ex.text, ex.label, ex.line) for ex in loaded.examples] == [
        ("Profit rose .", 2, 1),
        ("Board meets .", 1, 4),
    ]
    assert loaded.skipped == [no_at, bullish]
    assert loaded.report == {**NO_PROBLEMS, "label outside the label set": 1, "malformed record": 1}
    unknown = write(tmp_path / "unknown.txt", b"Profit rose .@positive\nSales fell .@bullish\n")
    assert failure(labeled, unknown, fmt="phrasebank") == (
        f"{unknown}, line 2: field 'label': label outside the label set: 'bullish' not in {LABELS}{SKIP_FIX}"
    )


# --- csv for classification --------------------------------------------------------------------------------------


def test_labeled_csv_is_read_as_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "news.csv", b'text,label\nShares rose,positive\n"Profit, sadly, fell",negative\n')
    loaded = labeled(path)
    assert [(ex.text, ex.label, ex.line) for ex in loaded.examples] == [
        ("Shares rose", 2, 2),
        ("Profit, sadly, fell", 0, 3),
    ]


def test_bad_labeled_csv_rows_are_located_or_counted(tmp_path: Path) -> None:
    path = write(
        tmp_path / "news.csv",
        b"text,label\nShares rose,positive\nBoard meets,neutral,today\nSales fell,2024-01-05\nSales fell,negative\n",
    )
    ragged = f"{path}, line 3: 3 cell(s) where the header has 2; quote a cell that holds a comma"
    dated = f"{path}, line 4: field 'label': label outside the label set: '2024-01-05' not in {LABELS}"
    assert failure(labeled, path) == ragged + SKIP_FIX
    loaded = labeled(path, on_error="skip")
    assert loaded.skipped == [ragged, dated]
    assert loaded.report == {**NO_PROBLEMS, "label outside the label set": 1, "malformed record": 1}
    assert [ex.line for ex in loaded.examples] == [2, 5]
    renamed = write(tmp_path / "renamed.csv", b"sentence,label\nShares rose,positive\n")
    assert failure(labeled, renamed) == (
        f"{renamed}, line 2: field 'text': missing field (keys: ['label', 'sentence']){SKIP_FIX}"
    )


def test_labeled_file_not_found_and_unsupported_suffix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.csv"
    assert failure(labeled, missing) == f"{missing}: file not found"  # was a bare FileNotFoundError
    text = write(tmp_path / "news.txt", GOOD_TEXT + b"\n")
    assert (
        failure(labeled, text) == f"{text}: unsupported file type '.txt'; expected one of ['.jsonl', '.json', '.csv']"
    )


# --- csv structure --------------------------------------------------------------------------------------------------


def test_csv_stray_quote_is_a_record_error_and_an_open_quote_fails_the_file(tmp_path: Path) -> None:
    stray = write(tmp_path / "stray.csv", b'instruction,output\nq1,a1\nq2,"a"b\nq3,a3\n')
    reason = (
        f"{stray}, line 3: invalid CSV: ',' expected after '\"' (inside a quoted cell, write a quote as two quotes)"
    )
    assert failure(sft, stray) == reason
    assert sft(stray, on_error="skip").skipped == [reason]
    unclosed = write(tmp_path / "open.csv", b'instruction,output\nq1,a1\nq2,"never closed\nq3,a3\n')
    for policy in ("fail", "skip"):  # skipping it would drop every line after it
        assert failure(sft, unclosed, on_error=policy) == (
            f"{unclosed}, line 3: a quote opened in the row that starts here is never closed; close it"
        )


def test_csv_header_repeating_a_column_fails_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", b"instruction,output,output\nq,a,b\n")
    for policy in ("fail", "skip"):
        assert failure(sft, path, on_error=policy) == (
            f"{path}, line 1: column(s) ['output'] appear more than once in the header; rename them"
        )


# --- line endings, dates, long lines ----------------------------------------------------------------------------------


def test_cr_only_line_endings_are_read_as_lines(tmp_path: Path) -> None:
    jsonl = write(tmp_path / "mac.jsonl", GOOD + b'\r{"instruction": "q"}\r' + GOOD + b"\r")
    result = sft(jsonl, on_error="skip")
    assert [e.source for e in result.examples] == [f"{jsonl}:1", f"{jsonl}:3"]
    assert result.skipped == [f"{jsonl}, line 2: field 'output': missing field"]
    table = write(tmp_path / "mac.csv", b'instruction,output\rq1,a1\rq2,"two\rlines"\r')
    assert [(e.response, e.source) for e in sft(table).examples] == [("a1", f"{table}:2"), ("two\rlines", f"{table}:3")]
    bank = write(tmp_path / "mac.txt", b"Profit rose .@positive\rSales fell .@negative\r")
    assert [(ex.label, ex.line) for ex in labeled(bank, "phrasebank").examples] == [(2, 1), (0, 2)]


def test_date_like_strings_stay_text(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([["instruction", "output"], ["When?", "2024-01-05"], ["How many?", "1e3"]])
    assert [e.response for e in sft(path).examples] == ["2024-01-05", "1e3"]
    medqa = write(
        tmp_path / "medqa.jsonl",
        json.dumps({"question": "When?", "options": {"A": "May", "B": "June"}, "answer_idx": "2024-01-05"}).encode(),
    )
    assert failure(sft, medqa, fmt="medqa") == (
        f"{medqa}, line 1: field 'answer_idx': '2024-01-05' is not an option; valid keys: ['A', 'B']"
    )
    numbers = write(
        tmp_path / "l.jsonl",
        b'{"text": "Q1 results", "label": 20240105}\n{"text": 20240105, "label": "neutral"}\n' + GOOD_TEXT + b"\n",
    )
    label = f"{numbers}, line 1: field 'label': label outside the label set: 20240105 not in {LABELS}"
    assert failure(labeled, numbers) == label + SKIP_FIX
    loaded = labeled(numbers, on_error="skip")
    assert loaded.skipped == [label, f"{numbers}, line 2: field 'text': expected a string, got int"]
    assert loaded.report == {**NO_PROBLEMS, "label outside the label set": 1, "malformed record": 1}


def test_a_megabyte_line_is_read(tmp_path: Path) -> None:
    answer = "x" * 1_000_000
    jsonl = write(tmp_path / "long.jsonl", json.dumps({"instruction": "q", "output": answer}).encode() + b"\n")
    assert [e.response for e in sft(jsonl).examples] == [answer]
    limit = csv.field_size_limit()
    table = write(tmp_path / "long.csv", f"instruction,output\nq,{answer}\n".encode())
    assert [e.response for e in sft(table).examples] == [answer]
    assert csv.field_size_limit() == limit  # the csv module's limit is restored
    bank = write(tmp_path / "long.txt", f"{answer}@neutral\n".encode())
    assert [len(ex.text) for ex in labeled(bank, "phrasebank").examples] == [1_000_000]


# --- files without records ------------------------------------------------------------------------------------------

BOM = b"\xef\xbb\xbf"
NO_RECORDS = [
    ("bom.jsonl", BOM, sft),
    ("bom.csv", BOM, sft),
    ("bom_header.csv", BOM + b"instruction,output\r\n", sft),
    ("bom.jsonl", BOM, labeled),
    ("header.csv", b"text,label\n", labeled),
    ("bom.txt", BOM, lambda path, **kw: labeled(path, "phrasebank", **kw)),
    ("bom.jsonl", BOM, load_preferences),
    ("bom.jsonl", BOM + b"\n\n", load_prompts),
]


@pytest.mark.parametrize(("name", "data", "load"), NO_RECORDS)
def test_file_without_records_says_so_in_one_line(tmp_path: Path, name: str, data: bytes, load) -> None:
    path = write(tmp_path / name, data)
    for policy in ("fail", "skip"):
        assert failure(load, path, on_error=policy) == f"no usable examples in {path}"


# --- the data report ------------------------------------------------------------------------------------------------


def data_cfg(name: str, path: Path, **overrides: Any):
    cfg = OmegaConf.load(CONFIGS / "data" / f"{name}.yaml")
    return OmegaConf.merge(cfg, {"builder": None, "path": str(path), "test_size": 2, "val_size": 2, **overrides})


def test_sft_report_counts_every_skipped_kind(tokenizer, tmp_path: Path) -> None:
    rows = [json.dumps({"instruction": f"What is {i} plus 1?", "output": f"{i + 1}."}).encode() for i in range(10)]
    bad = [b'{"instruction": "q", "output": ', b'{"instruction": "caf\xe9", "output": "a"}', b'{"instruction": "q"}']
    path = write(tmp_path / "mixed.jsonl", b"\n".join(rows[:5] + bad + rows[5:]) + b"\n")
    datamodule = SFTDataModule(data_cfg("hpo_qa", path, on_error="skip"), tokenizer, tmp_path)
    datamodule.setup()
    assert datamodule.report["skipped_records"] == {str(path): 3}
    assert sum(datamodule.report[split]["examples"] for split in ("train", "val", "test")) == 10


def test_classification_report_counts_skipped_csv_rows(tokenizer, tmp_path: Path) -> None:
    lines = [f"Shares rose {i} %,positive" for i in range(8)] + ["Board meets,neutral,today", "Sales fell,bullish"]
    path = write(tmp_path / "news.csv", ("text,label\n" + "\n".join(lines) + "\n").encode())
    datamodule = ClassificationDataModule(data_cfg("finsent", path, on_error="skip"), tokenizer, tmp_path)
    datamodule.setup()
    assert datamodule.report["skipped_records"] == {str(path): 2}
    assert datamodule.report["problems"] == {
        str(path): {**NO_PROBLEMS, "label outside the label set": 1, "malformed record": 1}
    }
    assert sum(datamodule.report[split]["examples"] for split in ("train", "val", "test")) == 8


# --- no raw traceback, no silent drop -------------------------------------------------------------------------------

PAIR = b'{"prompt": "q", "chosen": "a", "rejected": "b"}'  # also a good prompt record
PIECES = [
    GOOD,
    GOOD_TEXT,
    PAIR,
    b"\n",
    b"\r",
    b"\r\n",
    b"\xff",
    b"\xe9",
    b'"',
    b",",
    b"@positive",
    b"[",
    b"{",
    b"}",
    BOM,
]
READERS = {
    "sft.jsonl": sft,
    "sft.csv": sft,
    "labeled.jsonl": labeled,
    "labeled.csv": labeled,
    "phrasebank.txt": lambda path, **kw: labeled(path, "phrasebank", **kw),
    "pairs.jsonl": load_preferences,
    "prompts.jsonl": load_prompts,
}


@pytest.mark.parametrize("name", sorted(READERS))
def test_random_bytes_give_a_data_error_or_account_for_every_line(tmp_path: Path, name: str) -> None:
    generator = random.Random(17)
    for sample in range(40):
        path = write(tmp_path / f"{sample}_{name}", b"".join(generator.choices(PIECES, k=generator.randint(1, 30))))
        for policy in ("fail", "skip"):
            try:
                loaded = READERS[name](path, on_error=policy)
            except DataError as error:
                assert "\n" not in str(error).replace(str(path), "")  # one line
                continue
            if name.endswith(".jsonl") and policy == "skip":  # every non-blank line is an example or a skip
                nonblank = [line for line in path.read_bytes().removeprefix(BOM).splitlines() if line.strip()]
                dropped = loaded.report["duplicate text"] if name.startswith("labeled") else 0
                assert len(loaded.examples) + len(loaded.skipped) + dropped == len(nonblank)
