"""Every precision x strategy x optimizer the configs offer trains, or fails at config time with one sentence.

bf16-mixed with the fused AdamW kernel and gradient clipping (the defaults) used to stop at the first optimizer
step on any non-sharded strategy: Lightning's AMP plugin refuses to clip for a fused optimizer even when nothing
is scaled (``tunelab.compat.lightning``).
"""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import OmegaConf

from tunelab import trainer_config
from tunelab.compat.lightning import BF16MixedPrecision
from tunelab.config_checks import check_config
from tunelab.errors import ConfigError
from tunelab.train import train

from .conftest import run_distributed, tiny_overrides
from .test_config import TRAINERS

THREE_STEPS_THEN_VALIDATE = ("trainer.max_steps=3", "trainer.val_check_interval=3", "test=false")


def fused_adamw_with_gradient(norm: float) -> torch.optim.AdamW:
    """A fused AdamW over one parameter whose gradient has L2 norm ``norm`` (a 3-4-0 vector scaled)."""
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.tensor([3.0, 4.0, 0.0]) * (norm / 5.0)
    return torch.optim.AdamW([param], fused=True)


def gradient_norm(optimizer: torch.optim.Optimizer) -> float:
    return float(torch.linalg.vector_norm(optimizer.param_groups[0]["params"][0].grad))


def test_lightning_still_refuses_fused_clipping_under_bf16():
    """The behaviour ``BF16MixedPrecision`` works around; when this fails, Lightning fixed it: drop the plugin."""
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        MixedPrecision("bf16-mixed", "cpu").clip_gradients(fused_adamw_with_gradient(10.0), clip_val=1.0)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_bf16_plugin_clips_a_fused_optimizer_to_the_norm(device):
    optimizer = fused_adamw_with_gradient(10.0)
    BF16MixedPrecision(device).clip_gradients(optimizer, clip_val=2.0)
    assert gradient_norm(optimizer) == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_trains_with_fused_adamw_and_clipping(compose_cfg, alpaca_file, tmp_path, precision):
    cfg = compose_cfg(
        [*tiny_overrides(alpaca_file, tmp_path), f"trainer.precision={precision}", *THREE_STEPS_THEN_VALIDATE]
    )
    assert cfg.task.optimizer.fused and cfg.trainer.gradient_clip_val > 0
    metrics, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.global_step == 3
    assert trainer.precision == precision
    assert isinstance(trainer.precision_plugin, BF16MixedPrecision) == (precision == "bf16-mixed")
    assert metrics["val/loss"] < metrics["untrained/val/loss"]


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ddp", "fsdp", "deepspeed_zero2"])
def test_bf16_mixed_trains_on_two_cpu_processes(alpaca_file, tmp_path, trainer):
    """The default optimizer (fused AdamW) and clipping under bf16-mixed, each strategy's own precision plugin."""
    output_dir = tmp_path / "run"
    result = run_distributed(
        alpaca_file, output_dir, trainer, "trainer.precision=bf16-mixed", *THREE_STEPS_THEN_VALIDATE
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert OmegaConf.load(output_dir / "config.yaml").trainer.precision == "bf16-mixed"
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["val/loss"] < metrics["untrained/val/loss"]


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true"])
@pytest.mark.parametrize("fused", [True, False])
def test_every_combination_passes_or_is_refused_in_one_sentence(
    compose_cfg, tmp_path, monkeypatch, trainer, precision, fused
):
    """On a (pretended) GPU, only 16-mixed + fused AdamW + clipping outside DeepSpeed is refused, by name."""
    monkeypatch.setattr(trainer_config, "gpu_available", lambda: True)
    cfg = compose_cfg(
        [
            f"trainer={trainer}",
            "trainer.accelerator=gpu",
            f"trainer.precision={precision}",
            f"task.optimizer.fused={fused}",
            f"paths.output_dir={tmp_path}",
        ]
    )
    refused = precision == "16-mixed" and fused and not trainer.startswith("deepspeed")
    if refused:
        with pytest.raises(ConfigError, match=r"16-mixed cannot clip .* task\.optimizer\.fused=false"):
            check_config(cfg)
    else:
        check_config(cfg)


def test_sixteen_mixed_with_fused_adamw_passes_the_checks_once_clipping_is_off(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_config, "gpu_available", lambda: True)
    cfg = compose_cfg(
        ["trainer=gpu", "trainer.precision=16-mixed", "trainer.gradient_clip_val=null", f"paths.output_dir={tmp_path}"]
    )
    check_config(cfg)
