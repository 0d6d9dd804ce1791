"""Data formats -> ChatExample: conversions, located errors (file, line, field) and the skip policy."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from tunelab.data.formats import MEDQA_INSTRUCTION
from tunelab.data.loading import LoadResult, load_examples
from tunelab.data.records import ChatExample
from tunelab.errors import DataError


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """One line per row: a dict is dumped as json, a string is written as-is (blank or malformed lines)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture
def load(tmp_path: Path):
    """``load_examples`` with the datasets cache kept inside ``tmp_path``."""

    def _load(path: Path, fmt: str, **kwargs: Any) -> LoadResult:
        return load_examples(path, fmt, cache_dir=tmp_path / "hf-cache", **kwargs)

    return _load


def load_error(load, path: Path, fmt: str, **kwargs: Any) -> str:
    with pytest.raises(DataError) as info:
        load(path, fmt, **kwargs)
    return str(info.value)


MEDQA_ROW = {
    "question": "Which vitamin deficiency causes scurvy?",
    "options": {"A": "Vitamin A", "B": "Vitamin C", "C": "Vitamin D", "D": "Vitamin K"},
    "answer_idx": "B",
    "answer": "Vitamin C",
    "meta_info": "step1",
}
MEDQA_PROMPT = (
    "Which vitamin deficiency causes scurvy?\nA. Vitamin A\nB. Vitamin C\nC. Vitamin D\nD. Vitamin K\n"
    + MEDQA_INSTRUCTION
)


# --- conversions -----------------------------------------------------------------------------------------


def test_alpaca_with_and_without_input_and_system(tmp_path: Path, load) -> None:
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": " 5 "},
            {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be brief."},
        ],
    )
    result = load(path, "alpaca")
    assert result.skipped == []
    assert result.examples == [
        ChatExample(
            prompt=({"role": "user", "content": "Add the numbers.\n\n2 and 3"},),
            response="5",
            source=f"{path}:1",
        ),
        ChatExample(
            prompt=({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}),
            response="Hi!",
            source=f"{path}:2",
        ),
    ]


def test_messages_and_sharegpt_conversations(tmp_path: Path, load) -> None:
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris."},
                    {"role": "user", "content": "And of Italy?"},
                    {"role": "assistant", "content": "Rome."},
                ]
            },
        ],
    )
    sharegpt = write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "Answer in one word."},
                    {"from": "human", "value": "Colour of the sky?"},
                    {"from": "gpt", "value": "Blue."},
                ]
            }
        ],
    )
    [chat] = load(path, "messages").examples
    assert chat.prompt == (
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    )
    assert chat.response == "Rome."
    [share] = load(sharegpt, "messages").examples
    assert share.prompt == (
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
    )
    assert share.response == "Blue."


def test_medqa_with_dict_and_list_options(tmp_path: Path, load) -> None:
    listed = {**MEDQA_ROW, "options": ["Vitamin A", "Vitamin C", "Vitamin D", "Vitamin K"]}
    path = write_jsonl(tmp_path / "medqa.jsonl", [MEDQA_ROW])
    listed_path = write_jsonl(tmp_path / "medqa_list.jsonl", [listed])
    for file in (path, listed_path):
        [example] = load(file, "medqa").examples
        assert example.prompt == ({"role": "user", "content": MEDQA_PROMPT},)
        assert example.response == "B. Vitamin C"


def test_medqa_rows_with_different_option_letters(tmp_path: Path, load) -> None:
    five = {**MEDQA_ROW, "options": {**MEDQA_ROW["options"], "E": "Vitamin B12"}, "answer_idx": "E"}
    path = write_jsonl(tmp_path / "medqa.jsonl", [MEDQA_ROW, {**five, "answer": "Vitamin B12"}])
    first, second = load(path, "medqa").examples
    assert "E." not in first.prompt[0]["content"]
    assert second.prompt[0]["content"].endswith(f"E. Vitamin B12\n{MEDQA_INSTRUCTION}")
    assert second.response == "E. Vitamin B12"


def test_csv_alpaca_keeps_text_as_written(tmp_path: Path, load) -> None:
    path = tmp_path / "alpaca.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "input", "output"])
        writer.writerow(["What is 6 times 7?", "", "42"])
        writer.writerow(["Pad the number.", "7", "007"])
    result = load(path, "alpaca")
    assert [(e.prompt[-1]["content"], e.response, e.source) for e in result.examples] == [
        ("What is 6 times 7?", "42", f"{path}:2"),  # located by line, the header being line 1
        ("Pad the number.\n\n7", "007", f"{path}:3"),
    ]


def test_limit_keeps_the_first_examples(tmp_path: Path, load) -> None:
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    assert [e.response for e in load(path, "alpaca", limit=2).examples] == ["a0", "a1"]


# --- located errors ---------------------------------------------------------------------------------------


def test_malformed_json_line_names_file_and_line(tmp_path: Path, load) -> None:
    good = json.dumps({"instruction": "q", "output": "a"})
    path = write_jsonl(tmp_path / "broken.jsonl", [good, "", good, '{"instruction": "q", "output": '])
    message = load_error(load, path, "alpaca")
    assert message.startswith(f"{path}, line 4: invalid JSON")


def test_json_line_that_is_not_an_object(tmp_path: Path, load) -> None:
    path = write_jsonl(tmp_path / "list.jsonl", [{"instruction": "q", "output": "a"}, "[1, 2]"])
    assert load_error(load, path, "alpaca") == f"{path}, line 2: expected a JSON object, got list"


