"""General English prose the fine-tuning data never contains: "In the Year 2889" (Jules and Michel Verne, 1889;
public domain), the Project Gutenberg text (eBook #19362) that the ``reasoning-gym`` package ships as a data file.

Held-out general text for :mod:`tunelab.forgetting` (loss before / after training) and the ``tunelab_verne``
harness task (:mod:`tunelab.harness`). Only the story is kept: the text between Gutenberg's ``*** START OF`` and
``*** END OF`` lines, cut into paragraphs at blank lines (whitespace collapsed), without the editor's bracketed
notes, Gutenberg's closing line and the lines shorter than :data:`MIN_PARAGRAPH_WORDS` words (titles, credits).
Consecutive paragraphs are joined (with a blank line between them) until a passage holds at least
:data:`PASSAGE_WORDS` words; a shorter remainder at the end joins the last passage. Each passage is one JSON line
``{"id": "verne:<n>", "text": ...}`` in story order; the same reasoning-gym release gives the same bytes.
"""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

from tunelab.assets.cache import ensure_entry

FILE_NAME = "verne.jsonl"
SOURCE = "in_the_year_2889.txt"
MIN_PARAGRAPH_WORDS = 8
PASSAGE_WORDS = 120
START, END = "*** START OF", "*** END OF"
LEFT_OUT = ("[", "End of Project Gutenberg")  # the editor's notes, Gutenberg's closing line


def paragraphs(text: str) -> list[str]:
    """The story's paragraphs: between the Gutenberg markers, whitespace collapsed, :data:`LEFT_OUT` and short
    lines left out."""
    body = text[text.index("\n", text.index(START)) : text.index(END)]
    found = (" ".join(block.split()) for block in re.split(r"\n\s*\n", body))
    return [p for p in found if len(p.split()) >= MIN_PARAGRAPH_WORDS and not p.startswith(LEFT_OUT)]


def passages(paragraph_list: list[str]) -> list[str]:
    """Consecutive paragraphs joined until each passage has at least :data:`PASSAGE_WORDS` words."""
    grouped: list[list[str]] = [[]]
    for paragraph in paragraph_list:
        if sum(len(p.split()) for p in grouped[-1]) >= PASSAGE_WORDS:
            grouped.append([])
        grouped[-1].append(paragraph)
    if len(grouped) > 1 and sum(len(p.split()) for p in grouped[-1]) < PASSAGE_WORDS:
        grouped[-2].extend(grouped.pop())
    return ["\n\n".join(group) for group in grouped]


def _build(directory: Path) -> dict[str, object]:
    from reasoning_gym.data import read_data_file

    rows = [{"id": f"verne:{i}", "text": text} for i, text in enumerate(passages(paragraphs(read_data_file(SOURCE))))]
    with (directory / FILE_NAME).open("w", encoding="utf-8", newline="\n") as out:
        out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return {
        "passages": len(rows),
        "words": sum(len(row["text"].split()) for row in rows),
        "source": f"reasoning_gym/data/{SOURCE} (Project Gutenberg eBook #19362, public domain)",
        "reasoning_gym": metadata.version("reasoning-gym"),
    }


def ensure_verne(cache_dir: str | Path) -> Path:
    """Path of ``<cache_dir>/verne/verne.jsonl`` (passages, see module docstring), built on first use."""
    return ensure_entry(cache_dir, "verne", _build) / FILE_NAME
