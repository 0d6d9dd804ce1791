"""Config composition and fail-fast checks (no weights are loaded)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tunelab.config_checks import check_config
from tunelab.errors import ConfigError

from .conftest import ROOT


def test_llama7b_lora_medqa_fsdp_composes(compose_cfg, tmp_path):
    cfg = compose_cfg(["method=lora", "model=llama7b", "data=medqa", "trainer=fsdp", f"paths.output_dir={tmp_path}"])
    assert cfg.model.path == "meta-llama/Llama-2-7b-hf"
    assert cfg.model.source == "hub" and cfg.model.dtype == "bfloat16"
    assert cfg.method.name == "lora" and cfg.method.r == 8
    assert cfg.trainer.strategy._target_ == "tunelab.strategies.fsdp_strategy"
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.data.format == "medqa"
    with pytest.raises(ConfigError, match=r"set data.path="):
        check_config(cfg)
    rendered = OmegaConf.to_yaml(cfg)
    assert "Llama-2-7b-hf" in rendered


def test_llama7b_chat_template_renders_inst_format(compose_cfg, tmp_path):
    from jinja2 import Template

    cfg = compose_cfg(["model=llama7b", f"paths.output_dir={tmp_path}"])
    text = Template(cfg.model.chat_template).render(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ],
        bos_token="<s>",
        eos_token="</s>",
    )
    assert text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s>"


TRAINERS = ["default", "cpu", "gpu", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"]


def test_sixteen_bit_on_cpu_fails_with_reason(compose_cfg, tmp_path):
    cfg = compose_cfg(["trainer=cpu", "trainer.precision=16-mixed", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="needs a GPU"):
        check_config(cfg)


def test_gpu_trainer_without_gpu_fails_with_reason(compose_cfg, tmp_path):
    cfg = compose_cfg(["trainer=gpu", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        check_config(cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer=ddp", "trainer.devices=8"],
        ["trainer=ddp"],
        ["trainer.devices=4"],
        ["trainer=ddp", "trainer.num_nodes=2"],
    ],
)
def test_several_devices_without_gpu_need_accelerator_cpu(compose_cfg, tmp_path, overrides):
    cfg = compose_cfg([*overrides, f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"add trainer\.accelerator=cpu"):
        check_config(cfg)
    check_config(compose_cfg([*overrides, "trainer.accelerator=cpu", f"paths.output_dir={tmp_path}"]))


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_unknown_group_option_lists_choices():
    result = run_train("method=nope")
    assert result.returncode != 0
    assert "Could not find 'method/nope'" in result.stderr
    assert "full" in result.stderr and "lora" in result.stderr


def test_unknown_key_is_rejected():
    result = run_train("method.rank=4")
    assert result.returncode != 0
    assert "method.rank" in result.stderr


def test_fsdp_strategy_wraps_the_models_transformer_blocks(compose_cfg, tmp_path):
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from tunelab.models.loading import load_model

    cfg = compose_cfg(["model=tiny", "trainer=fsdp", f"paths.output_dir={tmp_path}"])
    model = load_model(cfg.model, cfg.paths.cache_dir).model
    strategy = instantiate(cfg.trainer.strategy)(model=model, accelerator="cpu")
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
    assert strategy._activation_checkpointing_kwargs == {}
    cfg = compose_cfg(["model=tiny", "trainer=fsdp", "trainer.strategy.activation_checkpointing=true"])
    strategy = instantiate(cfg.trainer.strategy)(model=model, accelerator="cpu")
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}


@pytest.mark.parametrize(
    ("trainer", "stage", "offload"),
    [("deepspeed_zero2", 2, False), ("deepspeed_zero3", 3, False), ("deepspeed_zero3_offload", 3, True)],
)
def test_deepspeed_trainers_set_the_zero_stage(compose_cfg, cache_dir, trainer, stage, offload):
    from hydra.utils import instantiate

    from tunelab.models.loading import load_model
    from tunelab.strategies import CPUDeepSpeedStrategy
    from tunelab.trainer_config import shards_parameters

    cfg = compose_cfg(["model=tiny", f"trainer={trainer}"])
    model = load_model(cfg.model, cache_dir).model
    model.model.embed_tokens.weight.requires_grad_(False)  # a frozen part: checkpoints leave it out
    strategy = instantiate(cfg.trainer.strategy)(model=model, accelerator="cpu")
    assert isinstance(strategy, CPUDeepSpeedStrategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == offload and ("offload_param" in zero) == offload
    assert strategy.exclude_frozen_parameters
    assert shards_parameters(cfg.trainer) == (stage == 3)


def test_parameter_offload_needs_zero3(compose_cfg, cache_dir):
    from hydra.utils import instantiate

    from tunelab.models.loading import load_model

    cfg = compose_cfg(["model=tiny", "trainer=deepspeed_zero2", "trainer.strategy.offload_parameters=true"])
    with pytest.raises(ConfigError, match="needs ZeRO stage 3"):
        instantiate(cfg.trainer.strategy)(model=load_model(cfg.model, cache_dir).model, accelerator="cpu")


EXPERIMENTS = sorted(path.stem for path in (ROOT / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_passes_the_checks(name, compose_cfg, tmp_path):
    cfg = compose_cfg([f"experiment={name}", f"paths.output_dir={tmp_path}"])
    assert str(cfg.run_name).startswith(name) and cfg.seed == 42
    if cfg.task.name == "distill":  # the teacher is a run of yours: named on the command line
        with pytest.raises(ConfigError, match="teacher"):
            check_config(cfg)
    else:
        check_config(cfg)


def test_auto_precision_is_bf16_mixed_only_on_a_bf16_gpu(compose_cfg, tmp_path, monkeypatch):
    import torch

    from tunelab import trainer_config

    cfg = compose_cfg([f"paths.output_dir={tmp_path}"])
    assert cfg.trainer.precision == "auto"
    monkeypatch.setattr(trainer_config, "gpu_available", lambda: False)
    assert trainer_config.resolve_precision(cfg) == "32-true" == cfg.trainer.precision
    cfg = compose_cfg([f"paths.output_dir={tmp_path}"])
    monkeypatch.setattr(trainer_config, "gpu_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert trainer_config.resolve_precision(cfg) == "bf16-mixed"
    cfg = compose_cfg(["trainer.accelerator=cpu", f"paths.output_dir={tmp_path}"])
    assert trainer_config.resolve_precision(cfg) == "32-true"
