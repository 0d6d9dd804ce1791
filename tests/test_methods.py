"""Method matrix on a tiny random Llama: what trains, how many parameters, save/load round trip, disabling, merging.

The encoder side of the matrix is tests/test_methods_encoder.py; QLoRA is tests/test_qlora.py."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tunelab.export import export_adapter, load_exported
from tunelab.methods import apply_method
from tunelab.methods.inhouse import adapters_disabled
from tunelab.models.loading import load_model

from .conftest import CONFIGS
from .method_helpers import (
    aligned_logits,
    assert_steps_change_exactly,
    assert_trainable_count,
    batch_for,
    closed_form_trainable,
    llama_architecture,
    method_cfg,
    perturb_trainable,
    sft_loss,
)

ADAPTER_METHODS = [
    *["lora", "dora", "ia3", "prompt", "ptuning", "prefix", "ptuning_v2", "adapter", "mam", "unipelt"],
    *["vera", "loha", "lokr", "adalora"],
]
MERGEABLE = ["lora", "dora", "ia3", "vera", "loha", "lokr", "adalora"]


@pytest.fixture(scope="module")
def tiny_cfg(cache_dir):
    cfg = OmegaConf.load(CONFIGS / "model" / "tiny.yaml")
    return cfg, str(cache_dir)


def fresh_base(tiny_cfg):
    model_cfg, cache = tiny_cfg
    return load_model(model_cfg, cache)


def adapted(name, tiny_cfg):
    loaded = fresh_base(tiny_cfg)
    return apply_method(loaded.model, method_cfg(name), loaded.tokenizer), loaded.tokenizer


@pytest.mark.parametrize("name", ADAPTER_METHODS)
def test_training_changes_every_trainable_tensor_and_no_frozen_one(name, tiny_cfg):
    model, tokenizer = adapted(name, tiny_cfg)
    batch = batch_for(tokenizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) < len(list(model.parameters()))
    assert_steps_change_exactly(model, sft_loss(batch), trainable)


@pytest.mark.parametrize("name", [*ADAPTER_METHODS, "bitfit"])
def test_trainable_parameter_count_is_the_closed_form(name, tiny_cfg):
    """What tunelab reports at start-up (and peft counts) is the method's closed form on the tiny Llama's config."""
    model, _ = adapted(name, tiny_cfg)
    assert_trainable_count(model, closed_form_trainable(llama_architecture(tiny_cfg[0].config), method_cfg(name)))


@pytest.mark.parametrize("name", ADAPTER_METHODS)
def test_save_load_round_trip_and_disable_restore_the_right_logits(name, tiny_cfg, tmp_path):
    model, tokenizer = adapted(name, tiny_cfg)
    batch = batch_for(tokenizer)
    perturb_trainable(model)
    model.eval()
    export_adapter(model, tokenizer, tmp_path)
    reloaded = load_exported(fresh_base(tiny_cfg).model, tmp_path, tokenizer).eval()
    base = fresh_base(tiny_cfg).model.eval()
    with torch.no_grad():
        adapted_logits = aligned_logits(model, batch)
        assert torch.equal(aligned_logits(reloaded, batch), adapted_logits)
        base_logits = aligned_logits(base, batch)
        assert not torch.allclose(adapted_logits, base_logits, atol=1e-4)
        with adapters_disabled(model):
            torch.testing.assert_close(aligned_logits(model, batch), base_logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(aligned_logits(model, batch), adapted_logits, atol=0, rtol=0)


@pytest.mark.parametrize("name", MERGEABLE)
def test_zero_update_methods_start_at_exactly_the_base_model(name, tiny_cfg):
    """LoRA (B = 0), DoRA (B = 0, m = ||W||_c), IA3 (scales of 1), VeRA (b = 0), LoHa (A2 = 0), LoKr (C = 0) and
    AdaLoRA (Lambda = 0) add nothing before the first step: the logits are the base model's, bit for bit
    (experiments/method_comparison: lora, ia3, bitfit and full start at exactly the base model's val loss)."""
    model, tokenizer = adapted(name, tiny_cfg)
    batch = batch_for(tokenizer)
    base = fresh_base(tiny_cfg).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(aligned_logits(model.eval(), batch), aligned_logits(base, batch), atol=0, rtol=0)


@pytest.mark.parametrize("name", MERGEABLE)
def test_merged_logits_equal_adapter_logits(name, tiny_cfg):
    model, tokenizer = adapted(name, tiny_cfg)
    batch = batch_for(tokenizer)
    perturb_trainable(model)
    model.eval()
    with torch.no_grad():
        expected = aligned_logits(model, batch)
        merged = model.merge_and_unload()
        torch.testing.assert_close(aligned_logits(merged, batch), expected, atol=1e-4, rtol=0)


def test_prompt_text_init_copies_the_text_embeddings(tiny_cfg):
    model, tokenizer = adapted("prompt", tiny_cfg)
    ids = tokenizer(method_cfg("prompt").init_text, add_special_tokens=False)["input_ids"][:4]
    expected = model.get_input_embeddings().weight[ids]
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, expected)


def test_soft_prompts_refuse_gradient_checkpointing(tiny_cfg):
    from tunelab.errors import ConfigError

    model_cfg, cache = tiny_cfg
    cfg = model_cfg.copy()
    cfg.gradient_checkpointing = True
    loaded = load_model(cfg, cache)
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        apply_method(loaded.model, method_cfg("prefix"), loaded.tokenizer)


