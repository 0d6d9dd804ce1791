"""The worked example's pieces: cue-word analyses, label metrics read from generated answers (vs sklearn),
and an SFT run scoring label accuracy next to ROUGE."""

from __future__ import annotations

import json

import pytest

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
    from sklearn.metrics import accuracy_score, f1_score

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


def test_sft_run_scores_the_stated_label(tmp_path, compose_cfg):
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
        "trainer.max_epochs=2",
        "task.generation.labels=[negative,neutral,positive]",
        "task.generation.max_new_tokens=12",
    ]
    metrics, _ = train(compose_cfg(overrides))
    for key in ("untrained/val/label_acc", "val/label_acc", "val/label_macro_f1", "test/label_acc", "test/rougeL"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["val/label_unparsed"] <= 4
