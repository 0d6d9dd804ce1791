"""AdaLoRA in a Lightning fit (tunelab.methods.adalora.AdaLoraAllocation): peft's total_step is the run's optimizer
steps, rank allocation runs once per optimizer step and prunes to the target budget, the orthogonality regulariser
matches peft's own, and a resumed run ends where an uninterrupted one does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft.tuners.adalora import AdaLoraModel

from tunelab.train import train

from .conftest import tiny_overrides
from .method_helpers import batch_for, perturb_trainable
from .stopping import StopAfterSteps


def adalora_overrides(alpaca_file: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        *tiny_overrides(alpaca_file, output_dir),
        "method=adalora",
        "data.train_size=24",  # 6 batches of 4 per epoch
        "trainer.max_epochs=-1",
        "trainer.val_check_interval=100",
        "trainer.check_val_every_n_epoch=null",
        "task.generation.num_samples=0",
        "task.optimizer.lr=1e-2",
        "validate_before_training=false",
        "test=false",
        "export.adapter=false",
        "~callbacks.early_stopping",
        *extra,
    ]


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_total_step_is_the_runs_optimizer_steps_and_allocation_runs_once_per_step(
    alpaca_file, compose_cfg, tmp_path, monkeypatch
):
    """2 epochs of 6 micro-batches with accumulate_grad_batches=2: 6 optimizer steps, so total_step=6 and
    update_and_allocate runs after steps 1..6, never per micro-batch."""
    calls: list[int] = []
    original = AdaLoraModel.update_and_allocate

    def recording(self, global_step):
        calls.append(global_step)
        return original(self, global_step)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", recording)
    overrides = ["trainer.max_epochs=2", "trainer.max_steps=-1", "trainer.accumulate_grad_batches=2"]
    _, objects = train(compose_cfg(adalora_overrides(alpaca_file, tmp_path, *overrides)))
    tuner = objects["model"].base_model
    assert objects["trainer"].global_step == 6
    assert tuner.peft_config["default"].total_step == 6
    assert calls == [1, 2, 3, 4, 5, 6]


def test_ranks_are_pruned_to_target_r_after_the_budgeting_phase(alpaca_file, compose_cfg, tmp_path):
    """tinit=1, tfinal=3 of 8 steps: the final mask at step 5 keeps target_r ranks per layer on average (the
    budget), and the masked Lambda entries stay 0 through the last steps."""
    extra = ["trainer.max_steps=8", "method.tinit=1", "method.tfinal=3", "method.init_r=6", "method.target_r=2"]
    _, objects = train(compose_cfg(adalora_overrides(alpaca_file, tmp_path, *extra)))
    tuner = objects["model"].base_model
    pattern = tuner.peft_config["default"].rank_pattern
    lambdas = {n: p for n, p in tuner.model.named_parameters() if "lora_E" in n}
    assert set(pattern) == set(lambdas) and len(lambdas) == 2 * 7
    assert sum(sum(kept) for kept in pattern.values()) == 2 * len(lambdas)
    assert any(sum(kept) != 2 for kept in pattern.values())  # reallocated, not a uniform cut
    for name, entries in lambdas.items():
        kept = torch.tensor(pattern[name])
        assert torch.all(entries.view(-1)[~kept] == 0) and torch.all(entries.view(-1)[kept] != 0)


def test_orthogonality_gradient_equals_peft_forward_with_labels(tiny_cfg_loaded):
    """peft adds orth_reg_weight * R(P, Q) to a loss the model computes from labels; tunelab's tasks pass no labels,
    so the callback adds that term's gradient before the optimizer step: the gradients must match."""
    from tunelab.methods.adalora import AdaLoraAllocation

    model, tokenizer = tiny_cfg_loaded
    perturb_trainable(model)
    batch = batch_for(tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    model(**inputs).loss.backward()  # AdaLoraModel.forward: task loss + orth_reg_weight * R
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    model.base_model.model(**inputs).loss.backward()  # the transformers model alone: the task loss only
    callback = AdaLoraAllocation()
    callback.tuner = model.base_model
    callback.on_before_optimizer_step(None, None, None)
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=0)


@pytest.fixture
def tiny_cfg_loaded(cache_dir):
    from omegaconf import OmegaConf

    from tunelab.methods import apply_method
    from tunelab.models.loading import load_model

    from .conftest import CONFIGS

    loaded = load_model(OmegaConf.load(CONFIGS / "model" / "tiny.yaml"), str(cache_dir))
    return apply_method(loaded.model, OmegaConf.load(CONFIGS / "method" / "adalora.yaml"), loaded.tokenizer), (
        loaded.tokenizer
    )


