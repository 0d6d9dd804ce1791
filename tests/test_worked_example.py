"""The worked example's pieces: cue-word analyses, label metrics read from generated answers (vs sklearn),
and an SFT run scoring label accuracy next to ROUGE."""

from __future__ import annotations

import json
import re

import pytest
from sklearn.metrics import accuracy_score, f1_score

from tunelab.assets.finsent_explained import analysis, parse_lexicon
from tunelab.metrics.text import GeneratedLabelMetrics
from tunelab.train import train

from .conftest import SENTIMENT_WORDS, synthetic_sentiment, tiny_overrides

LABELS = ["negative", "neutral", "positive"]


def test_analysis_names_strong_cues_strongest_first():
    lexicon = parse_lexicon(
        "gain\t2.0\t0.5\t[]\ncrisis\t-3.1\t0.7\t[]\nok\t0.9\t0.3\t[]\nl\t2.0\t0.1\t[]\nfail\t-2.3\t1\t[]\n"
    )
    text = "Crisis averted, a gain of 5 % is ok; l failed to fail."
    assert analysis(text, lexicon) == "Analysis: positive cues: gain (+2.0); negative cues: crisis (-3.1), fail (-2.3)."
    assert analysis("Board meets on Tuesday", lexicon) == "Analysis: no strong sentiment words."


def test_generated_label_metrics_equal_sklearn():
    references = [
        f"Sentiment: {label}\nAnalysis: x." for label in ["negative", "neutral", "positive", "positive", "neutral"]
    ]
    predictions = [
        "Sentiment: negative\nAnalysis: y.",
        "Sentiment: Positive.",  # wrong label; case and full stop ignored
        "Analysis first\nSentiment: positive",
        "I think it is good",  # states no label: wrong, counted as unparsed
        "Sentiment: neutral",
    ]
    metrics = GeneratedLabelMetrics(LABELS, "Sentiment")
    metrics.update(predictions[:2], references[:2])
    metrics.update(predictions[2:], references[2:])
    result = metrics.compute()
    truth, predicted = [0, 1, 2, 2, 1], [0, 2, 2, 3, 1]
    assert result["val/label_acc"].item() == pytest.approx(accuracy_score(truth, predicted))
    expected_f1 = f1_score(truth, predicted, labels=[0, 1, 2], average="macro")
    assert result["val/label_macro_f1"].item() == pytest.approx(expected_f1, abs=1e-6)
    assert result["val/label_unparsed"].item() == 1
    with pytest.raises(ValueError, match="states no"):
        metrics.update(["Sentiment: neutral"], ["no label here"])


def stated_label(text: str) -> str | None:
    """The label on the first ``Sentiment:`` line, read independently of GeneratedLabelMetrics (a regex)."""
    found = re.search(r"^\s*sentiment\s*:\s*([a-z]+)\s*\.?\s*$", text, re.IGNORECASE | re.MULTILINE)
    label = found.group(1).lower() if found else None
    return label if label in LABELS else None


def cue_oracle(model, tokenizer, prompt_input_ids, prompt_attention_mask, max_new_tokens) -> list[str]:
    """Stands in for generation: states the label the prompt's cue words carry, except for neutral texts, where it
    states none (so accuracy, macro-F1 and the unparsed count all have something to get right)."""
    answers = []
    for prompt in tokenizer.batch_decode(prompt_input_ids, skip_special_tokens=True):
        cue = next(label for label, words in SENTIMENT_WORDS.items() if any(f" {w} " in prompt for w in words))
        answers.append("I cannot tell." if cue == "neutral" else f"Analysis: cues.\nSentiment: {cue}.")
    return answers


def test_sft_run_scores_the_stated_label(tmp_path, compose_cfg, monkeypatch):
    """Through the whole pipeline (generation -> parser -> metrics -> metrics.json), the test label metrics equal
    sklearn's on the run's own answers, parsed by a regex, and the hand-derived values for the oracle's answers."""
    monkeypatch.setattr("tunelab.tasks.sft.generate_answers", cue_oracle)
    path = tmp_path / "explained.jsonl"
    rows = [
        {
            "instruction": "Sentiment and analysis?",
            "input": row["text"],
            "output": f"Sentiment: {row['label']}\nAnalysis: cue {SENTIMENT_WORDS[row['label']][0]}.",
        }
        for row in synthetic_sentiment(120)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = [
        *tiny_overrides(path, tmp_path / "run"),
        "method=lora",
        "trainer.max_steps=2",
        "task.generation.num_samples=16",
        "task.generation.labels=[negative,neutral,positive]",
    ]
    metrics, objects = train(compose_cfg(overrides))
    samples = objects["module"].test_samples
    truth = [stated_label(sample["reference"]) for sample in samples]
    predicted = [stated_label(sample["prediction"]) or "unparsed" for sample in samples]
    assert len(samples) == 16 and None not in truth
    neutral = truth.count("neutral")
    assert 0 < neutral < len(samples)
    assert metrics["test/label_acc"] == pytest.approx(accuracy_score(truth, predicted))
    assert metrics["test/label_acc"] == pytest.approx(1 - neutral / len(samples))
    assert metrics["test/label_macro_f1"] == pytest.approx(f1_score(truth, predicted, labels=LABELS, average="macro"))
    assert metrics["test/label_unparsed"] == neutral
    assert metrics["untrained/val/label_unparsed"] > 0 and 0 < metrics["untrained/val/label_acc"] < 1
