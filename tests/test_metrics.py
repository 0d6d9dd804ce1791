"""GenerationMetrics against sacrebleu / rouge_score references, and token_accuracy on hand-computed cases."""

from __future__ import annotations

import pytest
import sacrebleu
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rouge_score import rouge_scorer

from tunelab.metrics.text import GenerationMetrics, token_accuracy

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")

PAIRS = [
    ("The cat sat on the mat.", "The cat sat on the mat."),  # exact match
    (
        "Paris is the capital of France.\nIt is known for the Eiffel Tower.",
        "The Eiffel Tower is in Paris.\nParis is the capital city of France.",
    ),  # multi-sentence, newline-separated
    ("quantum chromodynamics", "a recipe for banana bread"),  # no overlap
    ("", "The answer is forty two."),  # empty prediction
    ("The runners were running quickly to the station", "A runner runs quick to the stations"),  # stemming
    ("I think the answer is 42 because six times seven", "The answer is 42 since six times seven is 42"),
]
PREDICTIONS = [p for p, _ in PAIRS]
REFERENCES = [r for _, r in PAIRS]
# "Equal to sacrebleu / rouge_score": the same value up to float32 rounding of the float64 references (measured: 3e-8
# relative on BLEU ~30-38, 1e-7 on ROUGE ~0.5).
FLOAT32 = {"rel": 1e-6}


