"""Encoder side of the method matrix: a tiny random BERT with a 3-class head (peft task type SEQ_CLS).

Same checks as tests/test_methods.py where the method applies: what trains, how many parameters, save -> load
round trip, disabling restores the base, merging (lora, ia3). MAM needs one FFN module per block, which BERT lacks
(its FFN is two modules): it is refused with a one-sentence error.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.export import export_adapter, load_exported
from tunelab.methods import apply_method
from tunelab.methods.inhouse import adapters_disabled

from .method_helpers import (
    Architecture,
    assert_steps_change_exactly,
    assert_trainable_count,
    closed_form_trainable,
    method_cfg,
    perturb_trainable,
)

ENCODER_METHODS = [
    *("lora", "dora", "vera", "loha", "lokr", "adalora", "ia3"),
    *("prompt", "ptuning", "prefix", "ptuning_v2", "adapter", "unipelt"),
]
ENCODER_TARGETS = {
    **{name: {"target_modules": ["query", "value"]} for name in ("lora", "dora", "vera", "loha", "lokr", "adalora")},
    "ia3": {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]},
}


def tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=3,
    )


def tiny_bert():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config())


def bert_architecture(config) -> Architecture:
    """A BERT classifier: biases on every Linear, two LayerNorms per block, an embedding LayerNorm, the pooler and
    the classification head (d x num_labels + num_labels)."""
    d, ff = config.hidden_size, config.intermediate_size
    linears = {
        "attention.self.query": (d, d),
        "attention.self.key": (d, d),
        "attention.self.value": (d, d),
        "attention.output.dense": (d, d),
        "intermediate.dense": (d, ff),
        "output.dense": (ff, d),
    }
    layers, labels = config.num_hidden_layers, config.num_labels
    block_biases = sum(d_out for _, d_out in linears.values()) + 2 * d
    biases = layers * block_biases + d + d + labels  # + embedding LayerNorm, pooler, classifier
    head = d * labels + labels
    return Architecture(layers, d, d, linears, ("attention.self.query", "attention.self.value"), biases, head)


def encoder_method_cfg(name: str):
    cfg = method_cfg(name)
    for key, value in ENCODER_TARGETS.get(name, {}).items():
        cfg[key] = value
    if name == "prompt":
        cfg.init = "vocab"  # text init needs a tokenizer; this test has none
    return cfg


def batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (4, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[2:, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


def logits(model, inputs) -> torch.Tensor:
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def classification_loss(inputs):
    return lambda model: torch.nn.functional.cross_entropy(logits(model, inputs), inputs["labels"])


def adapted_bert(name):
    return apply_method(tiny_bert(), encoder_method_cfg(name))


@pytest.mark.parametrize("name", [*ENCODER_METHODS, "bitfit"])
def test_training_changes_every_trainable_tensor_and_no_frozen_one(name):
    model = adapted_bert(name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) < len(list(model.parameters()))
    assert_steps_change_exactly(model, classification_loss(batch()), trainable)


@pytest.mark.parametrize("name", [*ENCODER_METHODS, "bitfit"])
def test_trainable_parameter_count_is_the_closed_form(name):
    """What tunelab reports at start-up (and peft counts) is the method's closed form on the tiny BERT's config;
    peft-wrapped methods add their trained copy of the classification head."""
    model = adapted_bert(name)
    assert_trainable_count(
        model, closed_form_trainable(bert_architecture(tiny_bert_config()), encoder_method_cfg(name))
    )


@pytest.mark.parametrize("name", ENCODER_METHODS)
def test_save_load_round_trip_and_disable_restore_the_right_logits(name, tmp_path):
    model = adapted_bert(name)
    perturb_trainable(model)
    model.eval()
    export_adapter(model, None, tmp_path)
    reloaded = load_exported(tiny_bert(), tmp_path).eval()
    inputs = batch()
    with torch.no_grad():
        adapted_logits = logits(model, inputs)
        assert torch.equal(logits(reloaded, inputs), adapted_logits)
        base_logits = logits(tiny_bert().eval(), inputs)
        assert not torch.allclose(adapted_logits, base_logits, atol=1e-4)
        with adapters_disabled(model):
            torch.testing.assert_close(logits(model, inputs), base_logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["lora", "dora", "vera", "loha", "lokr", "adalora", "ia3"])
def test_merged_logits_equal_adapter_logits(name):
    model = adapted_bert(name)
    perturb_trainable(model)
    model.eval()
    inputs = batch()
    with torch.no_grad():
        expected = logits(model, inputs)
        torch.testing.assert_close(logits(model.merge_and_unload(), inputs), expected, atol=1e-4, rtol=0)


def test_bitfit_trains_the_existing_biases_and_round_trips(tmp_path):
    from transformers import BertForSequenceClassification

    model = adapted_bert("bitfit")
    assert all(n.endswith(".bias") for n, p in model.named_parameters() if p.requires_grad)
    perturb_trainable(model)
    model.eval().save_pretrained(tmp_path)
    inputs = batch()
    with torch.no_grad():
        reloaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
        assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


def test_mam_is_refused_on_an_encoder_with_a_two_module_ffn():
    with pytest.raises(ConfigError, match="adapts the 'ffn' sublayer, which model_type='bert'"):
        adapted_bert("mam")
