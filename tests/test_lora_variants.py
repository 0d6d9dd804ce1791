"""LoRA's knobs on a tiny random Llama: ``method.init`` (gaussian, PiSSA, OLoRA, EVA, LoftQ), LoRA+ learning rates
through the task's optimizer and schedule, DoRA / LoRA+ on the 4-bit QLoRA base, and the refused knobs.

The DoRA method itself (what trains, its count, round trip, merge) is in the matrix of tests/test_methods.py."""

from __future__ import annotations

from itertools import islice

import pytest
import torch
from omegaconf import OmegaConf

from tunelab.config_checks import check_method_fits_model
from tunelab.errors import ConfigError
from tunelab.methods import METHODS, apply_method
from tunelab.models.loading import load_model

from .conftest import CONFIGS, tiny_overrides
from .method_helpers import (
    aligned_logits,
    assert_trainable_count,
    batch_for,
    llama_architecture,
    lora_count,
    method_cfg,
)

TARGETS = ["q_proj", "v_proj"]


def tiny_model_cfg():
    return OmegaConf.load(CONFIGS / "model" / "tiny.yaml")


def base_model(cache_dir):
    return load_model(tiny_model_cfg(), str(cache_dir))


def lora_with(**knobs):
    cfg = method_cfg("lora")
    for key, value in knobs.items():
        cfg[key] = value
    return cfg


def q_proj(model):
    """The first layer's q_proj LoRA layer of a peft-wrapped Llama."""
    return model.get_base_model().model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("init", ["gaussian", "pissa", "pissa_niter_4", "olora"])
def test_each_init_starts_at_the_base_model(init, cache_dir):
    """At step 0 the adapted model's logits are the unadapted base model's; PiSSA / OLoRA get there by making the
    base weight the residual W - s B A (so W itself changed and B is not zero), gaussian by B = 0."""
    loaded = base_model(cache_dir)
    original = loaded.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = apply_method(loaded.model, lora_with(init=init), loaded.tokenizer).eval()
    base = base_model(cache_dir).model.eval()
    batch = batch_for(loaded.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(aligned_logits(model, batch), aligned_logits(base, batch), atol=1e-5, rtol=0)
    layer = q_proj(model)
    residual = layer.base_layer.weight.detach()
    rewrites_base = init != "gaussian"
    assert (not torch.equal(residual, original)) == rewrites_base
    assert bool(layer.lora_B["default"].weight.any()) == rewrites_base
    delta = layer.get_delta_weight("default")
    torch.testing.assert_close(residual + delta, original, atol=1e-6, rtol=0)


def test_pissa_factors_are_the_top_singular_triplets_of_w(cache_dir):
    """PiSSA (exact SVD): s B A is the best rank-r approximation of W (hand SVD: U_r S_r V_r^T)."""
    loaded = base_model(cache_dir)
    weight = loaded.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = apply_method(loaded.model, lora_with(init="pissa"), loaded.tokenizer)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    r = method_cfg("lora").r
    expected = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    torch.testing.assert_close(q_proj(model).get_delta_weight("default"), expected, atol=1e-5, rtol=0)


@pytest.fixture
def eva_components(alpaca_file, compose_cfg, tmp_path):
    from tunelab.build import build_components

    overrides = [*tiny_overrides(alpaca_file, tmp_path), "method=lora", "method.init=eva", "method.eva_batches=4"]
    overrides.append(f"method.target_modules=[{','.join(TARGETS)}]")
    cfg = compose_cfg(overrides)
    return cfg, build_components(cfg)


def test_eva_sets_a_to_the_top_singular_directions_of_the_training_inputs(eva_components, cache_dir):
    """EVA runs at build time on the first ``eva_batches`` training batches: A's rows of the first q_proj are the
    leading principal directions of that layer's (centred, unpadded) inputs on those batches, by a hand SVD; A is
    no longer the Kaiming init and B is still zero, so the model still starts at the base model."""
    cfg, components = eva_components
    model, datamodule = components["model"], components["datamodule"]
    layer = q_proj(model)
    a = layer.lora_A["default"].weight.detach()
    assert not layer.lora_B["default"].weight.any()
    inputs = []
    handle = layer.register_forward_hook(lambda module, args, output: inputs.append(args[0].detach()))
    batches = list(islice(datamodule.ordered_loader("train"), cfg.method.eva_batches))
    with torch.no_grad(), model.disable_adapter():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    rows = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(inputs, batches, strict=True)]).double()
    _, _, vh = torch.linalg.svd(rows - rows.mean(0), full_matrices=False)
    directions = torch.nn.functional.normalize(a.double(), dim=1)
    cosines = (directions * vh[: a.shape[0]]).sum(1).abs()
    assert cosines[:3].min() > 0.999, cosines
    principal_cosines = torch.linalg.svdvals(directions @ vh[: a.shape[0]].T)
    assert principal_cosines.min() > 0.99, principal_cosines
    torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-5, rtol=0)
    base = base_model(cache_dir).model.eval()
    with torch.no_grad():
        batch = batches[0]
        torch.testing.assert_close(aligned_logits(model.eval(), batch), aligned_logits(base, batch), atol=1e-5, rtol=0)