@pytest.mark.parametrize(
    "name",
    [
        *["dora", "ia3", "prompt", "ptuning", "prefix", "ptuning_v2", "bitfit", "adapter", "mam", "unipelt"],
        *["vera", "loha", "lokr", "adalora"],
    ],
)
def test_method_runs_the_sft_pipeline(name, alpaca_file, compose_cfg, tmp_path):
    import math

    from tunelab.train import train

    from .conftest import tiny_overrides

    overrides = [
        *tiny_overrides(alpaca_file, tmp_path),
        f"method={name}",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "task.optimizer.lr=1e-2",
        "task.generation.num_samples=2",
    ]
    if "num_virtual_tokens" in method_cfg(name):
        overrides.append("method.num_virtual_tokens=4")
    metrics, _ = train(compose_cfg(overrides))
    assert math.isfinite(metrics["test/loss"]) and "test/rougeL" in metrics
    assert metrics["val/loss"] < metrics["untrained/val/loss"]
    assert 0 < metrics["trainable_params"] < metrics["total_params"] / 10
    exported = {"bitfit": "config.json"} | dict.fromkeys(["adapter", "mam", "unipelt"], "tunelab_method.yaml")
    assert (tmp_path / "adapter" / exported.get(name, "adapter_config.json")).exists()


def test_bitfit_on_a_bias_free_llama_adds_zero_biases_and_trains_only_them(tiny_cfg, tmp_path):
    from transformers import AutoModelForCausalLM

    base = fresh_base(tiny_cfg).model.eval()
    model, tokenizer = adapted("bitfit", tiny_cfg)
    batch = batch_for(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(aligned_logits(model.eval(), batch), aligned_logits(base, batch), atol=0, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".bias") for n in trainable)
    assert model.config.attention_bias and model.config.mlp_bias
    assert_steps_change_exactly(model, sft_loss(batch), trainable)
    model.eval().save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(aligned_logits(reloaded, batch), aligned_logits(model, batch))


def test_bitfit_can_refuse_models_without_biases(tiny_cfg):
    from tunelab.errors import ConfigError

    loaded = fresh_base(tiny_cfg)
    cfg = method_cfg("bitfit")
    cfg.missing_biases = "fail"
    with pytest.raises(ConfigError, match=r"without bias terms; set method\.missing_biases=add"):
        apply_method(loaded.model, cfg, loaded.tokenizer)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=prefix", "model.gradient_checkpointing=true"], "cannot run with model.gradient_checkpointing"),
        (["method=unipelt", "model.gradient_checkpointing=true"], "cannot run with model.gradient_checkpointing"),
        (["method=mam", "model.config.model_type=bert"], "adapts the 'ffn' sublayer, which model_type='bert'"),
        (["method=adapter", "model.config.model_type=gpt2"], "not 'gpt2'; use method=lora"),
        (["method=qlora", "trainer=fsdp"], "set method.quant_storage=bfloat16"),
        (["method=adalora", "method.target_r=20"], r"must be a whole rank in \[1, method.init_r=12\]"),
        (["method=adalora", "method.init_r=0"], r"method.init_r=0 must be a whole rank >= 1"),
        (["method=adalora", "method.beta1=1.0"], r"method.beta1=1.0 must lie in \(0, 1\)"),
        (["method=vera", "method.r=0"], "method.r=0 must be a whole rank >= 1"),
    ],
)
def test_impossible_method_combinations_fail_at_config_time(overrides, message, alpaca_file, compose_cfg, tmp_path):
    from tunelab.config_checks import check_method_fits_model
    from tunelab.errors import ConfigError
    from tunelab.methods import METHODS

    from .conftest import tiny_overrides

    cfg = compose_cfg([*tiny_overrides(alpaca_file, tmp_path), *overrides])
    with pytest.raises(ConfigError, match=message):
        check_method_fits_model(cfg, METHODS[cfg.method.name], head="causal_lm")


def test_vera_shares_one_random_projection_drawn_from_its_key(tiny_cfg):
    """Every VeRA layer reads the model's one frozen A and B (sliced to its shape), drawn from projection_prng_key:
    the same key draws the same A, another key another."""
    from peft.tuners.vera import VeraLayer

    def projections(key: int):
        loaded = fresh_base(tiny_cfg)
        cfg = method_cfg("vera")
        cfg.projection_prng_key = key
        model = apply_method(loaded.model, cfg, loaded.tokenizer)
        return model, model.base_model.vera_A["default"], model.base_model.vera_B["default"]

    model, shared_a, shared_b = projections(0)
    layers = [m for m in model.modules() if isinstance(m, VeraLayer)]
    assert len(layers) == 2 * 7
    assert all(m.vera_A["default"] is shared_a and m.vera_B["default"] is shared_b for m in layers)
    assert not shared_a.requires_grad and not shared_b.requires_grad
    assert torch.equal(projections(0)[1], shared_a) and not torch.equal(projections(1)[1], shared_a)


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_lycoris_module_dropout_reaches_peft(name, tiny_cfg):
    """method.module_dropout=1 skips every LoHa / LoKr update in training (base logits) and none in eval."""
    loaded = fresh_base(tiny_cfg)
    cfg = method_cfg(name)
    cfg.module_dropout = 1.0
    model = apply_method(loaded.model, cfg, loaded.tokenizer)
    perturb_trainable(model)
    batch = batch_for(loaded.tokenizer)
    base = fresh_base(tiny_cfg).model.eval()
    with torch.no_grad():
        base_logits = aligned_logits(base, batch)
        torch.testing.assert_close(aligned_logits(model.train(), batch), base_logits, atol=1e-6, rtol=0)
        assert not torch.allclose(aligned_logits(model.eval(), batch), base_logits, atol=1e-4)