def test_missing_output_field_names_line_and_field(tmp_path: Path, load) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}, "", {"instruction": "no answer"}])
    assert load_error(load, path, "alpaca") == f"{path}, line 3: field 'output': missing field"


def test_whitespace_answer_is_empty(tmp_path: Path, load) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "  \n "}])
    message = load_error(load, path, "alpaca")
    assert message.startswith(f"{path}, line 1: field 'output': empty answer")


def test_wrong_type_is_named(tmp_path: Path, load) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": 5}])
    assert load_error(load, path, "alpaca") == f"{path}, line 1: field 'output': expected a string, got int"


def test_unknown_role(tmp_path: Path, load) -> None:
    turns = [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}])
    message = load_error(load, path, "messages")
    assert message.startswith(f"{path}, line 1: field 'messages[1].role': unknown role 'bot'")
    assert "['system', 'user', 'assistant']" in message


def test_conversation_must_end_with_an_answer_to_a_user(tmp_path: Path, load) -> None:
    no_answer = [{"from": "human", "value": "hi"}]
    answer_only = [{"from": "system", "value": "s"}, {"from": "gpt", "value": "hello"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": no_answer}, {"conversations": answer_only}])
    result = load_error(load, path, "messages", on_error="skip")
    assert "2 bad record(s) skipped" in result
    assert f"{path}, line 1: field 'conversations[0]': the last turn must be the assistant's answer" in result


def test_medqa_answer_idx_not_an_option_lists_valid_keys(tmp_path: Path, load) -> None:
    path = write_jsonl(tmp_path / "medqa.jsonl", [{**MEDQA_ROW, "answer_idx": "F", "answer": None}])
    message = load_error(load, path, "medqa")
    assert message == f"{path}, line 1: field 'answer_idx': 'F' is not an option; valid keys: ['A', 'B', 'C', 'D']"


def test_medqa_answer_text_mismatch(tmp_path: Path, load) -> None:
    path = write_jsonl(tmp_path / "medqa.jsonl", [{**MEDQA_ROW, "answer": "Vitamin D"}])
    message = load_error(load, path, "medqa")
    assert message.startswith(f"{path}, line 1: field 'answer': 'Vitamin D' does not match options['B']")


def test_unknown_format_lists_valid_formats(tmp_path: Path, load) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}])
    message = load_error(load, path, "dolly")
    assert "'dolly'" in message
    assert "['alpaca', 'messages', 'medqa']" in message


def test_unknown_suffix_lists_supported_suffixes(tmp_path: Path, load) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    message = load_error(load, path, "alpaca")
    assert message.startswith(f"{path}: unsupported file type '.txt'")
    assert all(suffix in message for suffix in (".jsonl", ".json", ".csv", ".parquet"))


def test_missing_file_names_the_path(tmp_path: Path, load) -> None:
    path = tmp_path / "nowhere.jsonl"
    assert load_error(load, path, "alpaca") == f"{path}: file not found"


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_empty_file_has_no_usable_examples(tmp_path: Path, load, text: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    assert load_error(load, path, "alpaca") == f"no usable examples in {path}"


def test_bad_on_error_policy(tmp_path: Path, load) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}])
    with pytest.raises(ValueError, match="on_error='ignore'"):
        load(path, "alpaca", on_error="ignore")


# --- skip policy ------------------------------------------------------------------------------------------


def test_skip_keeps_good_records_and_reports_bad_ones(tmp_path: Path, load, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"instruction": "q1", "output": "a1"},
            {"instruction": "q2"},
            "",
            {"instruction": "q3", "output": " "},
            {"instruction": "q4", "output": "a4"},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="tunelab.data"):
        result = load(path, "alpaca", on_error="skip")
    assert [(e.response, e.source) for e in result.examples] == [("a1", f"{path}:1"), ("a4", f"{path}:5")]
    assert result.skipped == [
        f"{path}, line 2: field 'output': missing field",
        f"{path}, line 4: field 'output': empty answer (blank or whitespace only)",
    ]
    [record] = [r for r in caplog.records if r.name == "tunelab.data"]
    assert "Skipped 2 bad record(s)" in record.getMessage()
    assert "line 2: field 'output'" in record.getMessage()


def test_skip_with_every_record_bad_fails(tmp_path: Path, load) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q"}, {"output": "a"}])
    message = load_error(load, path, "alpaca", on_error="skip")
    assert message.startswith(f"no usable examples in {path} (2 bad record(s) skipped")


# --- other containers -------------------------------------------------------------------------------------


def test_json_array_and_parquet_are_located_by_record(tmp_path: Path, load) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "q1", "output": "a1"}, {"instruction": "q2", "output": None}]
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(rows, indent=2))
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (array, parquet):
        result = load(path, "alpaca", on_error="skip")
        assert [e.source for e in result.examples] == [f"{path}:record 1"]
        assert result.skipped == [f"{path}, record 2: field 'output': missing field"]


def test_malformed_json_array_names_the_line(tmp_path: Path, load) -> None:
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"instruction": "q", "output": "a"},\n  {"instruction": }\n]\n')
    assert load_error(load, path, "alpaca").startswith(f"{path}, line 3: invalid JSON")


def test_header_only_csv_and_empty_parquet_have_no_usable_examples(tmp_path: Path, load) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    header_only = tmp_path / "empty.csv"
    header_only.write_text("instruction,output\n")
    empty_parquet = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"instruction": pa.array([], pa.string())}), empty_parquet)
    for path in (header_only, empty_parquet):
        assert load_error(load, path, "alpaca") == f"no usable examples in {path}"
