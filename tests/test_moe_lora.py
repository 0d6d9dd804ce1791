"""LoRA on mixture-of-experts experts: peft ``target_parameters`` on the fused expert tensors of a tiny Qwen3-MoE
(configs/model/tiny_moe.yaml: 2 layers, 4 experts of (2 I x d) gate_up and (d x I) down each).

Per expert e, peft's ``ParamWrapper`` stores A as one (E r x d_in) and B as one (d_out x r E) matrix; the adapted
weight is W_e + (alpha / r) B_e A_e with A_e = A.reshape(E, r, d_in)[e] and B_e = B.reshape(d_out, r, E)[:, :, e].
The hand computation below rebuilds that weight and runs the expert's SwiGLU on it."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf

from tunelab.errors import ConfigError
from tunelab.export import export_adapter, load_exported
from tunelab.methods import apply_method
from tunelab.methods.inhouse import adapters_disabled
from tunelab.models.loading import load_model

from .conftest import CONFIGS
from .method_helpers import aligned_logits, assert_steps_change_exactly, batch_for, perturb_trainable, sft_loss

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


@pytest.fixture(scope="module")
def moe_cfg(cache_dir):
    return OmegaConf.load(CONFIGS / "model" / "tiny_moe.yaml"), str(cache_dir)


def lora_cfg(moe_cfg, **changes):
    """configs/method/lora.yaml resolved against the tiny MoE model config (as ``method=lora model=tiny_moe``)."""
    model_cfg, _ = moe_cfg
    root = OmegaConf.create({"model": model_cfg, "method": OmegaConf.load(CONFIGS / "method" / "lora.yaml")})
    method = OmegaConf.create(OmegaConf.to_container(root.method, resolve=True))
    method.r = 2
    method.update(changes)
    return method


def fresh_base(moe_cfg):
    model_cfg, cache = moe_cfg
    return load_model(model_cfg, cache)


def adapted(moe_cfg, **changes):
    loaded = fresh_base(moe_cfg)
    return apply_method(loaded.model, lora_cfg(moe_cfg, **changes), loaded.tokenizer), loaded.tokenizer


def expert_wrappers(model):
    """``{(layer, parameter name): ParamWrapper}`` for every adapted expert tensor."""
    from peft.tuners.lora.layer import ParamWrapper

    return {
        (int(re.search(r"layers\.(\d+)\.", name).group(1)), module.parameter_name): module
        for name, module in model.named_modules()
        if isinstance(module, ParamWrapper)
    }


def test_the_config_targets_the_attention_and_the_fused_experts_without_dropout(moe_cfg):
    method = lora_cfg(moe_cfg)
    assert list(method.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert list(method.target_parameters) == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert method.dropout == 0.0


def test_training_changes_exactly_the_expert_and_attention_lora_tensors(moe_cfg):
    model, tokenizer = adapted(moe_cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    config = model.config
    lora_names = {n for n in trainable if re.search(r"\.lora_[AB]\.default\.weight$", n)}
    assert trainable == lora_names
    experts = {n for n in trainable if ".mlp.experts." in n}
    attention = {n for n in trainable if ".self_attn." in n}
    assert experts | attention == trainable
    assert len(experts) == config.num_hidden_layers * len(EXPERT_PARAMETERS) * 2
    assert len(attention) == config.num_hidden_layers * 4 * 2
    assert_steps_change_exactly(model, sft_loss(batch_for(tokenizer)), trainable)


def test_expert_factors_have_peft_s_shapes_and_the_closed_form_count(moe_cfg):
    model, _ = adapted(moe_cfg)
    config, r = model.config, 2
    d, inner, experts = config.hidden_size, config.moe_intermediate_size, config.num_experts
    shapes = {"gate_up_proj": (d, 2 * inner), "down_proj": (inner, d)}  # (d_in, d_out) of each expert
    wrappers = expert_wrappers(model)
    assert sorted(wrappers) == [(layer, p) for layer in range(config.num_hidden_layers) for p in sorted(shapes)]
    for (_, parameter), wrapper in wrappers.items():
        d_in, d_out = shapes[parameter]
        assert wrapper.num_experts == experts
        assert tuple(wrapper.lora_A["default"].weight.shape) == (experts * r, d_in)
        assert tuple(wrapper.lora_B["default"].weight.shape) == (d_out, r * experts)
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    attention = r * ((d + q_out) * 2 + (d + kv_out) * 2)  # q, o, k, v: r (d_in + d_out) each
    expert = experts * r * sum(d_in + d_out for d_in, d_out in shapes.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == config.num_hidden_layers * (attention + expert)


def test_the_adapted_expert_is_w_plus_scaled_b_a_by_hand(moe_cfg):
    """One expert's output on one input equals SwiGLU with W_e + (alpha / r) B_e A_e built from peft's stored A, B."""
    model, _ = adapted(moe_cfg)
    perturb_trainable(model)
    wrappers = expert_wrappers(model)
    config, r, scale = model.config, 2, lora_cfg(moe_cfg).alpha / 2
    experts_module = wrappers[(0, "down_proj")]  # the outer wrapper: down_proj wraps gate_up_proj wraps the experts
    base = experts_module.get_base_layer()
    expert, count = 3, config.num_experts

    def adapted_weight(name: str) -> torch.Tensor:
        wrapper = wrappers[(0, name)]
        a = wrapper.lora_A["default"].weight.reshape(count, r, -1)[expert]
        b = wrapper.lora_B["default"].weight.reshape(-1, r, count)[:, :, expert]
        return getattr(base, name)[expert] + scale * b @ a

    x = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(0))
    gate, up = (x @ adapted_weight("gate_up_proj").T).chunk(2, dim=-1)
    expected = (torch.nn.functional.silu(gate) * up) @ adapted_weight("down_proj").T
    index = torch.full((5, 1), expert)
    with torch.no_grad():
        got = experts_module(x, index, torch.ones(5, 1))
        unadapted = base(x, index, torch.ones(5, 1))
    assert not torch.allclose(expected, unadapted, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_and_disabled_adapter_restore_the_right_logits(moe_cfg, tmp_path):
    model, tokenizer = adapted(moe_cfg)
    batch = batch_for(tokenizer)
    perturb_trainable(model)
    model.eval()
    export_adapter(model, tokenizer, tmp_path)
    reloaded = load_exported(fresh_base(moe_cfg).model, tmp_path, tokenizer).eval()
    base = fresh_base(moe_cfg).model.eval()
    with torch.no_grad():
        adapted_logits = aligned_logits(model, batch)
        assert len(expert_wrappers(reloaded)) == len(EXPERT_PARAMETERS) * model.config.num_hidden_layers
        assert torch.equal(aligned_logits(reloaded, batch), adapted_logits)
        base_logits = aligned_logits(base, batch)
        assert not torch.allclose(adapted_logits, base_logits, atol=1e-4)
        with adapters_disabled(model):
            torch.testing.assert_close(aligned_logits(model, batch), base_logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(aligned_logits(model, batch), adapted_logits, atol=0, rtol=0)


def test_merged_expert_weights_give_the_adapter_logits(moe_cfg):
    model, tokenizer = adapted(moe_cfg)
    batch = batch_for(tokenizer)
    perturb_trainable(model)
    model.eval()
    base = fresh_base(moe_cfg).model.eval()
    assert len(expert_wrappers(model)) == len(EXPERT_PARAMETERS) * model.config.num_hidden_layers
    with torch.no_grad():
        expected = aligned_logits(model, batch)
        merged = model.merge_and_unload()
        assert not expert_wrappers(merged)
        for name in EXPERT_PARAMETERS:
            folded, original = (getattr(m.model.layers[0].mlp.experts, name) for m in (merged, base))
            assert not torch.allclose(folded, original, atol=1e-4)
        torch.testing.assert_close(aligned_logits(merged, batch), expected, atol=1e-5, rtol=0)


def test_names_that_match_no_parameter_are_refused_with_the_real_names(moe_cfg):
    with pytest.raises(ConfigError, match=r"\['mlp\.experts\.up_proj'\].*named \['mlp\.experts\.down_proj', "):
        adapted(moe_cfg, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.up_proj"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.dropout=0.1"], r"method\.dropout=0\.1 cannot apply to method\.target_parameters"),
        (["trainer=fsdp"], r"cannot run with trainer=fsdp, .*; use trainer=deepspeed_zero3"),
    ],
)
def test_what_peft_cannot_run_on_target_parameters_is_refused_at_config_time(
    overrides, message, alpaca_file, compose_cfg, tmp_path
):
    from tunelab.config_checks import check_method_fits_model
    from tunelab.methods import METHODS

    from .conftest import tiny_overrides

    cfg = compose_cfg([*tiny_overrides(alpaca_file, tmp_path), "model=tiny_moe", "method=lora", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_method_fits_model(cfg, METHODS["lora"], head="causal_lm")
    cfg.method.target_parameters = []
    check_method_fits_model(cfg, METHODS["lora"], head="causal_lm")


def test_lora_on_experts_runs_the_sft_pipeline(alpaca_file, compose_cfg, tmp_path):
    import math

    from tunelab.train import train

    from .conftest import tiny_overrides

    overrides = [
        *tiny_overrides(alpaca_file, tmp_path),
        "model=tiny_moe",
        "method=lora",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "task.optimizer.lr=1e-2",
        "task.generation.num_samples=2",
    ]
    metrics, _ = train(compose_cfg(overrides))
    assert math.isfinite(metrics["test/loss"])
    assert metrics["val/loss"] < metrics["untrained/val/loss"]
    config = OmegaConf.load(tmp_path / "adapter" / "adapter_config.json")
    assert sorted(config.target_parameters) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


def test_gradient_checkpointing_gives_the_same_expert_gradients(moe_cfg):
    """The Hub MoE config checkpoints activations: recomputing a layer re-applies peft's parametrization, so the
    LoRA gradients (experts and attention) equal those of a run that keeps its activations."""
    model_cfg, cache = moe_cfg
    gradients = []
    for checkpointing in (False, True):
        cfg = model_cfg.copy()
        cfg.gradient_checkpointing = checkpointing
        torch.manual_seed(0)  # the same LoRA init and perturbation in both runs
        loaded = load_model(cfg, cache)
        assert bool(getattr(loaded.model, "is_activation_checkpointing", False)) == checkpointing
        model = apply_method(loaded.model, lora_cfg(moe_cfg), loaded.tokenizer)
        perturb_trainable(model)  # B = 0 would give A no gradient
        sft_loss(batch_for(loaded.tokenizer))(model).backward()
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = gradients
    assert plain.keys() == checkpointed.keys() and any(".mlp.experts." in n for n in plain)
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)
