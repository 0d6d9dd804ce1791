"""Preference pairs: both record forms, located errors, skip counting, prompt masking and 2B-row collation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.data.preference import PreferenceCollator, PreferenceExample, encode_preference, load_preferences
from tunelab.data.tokenization import IGNORE_INDEX, render_prompt_ids
from tunelab.errors import ConfigError, DataError

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"}]
PLAIN = {"prompt": "What is 2 plus 3?", "chosen": " 5. ", "rejected": "6."}
MESSAGES = {
    "chosen": [*CONVERSATION, {"role": "assistant", "content": "5."}],
    "rejected": [*CONVERSATION, {"role": "assistant", "content": "6."}],
}
EXPLICIT = {
    "prompt": CONVERSATION,
    "chosen": [{"role": "assistant", "content": "5."}],
    "rejected": [{"role": "assistant", "content": "6."}],
}


def write_jsonl(path: Path, rows: list[object]) -> Path:
    """One line per row: dicts as JSON, strings verbatim (blank lines and broken JSON)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_plain_and_messages_forms_give_prompt_and_replies(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PLAIN, "", MESSAGES, EXPLICIT])
    result = load_preferences(path)
    assert result.skipped == []
    plain, implicit, explicit = result.examples
    assert plain == PreferenceExample(
        ({"role": "user", "content": "What is 2 plus 3?"},), "5.", "6.", line=1, source=f"{path}:1"
    )
    assert implicit == PreferenceExample(tuple(CONVERSATION), "5.", "6.", line=3, source=f"{path}:3")
    assert explicit == PreferenceExample(tuple(CONVERSATION), "5.", "6.", line=4, source=f"{path}:4")


def other_user(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    return [turns[0], {"role": "user", "content": "What is 2 plus 4?"}, *turns[2:]]


BAD_RECORDS = {
    "missing chosen": ({"prompt": "q", "rejected": "b"}, "chosen", "missing field"),
    "missing prompt": ({"chosen": "a", "rejected": "b"}, "prompt", "missing field"),
    "empty rejected": ({"prompt": "q", "chosen": "a", "rejected": " \n"}, "rejected", "empty rejected reply"),
    "chosen == rejected": ({"prompt": "q", "chosen": "a", "rejected": " a"}, "rejected", "equals the chosen"),
    "mixed forms": ({**MESSAGES, "rejected": "6."}, "rejected", "expected a non-empty list"),
    "unknown role": (
        {**MESSAGES, "rejected": [{"role": "bot", "content": "6."}]},
        "rejected[0].role",
        "unknown role 'bot'",
    ),
    "prompt not shared": (
        {**MESSAGES, "rejected": other_user(MESSAGES["rejected"])},
        "rejected",
        r"do not share the prompt turns \(they differ at turn 1\)",
    ),
    "no assistant reply": ({**MESSAGES, "chosen": CONVERSATION}, "chosen[1].role", "must end with the assistant"),
    "empty messages reply": (
        {**EXPLICIT, "chosen": [{"role": "assistant", "content": ""}]},
        "chosen[0].content",
        "empty chosen reply",
    ),
}


@pytest.mark.parametrize(("row", "field", "reason"), list(BAD_RECORDS.values()), ids=list(BAD_RECORDS))
def test_bad_record_error_names_file_line_and_field(tmp_path, row, field, reason):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PLAIN, row])
    with pytest.raises(DataError, match=reason) as info:
        load_preferences(path)
    assert (info.value.file, info.value.line, info.value.field) == (str(path), 2, field)
    assert str(info.value).startswith(f"{path}, line 2: field '{field}': ")


def test_skip_drops_and_counts_bad_records(tmp_path):
    rows = [PLAIN, BAD_RECORDS["missing chosen"][0], MESSAGES, BAD_RECORDS["chosen == rejected"][0]]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = load_preferences(path, on_error="skip")
    assert [example.line for example in result.examples] == [1, 3]
    assert result.skipped == [
        f"{path}, line 2: field 'chosen': missing field",
        f"{path}, line 4: field 'rejected': the rejected reply equals the chosen one",
    ]
    only_bad = write_jsonl(tmp_path / "bad.jsonl", rows[1:2])
    with pytest.raises(DataError, match=r"no usable examples .*1 bad record\(s\) skipped"):
        load_preferences(only_bad, on_error="skip")


def test_invalid_json_fails_or_is_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PLAIN, '{"prompt": "q", "chosen": "a"', "[1]"])
    with pytest.raises(DataError, match=rf"^{path}, line 2: invalid JSON: Expecting ',' delimiter \(column 30\)$"):
        load_preferences(path, on_error="fail")
    assert load_preferences(path, on_error="skip").skipped == [
        f"{path}, line 2: invalid JSON: Expecting ',' delimiter (column 30)",
        f"{path}, line 3: expected a JSON object, got list",
    ]


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_preferences(tmp_path / "missing.jsonl")
    array = tmp_path / "array.jsonl"
    array.write_text(json.dumps([PLAIN]))
    with pytest.raises(DataError, match="found a JSON array"):
        load_preferences(array)
    with pytest.raises(DataError, match="line 2: expected a JSON object, got list"):
        load_preferences(write_jsonl(tmp_path / "pairs.jsonl", [PLAIN, "[1]"]), on_error="fail")
    with pytest.raises(ConfigError, match=r"data\.on_error='drop'"):
        load_preferences(array, on_error="drop")


def test_encode_masks_the_prompt_and_collate_puts_chosen_rows_first(tokenizer):
    short = PreferenceExample(tuple(CONVERSATION), "5.", "It is 6, I think.", line=1, source="mem")
    long = PreferenceExample(tuple(CONVERSATION[1:]), "2 plus 3 is 5.", "6.", line=2, source="mem")
    pairs = [encode_preference(tokenizer, example, max_length=256) for example in (short, long)]
    for example, pair in zip((short, long), pairs, strict=True):
        prompt_ids = render_prompt_ids(tokenizer, example.prompt)
        for name in ("chosen", "rejected"):
            encoded = pair[name]
            assert encoded.input_ids[: len(prompt_ids)] == prompt_ids
            assert encoded.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
            supervised = [label for label in encoded.labels if label != IGNORE_INDEX]
            assert tokenizer.decode(supervised) == getattr(example, name) + "<|im_end|>\n"

    batch = PreferenceCollator(tokenizer.pad_token_id)(pairs)
    rows = [pairs[0]["chosen"], pairs[1]["chosen"], pairs[0]["rejected"], pairs[1]["rejected"]]
    width = max(len(row.input_ids) for row in rows)
    assert {key: tuple(value.shape) for key, value in batch.items()} == dict.fromkeys(batch, (4, width))
    for index, row in enumerate(rows):
        length = len(row.input_ids)
        assert batch["input_ids"][index, :length].tolist() == row.input_ids
        assert batch["labels"][index].tolist() == row.labels + [IGNORE_INDEX] * (width - length)
        assert batch["attention_mask"][index].tolist() == [1] * length + [0] * (width - length)

    prompt_length = len(render_prompt_ids(tokenizer, short.prompt))
    assert encode_preference(tokenizer, short, max_length=prompt_length) is None