def expected_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """sacrebleu corpus BLEU and rouge_score F-measures (newline-split rougeLsum) averaged over pairs."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    expected = {"val/bleu": sacrebleu.corpus_bleu(predictions, [references]).score}
    for key in ROUGE_KEYS:
        expected[f"val/{key}"] = sum(s[key].fmeasure for s in scores) / len(scores)
    return expected


def as_floats(result: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: value.item() for key, value in result.items()}


def test_matches_sacrebleu_and_rouge_score() -> None:
    metrics = GenerationMetrics()
    metrics.update(PREDICTIONS, REFERENCES)
    result = metrics.compute()

    assert all(value.ndim == 0 for value in result.values())
    assert as_floats(result) == pytest.approx(expected_scores(PREDICTIONS, REFERENCES), **FLOAT32)


def test_bleu_matches_sacrebleu_smoothing_when_an_ngram_order_has_no_match() -> None:
    # One trigram match ("sat on mat") but no 4-gram match: sacrebleu's 'exp' smoothing still gives > 0.
    predictions, references = ["the big cat sat on mat"], ["the big dog sat on mat"]
    metrics = GenerationMetrics(prefix="")
    metrics.update(predictions, references)

    expected = sacrebleu.corpus_bleu(predictions, [references]).score
    assert expected > 1.0
    assert metrics.compute()["bleu"].item() == pytest.approx(expected, **FLOAT32)


def test_rouge_lsum_splits_sentences_on_newlines() -> None:
    # No sentence punctuation: only the newlines mark sentence boundaries.
    prediction = "paris is the capital of france\nit is known for the eiffel tower"
    reference = "the eiffel tower is in paris\nparis is the capital city of france"
    metrics = GenerationMetrics(prefix="")
    metrics.update([prediction], [reference])
    result = as_floats(metrics.compute())

    scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
    expected = scorer.score(reference, prediction)
    # Guard that the pair discriminates: summary-level LCS over the two lines beats the plain LCS.
    assert expected["rougeLsum"].fmeasure > expected["rougeL"].fmeasure + 0.05
    assert result["rougeLsum"] == pytest.approx(expected["rougeLsum"].fmeasure, **FLOAT32)
    assert result["rougeL"] == pytest.approx(expected["rougeL"].fmeasure, **FLOAT32)


def test_single_empty_prediction_scores_zero() -> None:
    metrics = GenerationMetrics(prefix="")
    metrics.update([""], ["some reference text"])
    assert as_floats(metrics.compute()) == {"bleu": 0.0, **dict.fromkeys(ROUGE_KEYS, 0.0)}


def test_two_chunks_equal_one_call() -> None:
    whole = GenerationMetrics()
    whole.update(PREDICTIONS, REFERENCES)

    chunked = GenerationMetrics()
    chunked.update(PREDICTIONS[:2], REFERENCES[:2])
    chunked.update(PREDICTIONS[2:], REFERENCES[2:])

    assert as_floats(chunked.compute()) == pytest.approx(as_floats(whole.compute()), abs=1e-6)


def test_reset_clears_state() -> None:
    metrics = GenerationMetrics()
    metrics.update(["completely unrelated words here"], ["nothing in common at all"])
    metrics.reset()
    metrics.update(PREDICTIONS, REFERENCES)

    assert as_floats(metrics.compute()) == pytest.approx(expected_scores(PREDICTIONS, REFERENCES), **FLOAT32)


def test_prefix_and_keys() -> None:
    metrics = GenerationMetrics(prefix="test/")
    metrics.update(PREDICTIONS[:1], REFERENCES[:1])
    assert set(metrics.compute()) == {"test/bleu", *(f"test/{key}" for key in ROUGE_KEYS)}


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="references"):
        GenerationMetrics().update(["a", "b"], ["a"])


def _ddp_worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        expected = expected_scores(PREDICTIONS, REFERENCES)
        for rank0_pairs in (3, 5, 6):  # even, uneven, and rank 1 without any pair
            metrics = GenerationMetrics()
            shard = slice(0, rank0_pairs) if rank == 0 else slice(rank0_pairs, None)
            metrics.update(PREDICTIONS[shard], REFERENCES[shard])
            assert as_floats(metrics.compute()) == pytest.approx(expected, **FLOAT32), rank0_pairs
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sync_over_uneven_shards(tmp_path) -> None:
    mp.spawn(_ddp_worker, args=(str(tmp_path / "dist_init"),), nprocs=2)


def logits_with_argmax(argmax: list[list[int]], vocab: int = 5) -> torch.Tensor:
    """(batch, seq, vocab) logits whose argmax over the vocabulary is ``argmax``."""
    return torch.nn.functional.one_hot(torch.tensor(argmax), vocab).float()


def test_token_accuracy_uses_causal_shift() -> None:
    # logits[:, t] predicts labels[:, t + 1]: pairs (2, 2) right, (3, 3) right, (0, 4) wrong -> 2/3.
    # Without the shift it would compare (3, 2), (0, 3), (1, 4) -> 0.
    logits = logits_with_argmax([[2, 3, 0, 1]])
    labels = torch.tensor([[-100, 2, 3, 4]])

    accuracy = token_accuracy(logits, labels)

    assert accuracy.ndim == 0 and accuracy.is_floating_point()
    assert accuracy.item() == pytest.approx(2 / 3)


def test_token_accuracy_skips_ignored_positions() -> None:
    # Row 0 shifted pairs: (2, 2) right, (3, 3) right, (0, 4) wrong.
    # Row 1 shifted pairs: (1, -100) ignored, (1, 1) right, (1, -100) ignored.  -> 3 / 4.
    logits = logits_with_argmax([[2, 3, 0, 1], [1, 1, 1, 1]])
    labels = torch.tensor([[1, 2, 3, 4], [-100, -100, 1, -100]])

    assert token_accuracy(logits, labels).item() == pytest.approx(3 / 4)
    labels_ignore_7 = labels.masked_fill(labels == -100, 7)
    assert token_accuracy(logits, labels_ignore_7, ignore_index=7).item() == pytest.approx(3 / 4)


def test_token_accuracy_without_supervised_positions_is_zero() -> None:
    # Only labels[:, 0] is supervised; it is never a next-token target (unshifted, it would count as right).
    logits = logits_with_argmax([[3, 3, 0, 1]])
    labels = torch.tensor([[3, -100, -100, -100]])

    accuracy = token_accuracy(logits, labels)

    assert not torch.isnan(accuracy)
    assert accuracy.item() == 0.0
