"""paraphrase-MiniLM-L3-v2 converted from the packaged ONNX file: same outputs as onnxruntime, usable as a backbone."""

from __future__ import annotations

import re
from importlib import metadata

import pytest
import torch
import torch.nn.functional as F

from tunelab.assets.minilm import INSTALL_HINT, ensure_minilm_l3, onnx_path
from tunelab.errors import ConfigError

pytestmark = pytest.mark.slow  # a real model: MiniLM-L3 converted from ONNX and run against onnxruntime

# Outputs of the sentence-transformers export: the last LayerNorm (token states) and the mean pooling.
ONNX_HIDDEN, ONNX_POOLED = "onnx::Shape_422", "461"
SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone plays the guitar in front of an audience.",
    "The central bank raised interest rates by half a percentage point to fight persistent inflation.",
]


@pytest.fixture(scope="module")
def checkpoint(cache_dir):
    return ensure_minilm_l3(cache_dir)


@pytest.fixture(scope="module")
def encoded(checkpoint):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    model = AutoModel.from_pretrained(checkpoint, add_pooling_layer=False).eval()
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return batch, hidden


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def test_converted_model_matches_onnxruntime(encoded):
    import onnxruntime

    batch, hidden = encoded
    assert batch["attention_mask"].sum(1).unique().numel() == len(SENTENCES)  # three lengths: padding is exercised
    session = onnxruntime.InferenceSession(str(onnx_path()), providers=["CPUExecutionProvider"])
    inputs = {name: batch[name].numpy() for name in ("input_ids", "attention_mask")}
    onnx_hidden, onnx_pooled = session.run([ONNX_HIDDEN, ONNX_POOLED], inputs)
    # experiments/finsent_sentiment/README.md: within 1.9e-6 (measured: token states 1.6e-6, pooled 4.5e-7)
    hidden_gap = (hidden - torch.from_numpy(onnx_hidden)).abs().max().item()
    pooled_gap = (mean_pool(hidden, batch["attention_mask"]) - torch.from_numpy(onnx_pooled)).abs().max().item()
    assert hidden_gap <= 1.9e-6 and pooled_gap <= 1.9e-6, (hidden_gap, pooled_gap)


def test_paraphrases_are_closer_than_unrelated_sentences(encoded):
    batch, hidden = encoded
    guitar, paraphrase, bank = mean_pool(hidden, batch["attention_mask"])
    assert F.cosine_similarity(guitar, paraphrase, dim=0) > F.cosine_similarity(guitar, bank, dim=0) + 0.3


def test_classification_head_loads_with_only_pooler_and_classifier_new(checkpoint):
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=3, output_loading_info=True)
    new = {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    assert set(info["missing_keys"]) == new
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.num_hidden_layers == 3 and model.config.num_labels == 3


def test_missing_package_names_the_pip_command_and_leaves_no_partial_entry(tmp_path, monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    with pytest.raises(ConfigError, match=re.escape(INSTALL_HINT)):
        ensure_minilm_l3(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".minilm-l3.lock"]
