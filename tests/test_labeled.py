"""Labeled-text loading for classification: jsonl and Financial PhraseBank formats, located errors, counted
problems (labels outside the set, empty texts, duplicates) under each policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.data.labeled import load_labeled
from tunelab.errors import ConfigError, DataError

LABELS = ["negative", "neutral", "positive"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    return write_jsonl(
        tmp_path / "messy.jsonl",
        [
            {"text": "Shares rose 5 %", "label": "positive"},
            {"text": "Profit  fell", "label": "negative"},
            {"text": "   ", "label": "neutral"},
            {"text": "Shares   rose 5 %", "label": "positive"},
            {"text": "Board meets today", "label": "bullish"},
            {"text": "Board meets today", "label": "neutral"},
        ],
    )


def test_skip_counts_every_problem_and_keeps_the_rest(messy: Path):
    loaded = load_labeled(messy, "jsonl", LABELS, on_error="skip", duplicates="drop")
    assert [(ex.text, ex.label, ex.line) for ex in loaded.examples] == [
        ("Shares rose 5 %", 2, 1),
        ("Profit fell", 0, 2),
        ("Board meets today", 1, 6),
    ]
    assert loaded.report == {
        "label outside the label set": 1,
        "empty text": 1,
        "duplicate text": 1,
        "malformed record": 0,
    }


def test_duplicates_keep_counts_but_keeps(messy: Path):
    loaded = load_labeled(messy, "jsonl", LABELS, on_error="skip", duplicates="keep")
    assert len(loaded.examples) == 4
    assert loaded.report["duplicate text"] == 1


@pytest.mark.parametrize(
    ("rows", "line", "field", "words"),
    [
        ([{"text": "ok", "label": "positive"}, {"text": "x", "label": "bullish"}], 2, "label", "outside the label set"),
        ([{"text": "", "label": "neutral"}], 1, "text", "empty text"),
        ([{"text": "ok"}], 1, "label", "missing field"),
    ],
)
def test_fail_names_file_line_and_field(tmp_path: Path, rows, line, field, words):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as error:
        load_labeled(path, "jsonl", LABELS, on_error="fail")
    assert (error.value.file, error.value.line, error.value.field) == (str(path), line, field)
    assert words in str(error.value)


def test_duplicates_fail_names_the_line(tmp_path: Path):
    path = write_jsonl(
        tmp_path / "dup.jsonl", [{"text": "a b", "label": "neutral"}, {"text": "a  b", "label": "neutral"}]
    )
    with pytest.raises(DataError, match="duplicate") as error:
        load_labeled(path, "jsonl", LABELS, duplicates="fail")
    assert error.value.line == 2


def test_phrasebank_format_latin1_and_last_at(tmp_path: Path):
    path = tmp_path / "Sentences_50Agree.txt"
    path.write_bytes(
        "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn .@positive\r\n"
        "Nokia's net sales @ 2 % fell ; the CEO's comments were brief .@negative\r\n"
        "Caf\u00e9 chain Ab Oy will open stores .@neutral\r\n".encode("iso-8859-1")
    )
    loaded = load_labeled(path, "phrasebank", LABELS)
    assert [ex.label for ex in loaded.examples] == [2, 0, 1]
    assert loaded.examples[1].text.startswith("Nokia's net sales @ 2 %")
    assert loaded.examples[2].text == "Caf\u00e9 chain Ab Oy will open stores ."


def test_phrasebank_line_without_separator_fails(tmp_path: Path):
    path = tmp_path / "p.txt"
    path.write_text("good line@positive\nno separator here\n", encoding="iso-8859-1")
    with pytest.raises(DataError) as error:
        load_labeled(path, "phrasebank", LABELS)
    assert error.value.line == 2


def test_unknown_policy_is_a_config_error(messy: Path):
    with pytest.raises(ConfigError, match=r"data\.duplicates"):
        load_labeled(messy, "jsonl", LABELS, duplicates="merge")
