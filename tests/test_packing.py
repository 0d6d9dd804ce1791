"""Packed (padding-free) batches learn what padded batches learn: same loss, same gradients, no attention across
examples; length-grouped sampling; packing in the SFT pipeline."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tunelab.config_checks import check_config, check_packing
from tunelab.data.collate import PackedCollator, TrainingCollator
from tunelab.data.loading import load_examples
from tunelab.data.sampler import ResumableSampler
from tunelab.data.tokenization import encode_examples
from tunelab.errors import ConfigError
from tunelab.methods import METHODS
from tunelab.models.segment_attention import runs_segment_attention, use_segment_attention
from tunelab.tasks import OBJECTIVES
from tunelab.tasks.sft import causal_lm_loss
from tunelab.train import train

from .conftest import tiny_overrides

# Packed and padded batches sum the same products in another order: the loss comes out bit for bit equal, the LoRA
# gradients (largest ~0.1, one fp32 ulp 7.5e-9) within 1.5e-8 on 1 thread and 1.7e-8 on 2-4; 3e-8 is 4 ulps.
GRADIENT_TOLERANCE = 3e-8


@pytest.fixture(scope="module")
def tiny_lora(cache_dir):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tunelab.methods import apply_method
    from tunelab.models.loading import load_model

    from .conftest import CONFIGS

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=tiny", "method=lora", "method.dropout=0"])
    loaded = load_model(cfg.model, cache_dir)
    torch.manual_seed(0)
    model = apply_method(loaded.model, cfg.method, loaded.tokenizer)
    for name, param in model.named_parameters():  # a trained-looking adapter, so its gradients are not trivial
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    return model.eval(), OmegaConf.to_container(cfg.model)


@pytest.fixture(scope="module")
def examples(alpaca_file, tokenizer):
    records = load_examples(alpaca_file, "alpaca").examples[:6]
    encoded, _ = encode_examples(tokenizer, records, max_length=64)
    assert len({len(ex.input_ids) for ex in encoded}) > 1, "the test needs examples of different lengths"
    return encoded


def loss_and_grads(model, batch, segments: bool = False):
    model.zero_grad()
    packed = {"position_ids": batch["position_ids"], "use_cache": False} if "position_ids" in batch else {}
    if segments:
        packed["segment_lengths"] = batch["segment_lengths"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), **packed).logits
    loss, count = causal_lm_loss(logits, batch["labels"])
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.item(), count.item(), grads


def test_packed_batch_gives_the_padded_batch_loss_and_gradients(tiny_lora, examples, tokenizer):
    model, _ = tiny_lora
    padded = TrainingCollator(tokenizer.pad_token_id)(examples)
    packed = PackedCollator()(examples)
    assert packed["input_ids"].shape == (1, sum(len(ex.input_ids) for ex in examples))
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # no padding
    padded_loss, padded_count, padded_grads = loss_and_grads(model, padded)
    packed_loss, packed_count, packed_grads = loss_and_grads(model, packed)
    assert packed_count == padded_count
    assert packed_loss == padded_loss, abs(packed_loss - padded_loss)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=GRADIENT_TOLERANCE, rtol=0, msg=name)


def test_packed_examples_do_not_attend_to_each_other(tiny_lora, examples):
    model, _ = tiny_lora
    batch = PackedCollator()(examples[:2])
    first = len(examples[0].input_ids)
    changed = batch["input_ids"].clone()
    changed[0, :first] = (changed[0, :first] + 7) % model.config.vocab_size  # rewrite the first example only
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        after = model(input_ids=changed, position_ids=batch["position_ids"], use_cache=False).logits
    torch.testing.assert_close(after[0, first:], before[0, first:], atol=0, rtol=0)  # unchanged, bit for bit
    assert not torch.allclose(after[0, :first], before[0, :first])


def test_segment_attention_gives_the_padded_batch_loss_and_gradients(tiny_lora, examples, tokenizer):
    """Segment attention (one causal attention call per packed example) computes what the padded batch computes,
    and what the dense block-diagonal mask computes, without the cross-example blocks."""
    model, _ = tiny_lora
    segmented = copy.deepcopy(model)
    assert use_segment_attention(segmented) and runs_segment_attention(segmented)
    assert not runs_segment_attention(model)
    packed = PackedCollator()(examples)
    assert packed["segment_lengths"] == [len(ex.input_ids) for ex in examples]
    padded_loss, _, padded_grads = loss_and_grads(model, TrainingCollator(tokenizer.pad_token_id)(examples))
    masked_loss, _, _ = loss_and_grads(model, packed)
    segment_loss, _, segment_grads = loss_and_grads(segmented, packed, segments=True)
    assert segment_loss == padded_loss == masked_loss, (segment_loss, padded_loss, masked_loss)
    for name, grad in padded_grads.items():  # measured: 7.5e-9 (1 ulp)
        torch.testing.assert_close(segment_grads[name], grad, atol=GRADIENT_TOLERANCE, rtol=0, msg=name)
    with pytest.raises(ValueError, match="do not tile"):
        loss_and_grads(segmented, {**packed, "segment_lengths": packed["segment_lengths"][1:]}, segments=True)


def test_length_grouped_sampler_sorts_each_run_and_keeps_every_sample():
    lengths = [5, 40, 12, 33, 7, 21, 9, 50, 3, 18, 27, 11]
    order = list(ResumableSampler(12, shuffle=True, seed=1, lengths=lengths, group_size=4))
    assert sorted(order) == list(range(12))
    for start in range(0, 12, 4):
        run = [lengths[i] for i in order[start : start + 4]]
        assert run == sorted(run, reverse=True)
    plain = list(ResumableSampler(12, shuffle=True, seed=1))
    assert [set(plain[s : s + 4]) for s in range(0, 12, 4)] == [set(order[s : s + 4]) for s in range(0, 12, 4)]


def test_packed_length_grouped_sft_run_learns(alpaca_file, compose_cfg, tmp_path):
    overrides = [*tiny_overrides(alpaca_file, tmp_path), "data.packing=true", "data.group_by_length=true"]
    _, objects = train(compose_cfg([*overrides, "trainer.max_epochs=2", "task.generation.num_samples=0"]))
    assert objects["module"].segment_attention  # model=tiny asks for sdpa: packed rows attend per example
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["val/loss"] < metrics["untrained/val/loss"]


def test_packing_refuses_what_it_cannot_keep_apart(compose_cfg, tmp_path):
    cfg = compose_cfg(["data.packing=true", "method=prefix", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="virtual tokens"):
        check_config(cfg)
    cfg = compose_cfg(["data.packing=true", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="packs SFT examples"):  # an SFT data set read by padded batches
        check_packing(cfg, OBJECTIVES["distill"], METHODS[cfg.method.name])


def test_gradient_checkpointing_saves_fewer_activations_and_keeps_the_gradients(cache_dir, examples, compose_cfg):
    """``model.gradient_checkpointing=true`` keeps only each block's input for backward (recomputing the rest):
    the forward saves a fraction of the tensors it saves otherwise (the logits, outside the blocks, stay), and the
    loss and gradients do not change, on a packed batch through segment attention too."""
    from tunelab.methods import apply_method
    from tunelab.models.loading import load_model

    packed = PackedCollator()(examples)
    results = {}
    for checkpointing in (False, True):
        cfg = compose_cfg(["model=tiny", "method=lora", "method.dropout=0"])
        cfg.model.gradient_checkpointing = checkpointing
        torch.manual_seed(0)
        model = apply_method(load_model(cfg.model, cache_dir).model, cfg.method, None).train()
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.02)
        assert use_segment_attention(model)
        saved: list[int] = []

        def count(tensor: torch.Tensor, saved=saved) -> torch.Tensor:
            saved.append(1)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            logits = model(
                input_ids=packed["input_ids"],
                position_ids=packed["position_ids"],
                segment_lengths=packed["segment_lengths"],
                use_cache=False,
            ).logits
        loss = causal_lm_loss(logits, packed["labels"])[0]
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        results[checkpointing] = (loss.item(), grads, sum(saved))
    assert results[True][2] < 0.5 * results[False][2], (results[True][2], results[False][2])
    assert results[True][0] == results[False][0], (results[True][0], results[False][0])  # the same ops, recomputed
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, atol=0, rtol=0, msg=name)