class PromptBatches:
    """A data module whose batches hold prompts only (``prompt_input_ids``, as rollout tasks' generation batches)."""

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str) -> None:
        pass

    def ordered_loader(self, split: str) -> list[dict[str, torch.Tensor]]:
        return [{"prompt_input_ids": torch.ones(2, 4, dtype=torch.long)}]


def test_eva_refuses_data_without_token_batches(cache_dir):
    loaded = base_model(cache_dir)
    cfg = lora_with(init="eva")
    model = apply_method(loaded.model, cfg, loaded.tokenizer)
    with pytest.raises(ConfigError, match=r"method\.init=eva needs token batches \(input_ids\) of training data"):
        METHODS["lora"].init_from_data(model, cfg, PromptBatches())


def lora_plus_task(compose_cfg, alpaca_file, tmp_path, method: str, ratio: float):
    """The SFT task module of ``method`` with ``lora_plus_ratio``, its optimizer and schedule over 10 steps."""
    from tunelab.build import build_components

    overrides = [*tiny_overrides(alpaca_file, tmp_path), f"method={method}", f"method.lora_plus_ratio={ratio}"]
    overrides += ["task.scheduler.warmup_steps=2", f"method.target_modules=[{','.join(TARGETS)}]"]
    cfg = compose_cfg(overrides)
    components = build_components(cfg)
    module = components["module"]
    module.total_training_steps = lambda: 10
    return cfg, components["model"], module.configure_optimizers()


def lr_by_name(model, optimizer, key: str = "lr") -> dict[str, float]:
    """Each trainable parameter's ``key`` (``lr`` now, ``initial_lr``: before the schedule's factor)."""
    lr_of = {id(p): group[key] for group in optimizer.param_groups for p in group["params"]}
    return {name: lr_of[id(p)] for name, p in model.named_parameters() if p.requires_grad}


def test_lora_plus_gives_b_and_the_dora_magnitude_ratio_times_the_lr_through_the_schedule(
    compose_cfg, alpaca_file, tmp_path
):
    """LoRA+ with DoRA: every parameter's initial lr in the task's optimizer is the one peft's own
    ``create_loraplus_optimizer`` gives it (B and the magnitude at lr * ratio, A at lr); after warmup steps of the
    schedule each B / magnitude group is still ratio times A's."""
    from peft.optimizers import create_loraplus_optimizer

    ratio = 16.0
    cfg, model, built = lora_plus_task(compose_cfg, alpaca_file, tmp_path, "dora", ratio)
    lr = cfg.task.optimizer.lr
    ours = lr_by_name(model, built["optimizer"], "initial_lr")
    reference = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio)
    assert ours == pytest.approx(lr_by_name(model, reference), rel=1e-12)
    scaled = {n for n, value in ours.items() if value != lr}
    assert scaled and all(".lora_B." in n or ".lora_magnitude_vector." in n for n in scaled)
    assert all(value == pytest.approx(lr * ratio, rel=1e-12) for n, value in ours.items() if n in scaled)
    scheduler = built["lr_scheduler"]["scheduler"]
    for _ in range(3):
        built["optimizer"].step()
        scheduler.step()
    stepped = lr_by_name(model, built["optimizer"])
    a_lr = {value for n, value in stepped.items() if n not in scaled}
    assert len(a_lr) == 1 and 0 < a_lr.pop() < lr
    a_now = next(value for n, value in stepped.items() if n not in scaled)
    assert all(stepped[n] == pytest.approx(ratio * a_now, rel=1e-12) for n in scaled)


def test_without_lora_plus_every_parameter_trains_at_the_lr(compose_cfg, alpaca_file, tmp_path):
    cfg, model, built = lora_plus_task(compose_cfg, alpaca_file, tmp_path, "lora", 1.0)
    assert set(lr_by_name(model, built["optimizer"], "initial_lr").values()) == {cfg.task.optimizer.lr}


def test_ppo_optimizer_takes_the_lora_plus_rates_too(compose_cfg, tmp_path):
    """PPO builds its own optimizer (policy + value head): B at lr * ratio, A and the value head at lr."""
    from functools import partial

    from .test_ppo import build_ppo, completion_lengths, counting_prompts, ppo_overrides, prompt_data_cfg, write_jsonl

    ratio = 8.0
    cfg = compose_cfg(ppo_overrides(tmp_path, "method=lora", f"method.lora_plus_ratio={ratio}"))
    data_file = write_jsonl(tmp_path / "p.jsonl", counting_prompts(8))
    module, _ = build_ppo(cfg, prompt_data_cfg(data_file), completion_lengths)
    module.lr_scale = partial(METHODS["lora"].lr_scale, cfg.method)  # as build_components sets it
    module.total_training_steps = lambda: 4
    lrs = lr_by_name(module, module.configure_optimizers()["optimizer"], "initial_lr")
    lr = cfg.task.optimizer.lr
    assert lrs["value_head.weight"] == lr and any(".lora_A." in n for n in lrs)
    assert all(value == (lr * ratio if ".lora_B." in n else lr) for n, value in lrs.items())


