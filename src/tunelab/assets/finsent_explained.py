"""finsent with explanations: news item -> "Sentiment: <label>" + a short analysis, for the worked example.

Each finsent record (see :mod:`tunelab.assets.finsent`) becomes an instruction example (alpaca fields):
``instruction`` asks for the sentiment and a brief analysis, ``input`` is the news text, ``output`` is

    Sentiment: <negative | neutral | positive>
    Analysis: positive cues: <word> (+v), ...; negative cues: <word> (-v), ...

The label is finsent's (human ratings / annotations). The analysis is derived, not written by people: it
names the words of the text that VADER's lexicon (``vaderSentiment/vader_lexicon.txt``: 7,520 tokens, each the
mean of 10 human valence ratings in [-4, 4]) rates at least ``CUE_THRESHOLD`` in absolute value, strongest
first, at most ``MAX_CUES`` per polarity; "no strong sentiment words" when there are none. It is a grounded
rationale a model can learn to produce (the cues are in the input), so ROUGE on it measures whether the model
picks out the sentiment-bearing words. No packaged data set pairs financial news with written analyses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tunelab.assets.cache import ensure_entry
from tunelab.assets.finsent import ensure_finsent, read_vader_file, vader_archive

FILE_NAME = "finsent_explained.jsonl"
LEXICON = "vaderSentiment/vader_lexicon.txt"
CUE_THRESHOLD = 1.5
MAX_CUES = 3
INSTRUCTION = (
    "Classify the sentiment of this financial news item as positive, negative or neutral, "
    "then give a one-line analysis of the words that carry it."
)
WORD = re.compile(r"[a-z][a-z']{2,}")  # words of 3+ letters (the lexicon also rates letters such as 'l')


def parse_lexicon(text: str) -> dict[str, float]:
    """``token -> mean valence`` from VADER's tab-separated lexicon (token, mean, sd, ratings)."""
    return {line.split("\t")[0]: float(line.split("\t")[1]) for line in text.splitlines() if line.strip()}


def analysis(text: str, lexicon: dict[str, float]) -> str:
    """The cue-word analysis line of ``text`` (see module docstring)."""
    words = dict.fromkeys(WORD.findall(text.lower()))
    cues = sorted(
        ((word, lexicon[word]) for word in words if abs(lexicon.get(word, 0.0)) >= CUE_THRESHOLD),
        key=lambda cue: -abs(cue[1]),
    )
    parts = []
    for name, sign in (("positive", 1), ("negative", -1)):
        chosen = [f"{word} ({value:+.1f})" for word, value in cues if value * sign > 0][:MAX_CUES]
        if chosen:
            parts.append(f"{name} cues: {', '.join(chosen)}")
    return "Analysis: " + ("; ".join(parts) if parts else "no strong sentiment words") + "."


def _build(directory: Path, finsent_file: Path) -> dict[str, object]:
    lexicon = parse_lexicon(read_vader_file(vader_archive(), LEXICON))
    rows = [json.loads(line) for line in finsent_file.read_text(encoding="utf-8").splitlines()]
    with (directory / FILE_NAME).open("w", encoding="utf-8", newline="\n") as out:
        for row in rows:
            output = f"Sentiment: {row['label']}\n{analysis(row['text'], lexicon)}"
            example = {"id": row["id"], "instruction": INSTRUCTION, "input": row["text"], "output": output}
            out.write(json.dumps(example, ensure_ascii=False) + "\n")
    return {"rows": len(rows), "lexicon_tokens": len(lexicon), "cue_threshold": CUE_THRESHOLD}


def ensure_finsent_explained(cache_dir: str | Path) -> Path:
    """Path of ``<cache_dir>/finsent_explained/finsent_explained.jsonl``, built on first use."""
    finsent_file = ensure_finsent(cache_dir)
    return ensure_entry(cache_dir, "finsent_explained", lambda directory: _build(directory, finsent_file)) / FILE_NAME