@pytest.mark.parametrize("stop_at", [3, 7])
def test_resume_ends_with_the_uninterrupted_adapter_and_rank_pattern(alpaca_file, compose_cfg, tmp_path, stop_at):
    """10 steps (budgeting in steps 2..5, the final mask at step 6, kept after) in one run == ``stop_at`` steps,
    stop, resume from last.ckpt: the sensitivity EMAs (stop at 3) and the rank pattern (stop at 7) come back with
    the checkpoint."""
    extra = ["trainer.max_steps=10", "method.tinit=1", "method.tfinal=4", "method.init_r=6", "method.target_r=2"]
    extra += ["method.beta1=0.99", "method.beta2=0.99"]  # long EMA memory: a lost history would change the ranks
    extra += ["callbacks.last_checkpoint.every_n_train_steps=1", "trainer.val_check_interval=5"]
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    _, full = train(compose_cfg(adalora_overrides(alpaca_file, full_dir, *extra)))
    stop = [f"+callbacks.stop._target_={StopAfterSteps.__module__}.StopAfterSteps", f"+callbacks.stop.steps={stop_at}"]
    train(compose_cfg([*adalora_overrides(alpaca_file, part_dir, *extra), *stop]))
    last = part_dir / "checkpoints" / "last.ckpt"
    _, resumed = train(compose_cfg([*adalora_overrides(alpaca_file, part_dir, *extra), f"ckpt_path={last}"]))
    assert resumed["trainer"].global_step == 10
    expected, got = adapter_state(full["model"]), adapter_state(resumed["model"])
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    config = resumed["model"].base_model.peft_config["default"]
    assert config.rank_pattern == full["model"].base_model.peft_config["default"].rank_pattern


def test_a_schedule_without_a_budgeting_step_fails_at_fit_start(alpaca_file, compose_cfg, tmp_path):
    from tunelab.errors import ConfigError

    extra = ["trainer.max_steps=4", "method.tinit=2", "method.tfinal=2"]
    with pytest.raises(ConfigError, match=r"leave no rank-budgeting step in this run's 4 optimizer steps"):
        train(compose_cfg(adalora_overrides(alpaca_file, tmp_path, *extra)))


def test_a_pruned_adapter_exports_at_its_kept_ranks_and_reloads_to_the_same_logits(
    alpaca_file, compose_cfg, tmp_path, cache_dir
):
    """peft saves each update cut to its kept ranks (the rank pattern) and resizes the modules on load: the
    reloaded adapter gives the trained model's logits."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from tunelab.export import load_exported
    from tunelab.models.loading import load_model

    from .conftest import CONFIGS
    from .method_helpers import aligned_logits

    extra = ["trainer.max_steps=8", "method.tinit=1", "method.tfinal=3", "method.init_r=6", "method.target_r=2"]
    metrics, objects = train(compose_cfg(adalora_overrides(alpaca_file, tmp_path, *extra, "export.adapter=true")))
    saved = load_file(Path(metrics["adapter_dir"]) / "adapter_model.safetensors")
    assert sum(t.numel() for name, t in saved.items() if "lora_E" in name) == 2 * 2 * 7
    loaded = load_model(OmegaConf.load(CONFIGS / "model" / "tiny.yaml"), str(cache_dir))
    reloaded = load_exported(loaded.model, Path(metrics["adapter_dir"]), loaded.tokenizer).eval()
    batch = batch_for(objects["tokenizer"])
    with torch.no_grad():
        expected = aligned_logits(objects["model"].eval(), batch)
        torch.testing.assert_close(aligned_logits(reloaded, batch), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("trainer", ["deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_deepspeed_and_fsdp_are_refused_at_config_time(trainer, compose_cfg):
    """The allocator reads each adapter weight and its gradient whole (ZeRO-3 measured failing inside the
    orthogonality term); DeepSpeed and FSDP partition them, so the config check refuses the pair in one line."""
    from tunelab.config_checks import check_config
    from tunelab.errors import ConfigError

    cfg = compose_cfg(["method=adalora", f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.devices=2"])
    with pytest.raises(ConfigError, match=r"method=adalora cannot run under trainer.strategy=.*use trainer=ddp"):
        check_config(cfg)
    check_config(compose_cfg(["method=adalora", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]))