def qlora_with(**knobs):
    cfg = OmegaConf.load(CONFIGS / "method" / "qlora.yaml")
    cfg.compute_dtype = "float32"
    cfg.target_modules = TARGETS
    for key, value in knobs.items():
        cfg[key] = value
    return cfg


def test_qlora_trains_dora_magnitudes_and_scales_them_with_lora_plus(cache_dir):
    """DoRA on the 4-bit base: one magnitude per output feature of each target on top of LoRA's A, B; LoRA+
    gives B and the magnitude ratio times the lr."""
    cfg = qlora_with(use_dora=True, lora_plus_ratio=4.0)
    loaded = load_model(tiny_model_cfg(), str(cache_dir), quantization_config=METHODS["qlora"].quantization(cfg))
    model = apply_method(loaded.model, cfg, loaded.tokenizer)
    arch = llama_architecture(tiny_model_cfg().config)
    magnitudes = arch.layers * sum(arch.linears[f"self_attn.{t}"][1] for t in TARGETS)
    assert_trainable_count(model, lora_count(arch, cfg) + magnitudes)
    scales = {n: METHODS["qlora"].lr_scale(cfg, n) for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, s in scales.items() if s == 4.0} == {
        n for n in scales if ".lora_B." in n or ".lora_magnitude_vector." in n
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=lora", "method.init=svd"], r"method.init='svd' is not one of \['default', 'gaussian', 'pissa'"),
        (["method=lora", "method.init=pissa_niter_0"], "is not one of"),
        (["method=lora", "method.init=3"], "method.init=3 is not one of"),
        (["method=dora", "method.lora_plus_ratio=-2"], "lora_plus_ratio=-2 must be a positive number"),
        (["method=qlora", "method.init=pissa"], r"method=qlora supports method.init in \['default', 'gaussian'\]"),
        (["method=qlora", "method.init=eva"], "use method=lora for method.init=eva"),
    ],
)
def test_bad_lora_knobs_fail_at_config_time(overrides, message, alpaca_file, compose_cfg, tmp_path):
    cfg = compose_cfg([*tiny_overrides(alpaca_file, tmp_path), *overrides])
    with pytest.raises(ConfigError, match=message):
        check_method_fits_model(cfg, METHODS[cfg.method.name], head="causal_lm")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_loftq_is_refused_without_cuda(alpaca_file, compose_cfg, tmp_path):
    cfg = compose_cfg([*tiny_overrides(alpaca_file, tmp_path), "method=lora", "method.init=loftq"])
    with pytest.raises(ConfigError, match=r"method\.init=loftq needs a CUDA GPU"):
        check_method_fits_model(cfg, METHODS["lora"], head="causal_lm")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="LoftQ needs CUDA: peft 0.21.2 quantizes W on cuda")
def test_loftq_makes_w_its_4bit_quantization_and_b_a_fit_the_rest(cache_dir):
    """LoftQ: the base weight becomes Q (NF4 values: few distinct levels per 64-block) and W - Q is approached by
    s B A, so the adapted weight Q + s B A is closer to W than Q alone."""
    loaded = base_model(cache_dir)
    weight = loaded.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = apply_method(loaded.model, lora_with(init="loftq"), loaded.tokenizer)
    layer = q_proj(model)
    quantized = layer.base_layer.weight.detach().float().cpu()
    adapted_weight = quantized + layer.get_delta_weight("default").float().cpu()
    assert not torch.equal(quantized, weight)
    assert (adapted_weight - weight).norm() < (quantized - weight).norm()


def test_lora_plus_rates_hold_under_deepspeed_zero2(alpaca_file, tmp_path):
    """ZeRO-2 on 2 CPU ranks keeps the groups: the LR monitor logs A's group (lr) and B's (lr * 4) at every step of
    the schedule."""
    import csv

    from .conftest import run_distributed

    run_dir = tmp_path / "run"
    result = run_distributed(
        alpaca_file, run_dir, "deepspeed_zero2", "test=false", "method.lora_plus_ratio=4", "trainer.max_steps=4"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with (run_dir / "metrics.csv").open() as file:
        logged = [row for row in csv.DictReader(file) if row.get("lr-AdamW/pg1")]
    assert len(logged) == 4 and float(logged[0]["lr-AdamW/pg1"]) == 3e-3
    for row in logged:
        assert float(row["lr-AdamW/pg2"]) == pytest.approx(4 * float(row["lr-AdamW/pg1"]), rel=1e-12)
