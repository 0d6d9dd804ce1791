"""QLoRA on CPU: a 4-bit (NF4) tiny Llama with LoRA on top.

Covers what trains, the avx512_bf16 trap (an eval-mode forward must not stop LoRA training), the
dequantized merge (gap to the 4-bit adapter model measured and bounded), the adapter round trip, and the
SFT pipeline with a validation pass before training.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tunelab.export import export_adapter, export_merged, load_exported, merged_copy
from tunelab.methods import METHODS, apply_method
from tunelab.methods.inhouse import adapters_disabled
from tunelab.models.loading import four_bit_layers, load_model

from .conftest import CONFIGS
from .method_helpers import (
    aligned_logits,
    assert_steps_change_exactly,
    assert_trainable_count,
    batch_for,
    closed_form_trainable,
    llama_architecture,
    perturb_trainable,
    sft_loss,
)


def qlora_cfg():
    cfg = OmegaConf.load(CONFIGS / "method" / "qlora.yaml")
    cfg.compute_dtype = "float32"  # ${model.dtype} outside a composed config
    return cfg


def tiny_model_cfg():
    return OmegaConf.load(CONFIGS / "model" / "tiny.yaml")


def quantized_base(cache_dir):
    return load_model(tiny_model_cfg(), cache_dir, quantization_config=METHODS["qlora"].quantization(qlora_cfg()))


def qlora_model(cache_dir):
    loaded = quantized_base(cache_dir)
    return apply_method(loaded.model, qlora_cfg(), loaded.tokenizer), loaded.tokenizer


def eval_pass(model, batch) -> None:
    """What Lightning's validation does: eval mode, no grad."""
    model.eval()
    with torch.no_grad():
        aligned_logits(model, batch)
    model.train()


def test_base_is_4bit_nf4_and_only_lora_trains(cache_dir):
    """Only LoRA trains, r (d_in + d_out) parameters on each projection, and every LoRA tensor learns."""
    model, tokenizer = qlora_model(cache_dir)
    layers = four_bit_layers(model)
    assert len(layers) == 2 * 7  # every projection of both blocks
    assert all(layer.weight.quant_state.quant_type == "nf4" for layer in layers)
    assert all(not layer.support_avx512bf16_for_cpu for layer in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert_trainable_count(model, closed_form_trainable(llama_architecture(tiny_model_cfg().config), qlora_cfg()))
    assert_steps_change_exactly(model, sft_loss(batch_for(tokenizer)), trainable)


def test_adapter_weights_still_change_after_a_validation_pass(cache_dir):
    model, tokenizer = qlora_model(cache_dir)
    batch = batch_for(tokenizer)
    eval_pass(model, batch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert_steps_change_exactly(model, sft_loss(batch), trainable)


def test_the_avx512_bf16_trap_is_real_on_this_cpu(cache_dir):
    """Control for the test above: with bitsandbytes' CPU repacking left on, LoRA gradients vanish.

    (bitsandbytes 0.50.2: after the repack the forward uses ``gemv_4bit``, which has no autograd kernel, so
    the gradient through every 4-bit layer is silently zero; LoRA B matrices before them get no signal.)
    """
    from bitsandbytes.nn.modules import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no avx512_bf16: bitsandbytes never repacks, the trap cannot occur")
    model, tokenizer = qlora_model(cache_dir)
    for layer in four_bit_layers(model):
        layer.support_avx512bf16_for_cpu = True
    batch = batch_for(tokenizer)
    eval_pass(model, batch)
    sft_loss(batch)(model).backward()
    starved = [n for n, p in model.named_parameters() if "lora_B" in n and (p.grad is None or not p.grad.any())]
    assert len(starved) >= 10, starved  # 10 of the 14 LoRA B matrices get no gradient on this CPU


def test_merge_into_dequantized_weights_matches_the_4bit_adapter_model(cache_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = qlora_model(cache_dir)
    batch = batch_for(tokenizer)
    perturb_trainable(model)
    model.eval()
    with torch.no_grad():
        expected = aligned_logits(model, batch)
        merged = merged_copy(model)
        assert not four_bit_layers(merged) and not hasattr(merged.config, "quantization_config")
        gap = (aligned_logits(merged, batch) - expected).abs().max().item()
        print(f"qlora merged-vs-adapter max |logit gap| = {gap:.2e}")
        assert gap < 1e-6  # README: the merged fp32 model's logits differ by 5e-7 (measured 4.8e-7)
        export_merged(model, tokenizer, tmp_path)
        served = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(aligned_logits(served, batch), aligned_logits(merged, batch), atol=1e-6, rtol=0)
        assert torch.equal(aligned_logits(model, batch), expected)  # the 4-bit model is left unmerged


def test_adapter_round_trip_and_disable(cache_dir, tmp_path):
    model, tokenizer = qlora_model(cache_dir)
    batch = batch_for(tokenizer)
    perturb_trainable(model)
    model.eval()
    export_adapter(model, tokenizer, tmp_path)
    reloaded = load_exported(quantized_base(cache_dir).model, tmp_path, tokenizer).eval()
    base = quantized_base(cache_dir).model.eval()
    with torch.no_grad():
        assert torch.equal(aligned_logits(reloaded, batch), aligned_logits(model, batch))
        with adapters_disabled(model):
            torch.testing.assert_close(aligned_logits(model, batch), aligned_logits(base, batch), atol=1e-6, rtol=0)


def test_qlora_runs_the_sft_pipeline_with_validation_first(alpaca_file, compose_cfg, tmp_path):
    from tunelab.train import train

    from .conftest import tiny_overrides

    overrides = [
        *tiny_overrides(alpaca_file, tmp_path),
        "method=qlora",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "task.optimizer.lr=1e-2",
        "task.generation.num_samples=2",
        "export.merged=true",
    ]
    metrics, objects = train(compose_cfg(overrides))
    assert metrics["val/loss"] < metrics["untrained/val/loss"]
    assert four_bit_layers(objects["model"])
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "merged" / "config.json").exists()


def test_qlora_refuses_a_model_without_4bit_linear_layers(cache_dir):
    from tunelab.errors import ConfigError

    loaded = load_model(tiny_model_cfg(), cache_dir)
    with pytest.raises(ConfigError, match="has no 4-bit Linear layers"):
        apply_method(loaded.model, qlora_cfg(), loaded.tokenizer)
