"""Arithmetic questions with verifiable answers, built offline from reasoning-gym: prompts for PPO, preference
pairs for reward modelling and DPO, and thumbs-up / thumbs-down feedback for KTO.

Questions come from reasoning-gym's ``basic_arithmetic`` generator (``"Calculate 47 - 18."``: two terms of one or
two digits, ``+`` / ``-``, no parentheses), asked as one user turn ending in :data:`ASK`. Each record keeps the
generator's entry (``answer``, ``metadata``), which is what its scorer needs: correct answers score 1.0, a reply
merely containing the answer ``len(answer) / len(reply)``, anything else 0.0 (:mod:`tunelab.rewards.verifiable`).

- ``arith_prompts/arith_prompts.jsonl``: ``{"id", "prompt", "answer", "metadata"}`` (PPO's prompts).
- ``arith_prefs/arith_prefs.jsonl``: ``{"id", "prompt", "chosen", "rejected", "answer", "metadata"}`` with the
  correct answer as ``chosen`` and a near miss as ``rejected``: the answer plus an offset from
  :data:`NEAR_MISS_OFFSETS` (carry and sign slips), kept only where the scorer gives it 0.0. Near misses are
  checked-wrong answers a model plausibly writes; sampling the model itself would make the set depend on a
  model's weights and take minutes to build.
- ``arith_feedback/arith_feedback.jsonl``: ``{"id", "prompt", "completion", "label", "answer", "metadata"}``: one
  answer per question, the right one or a near miss (a seeded coin, :data:`FEEDBACK_RIGHT_SHARE` right), and
  ``label`` the scorer's verdict on it (``true``: it scores 1.0, a thumbs-up; ``false``: 0.0, a thumbs-down). The
  set is about balanced; ``data.desirable_share`` thins it to the imbalance of real feedback at load time.

Both sets use their own generator seed, so no question text is shared by accident beyond what the generator
repeats (two-term sums of small numbers do repeat: duplicates are dropped, first kept).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tunelab.assets.cache import ensure_entry

GENERATOR = "basic_arithmetic"
GENERATOR_OPTIONS = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 2,
    "operators": ("+", "-"),
    "allow_parentheses": False,
    "allow_negation": False,
}
ASK = " Reply with the number only."
CANDIDATES = 3000  # generated entries per set before duplicates are dropped
PROMPTS_SEED, PREFS_SEED, OFFSET_SEED, FEEDBACK_SEED, COIN_SEED = 11, 12, 13, 14, 15
FEEDBACK_RIGHT_SHARE = 0.5  # share of questions answered right in arith_feedback
NEAR_MISS_OFFSETS = (-10, -2, -1, 1, 2, 10)


def generate(seed: int) -> tuple[list[dict[str, Any]], Any]:
    """Unique-question entries of the generator (first kept) and the generator itself (its scorer)."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(GENERATOR, size=CANDIDATES, seed=seed, **GENERATOR_OPTIONS)
    unique: dict[str, dict[str, Any]] = {}
    for entry in dataset:
        unique.setdefault(entry["question"], entry)
    return list(unique.values()), dataset


def prompt_record(index: int, entry: dict[str, Any]) -> dict[str, Any]:
    metadata = {**entry["metadata"], "source_dataset": GENERATOR}
    return {
        "id": f"{GENERATOR}:{index}",
        "prompt": entry["question"] + ASK,
        "answer": entry["answer"],
        "metadata": metadata,
    }


def near_miss(entry: dict[str, Any], scorer: Any, rng: random.Random) -> str | None:
    """A wrong answer close to the right one that the scorer gives 0.0, or None if every offset scores above 0."""
    offsets = list(NEAR_MISS_OFFSETS)
    rng.shuffle(offsets)
    for offset in offsets:
        candidate = str(int(entry["answer"]) + offset)
        if scorer.score_answer(answer=candidate, entry=entry) == 0.0:
            return candidate
    return None


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as out:
        out.writelines(json.dumps(row) + "\n" for row in rows)


def _build_prompts(directory: Path) -> dict[str, Any]:
    entries, _ = generate(PROMPTS_SEED)
    _write(directory / "arith_prompts.jsonl", [prompt_record(i, entry) for i, entry in enumerate(entries)])
    return {"generator": GENERATOR, "options": GENERATOR_OPTIONS, "seed": PROMPTS_SEED, "rows": len(entries)}


def _build_prefs(directory: Path) -> dict[str, Any]:
    entries, scorer = generate(PREFS_SEED)
    rng = random.Random(OFFSET_SEED)
    rows, no_near_miss = [], 0
    for index, entry in enumerate(entries):
        rejected = near_miss(entry, scorer, rng)
        if rejected is None:
            no_near_miss += 1
            continue
        rows.append({**prompt_record(index, entry), "chosen": entry["answer"], "rejected": rejected})
    _write(directory / "arith_prefs.jsonl", rows)
    return {"generator": GENERATOR, "seed": PREFS_SEED, "rows": len(rows), "dropped_no_near_miss": no_near_miss}


def _build_feedback(directory: Path) -> dict[str, Any]:
    entries, scorer = generate(FEEDBACK_SEED)
    offsets, coin = random.Random(OFFSET_SEED), random.Random(COIN_SEED)
    rows, no_near_miss = [], 0
    for index, entry in enumerate(entries):
        answer = entry["answer"] if coin.random() < FEEDBACK_RIGHT_SHARE else near_miss(entry, scorer, offsets)
        if answer is None:
            no_near_miss += 1
            continue
        label = scorer.score_answer(answer=answer, entry=entry) == 1.0
        rows.append({**prompt_record(index, entry), "completion": answer, "label": label})
    _write(directory / "arith_feedback.jsonl", rows)
    desirable = sum(row["label"] for row in rows)
    return {
        "generator": GENERATOR,
        "seed": FEEDBACK_SEED,
        "rows": len(rows),
        "desirable": desirable,
        "undesirable": len(rows) - desirable,
        "dropped_no_near_miss": no_near_miss,
    }


def ensure_arith_prompts(cache_dir: str | Path) -> Path:
    """``<cache_dir>/arith_prompts/arith_prompts.jsonl``, built on first use."""
    return ensure_entry(cache_dir, "arith_prompts", _build_prompts) / "arith_prompts.jsonl"


def ensure_arith_prefs(cache_dir: str | Path) -> Path:
    """``<cache_dir>/arith_prefs/arith_prefs.jsonl``, built on first use."""
    return ensure_entry(cache_dir, "arith_prefs", _build_prefs) / "arith_prefs.jsonl"


def ensure_arith_feedback(cache_dir: str | Path) -> Path:
    """``<cache_dir>/arith_feedback/arith_feedback.jsonl``, built on first use."""
    return ensure_entry(cache_dir, "arith_feedback", _build_feedback) / "arith_feedback.jsonl"
