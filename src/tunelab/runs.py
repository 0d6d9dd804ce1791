"""A finished run, loaded from its folder: ``<run>/checkpoints/*.ckpt``, ``<run>/adapter`` or ``<run>/merged``.

A run folder holds the run's resolved ``config.yaml`` (written by ``train.py``), so the same model, method,
head and data are rebuilt from it. Everything that reuses a trained run goes through here: ``evaluate.py``,
the distillation teacher, the reward-model scorer, the benchmarks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tunelab.errors import ConfigError
from tunelab.methods import METHODS
from tunelab.tasks import OBJECTIVES


def run_folder(source: str | Path) -> Path:
    """The run folder of a checkpoint (``<run>/checkpoints/x.ckpt``) or an export (``<run>/adapter``)."""
    source = Path(source)
    if not source.exists():
        raise ConfigError(f"{source} does not exist")
    return source.parent.parent if source.suffix == ".ckpt" else source.parent


def run_config(run_dir: Path) -> DictConfig:
    """The run's saved config."""
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise ConfigError(f"{config_file} not found: a run folder is the one train.py wrote")
    return OmegaConf.load(config_file)


def locate_run(ckpt_path: str | None, adapter_path: str | None) -> tuple[Path, DictConfig]:
    """The run folder and its saved config, from exactly one of a checkpoint or an export folder."""
    if bool(ckpt_path) == bool(adapter_path):
        raise ConfigError("give exactly one of ckpt_path=<run>/checkpoints/best.ckpt or adapter_path=<run>/adapter")
    run_dir = run_folder(ckpt_path or adapter_path)
    return run_dir, run_config(run_dir)


def model_from_export(run_cfg: DictConfig, export_dir: Path, cache_dir: str) -> tuple[torch.nn.Module, Any]:
    """Model + tokenizer from an exported adapter (peft or in-house) on the run's base model, or from a full-model
    directory (method=full, or ``<run>/merged``)."""
    from transformers import AutoTokenizer

    from tunelab.export import load_exported
    from tunelab.methods.inhouse import is_inhouse_dir
    from tunelab.models.loading import load_model, model_class, torch_dtype

    head, labels = OBJECTIVES[run_cfg.task.name].head(run_cfg)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    if (export_dir / "adapter_config.json").exists() or is_inhouse_dir(export_dir):
        quantization = METHODS[run_cfg.method.name].quantization(run_cfg.method)
        base = load_model(run_cfg.model, cache_dir, quantization_config=quantization, head=head, labels=labels).model
        return load_exported(base, export_dir, tokenizer), tokenizer
    return model_class(head).from_pretrained(export_dir, dtype=torch_dtype(run_cfg.model.dtype)), tokenizer


def load_export(export_dir: str | Path, cache_dir: str) -> tuple[torch.nn.Module, Any, DictConfig]:
    """``(model, tokenizer, run config)`` of a run's export folder (``<run>/adapter`` or ``<run>/merged``)."""
    run_dir = run_folder(export_dir)
    run_cfg = run_config(run_dir)
    model, tokenizer = model_from_export(run_cfg, Path(export_dir), cache_dir)
    return model, tokenizer, run_cfg


def checkpoint_state(path: str | Path) -> dict[str, Any]:
    """The module state dict stored in a Lightning checkpoint."""
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
