"""A finished run, loaded from its folder: ``<run>/checkpoints/*.ckpt``, ``<run>/adapter`` or ``<run>/merged``.

A run folder holds the run's resolved ``config.yaml`` (written by ``train.py``), so the same model, method,
head and data are rebuilt from it. Everything that reuses a trained run goes through here: ``evaluate.py``,
the distillation teacher, the reward-model scorer, the benchmarks.

A run folder is data, not code: its checkpoints are read as tensors and plain values only
(:func:`tunelab.compat.torch.load_checkpoint`), and its ``model.trust_remote_code`` is never followed; the
caller's own setting decides (``trust_remote_code``, false unless the caller's config says true).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tunelab.checkpoints import check_checkpoint_file
from tunelab.compat.torch import load_checkpoint
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
    if ckpt_path:
        check_checkpoint_file(ckpt_path)
    run_dir = run_folder(ckpt_path or adapter_path)
    return run_dir, run_config(run_dir)


def model_from_export(
    run_cfg: DictConfig, export_dir: Path, cache_dir: str, trust_remote_code: bool = False
) -> tuple[torch.nn.Module, Any]:
    """Model + tokenizer from an exported adapter (peft or in-house) on the run's base model, or from a full-model
    directory (method=full, or ``<run>/merged``).

    ``trust_remote_code`` replaces ``run_cfg.model.trust_remote_code`` for every load (base model, tokenizer,
    full model): a model's own Python code runs only when the caller asks for it."""
    from transformers import AutoTokenizer

    from tunelab.export import load_exported
    from tunelab.methods.inhouse import is_inhouse_dir
    from tunelab.models.loading import load_model, model_class, torch_dtype

    model_cfg = OmegaConf.merge(run_cfg.model, {"trust_remote_code": trust_remote_code})
    head, labels = OBJECTIVES[run_cfg.task.name].head(run_cfg)
    tokenizer = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=trust_remote_code)
    if (export_dir / "adapter_config.json").exists() or is_inhouse_dir(export_dir):
        quantization = METHODS[run_cfg.method.name].quantization(run_cfg.method)
        base = load_model(model_cfg, cache_dir, quantization_config=quantization, head=head, labels=labels).model
        return load_exported(base, export_dir, tokenizer), tokenizer
    full = model_class(head).from_pretrained(
        export_dir, dtype=torch_dtype(model_cfg.dtype), trust_remote_code=trust_remote_code
    )
    return full, tokenizer


def load_export(
    export_dir: str | Path, cache_dir: str, trust_remote_code: bool = False
) -> tuple[torch.nn.Module, Any, DictConfig]:
    """``(model, tokenizer, run config)`` of a run's export folder (``<run>/adapter`` or ``<run>/merged``).

    The returned run config carries the ``model.trust_remote_code`` the model was loaded with (the caller's
    ``trust_remote_code``, not the run folder's)."""
    run_dir = run_folder(export_dir)
    run_cfg = run_config(run_dir)
    run_cfg.model.trust_remote_code = trust_remote_code
    model, tokenizer = model_from_export(run_cfg, Path(export_dir), cache_dir, trust_remote_code=trust_remote_code)
    return model, tokenizer, run_cfg


def checkpoint_state(path: str | Path) -> dict[str, Any]:
    """The module state dict stored in a Lightning checkpoint; a file that would run code when unpickled is
    refused with a :class:`~tunelab.errors.ConfigError` (:func:`tunelab.compat.torch.load_checkpoint`)."""
    return load_checkpoint(path)["state_dict"]
