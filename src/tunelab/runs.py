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


INIT_ADAPTER_FREE_KEYS = ("base_model_name_or_path", "revision", "inference_mode", "init_lora_weights")
"""Keys of a peft ``adapter_config.json`` that ``init_adapter`` does not compare: where the base came from, the
inference flag, and how the weights were initialised (they are overwritten)."""


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A peft config as plain comparable values (sets and lists as sorted lists), less the free keys."""
    plain = {}
    for key, value in config.items():
        if key in INIT_ADAPTER_FREE_KEYS:
            continue
        value = getattr(value, "value", value)  # enums (task_type, peft_type) as their strings
        plain[key] = sorted(value) if isinstance(value, list | set | tuple) else value
    return plain


def init_from_export(model: torch.nn.Module, export_dir: str | Path, cfg: DictConfig) -> None:
    """Set the adapter of ``model`` (a peft model built by the method) to the weights of a run's peft export
    (``init_adapter=<run>/adapter``): SFT -> DPO -> GRPO as one chain of runs, or, with ``train=false``, one trained
    adapter scored under another task.

    Contract: the export's run trained the same model (``model.name`` of its ``config.yaml``); its
    ``adapter_config.json`` equals this run's adapter config on every key but :data:`INIT_ADAPTER_FREE_KEYS` (same
    adapter type, rank, scaling, targets, task type), and its tensors are exactly this model's adapter tensors
    (the same names and shapes, none missing, none left over); anything else is a :class:`ConfigError` naming what
    differs. The method's own data-dependent or SVD initialisation
    (``method.init`` other than default / gaussian) is refused: it would be overwritten, or (PiSSA, OLoRA) it
    changes the base weights the export was not trained against."""
    import json

    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    from tunelab.methods import is_peft_model

    export_dir, method_cfg = Path(export_dir), cfg.method
    where = f"init_adapter={export_dir}"
    config_file, weights_file = export_dir / "adapter_config.json", export_dir / "adapter_model.safetensors"
    if not config_file.exists() or not weights_file.exists():
        raise ConfigError(
            f"{where}: no peft adapter there ({config_file.name} and {weights_file.name} are what a peft method "
            "exports to <run>/adapter; in-house adapters and full models cannot start another run)"
        )
    if not is_peft_model(model):
        raise ConfigError(f"{where}: method={method_cfg.name} is not a peft adapter; use the method the export used")
    trained_on = run_config(run_folder(export_dir)).model.name
    if trained_on != cfg.model.name:
        raise ConfigError(f"{where}: the export adapts model={trained_on}, this run model={cfg.model.name}")
    init = method_cfg.get("init", "default")
    if init not in ("default", "gaussian"):
        raise ConfigError(f"{where}: method.init={init} initialises the adapter itself; set method.init=default")
    theirs = _comparable(json.loads(config_file.read_text()))
    ours = _comparable(model.peft_config["default"].to_dict())
    differ = sorted(key for key in theirs.keys() | ours.keys() if theirs.get(key) != ours.get(key))
    if differ:
        shown = ", ".join(f"{key}: export {theirs.get(key)!r}, this run {ours.get(key)!r}" for key in differ)
        raise ConfigError(f"{where}: the export's adapter differs from this run's method: {shown}")
    state = load_file(weights_file)
    expected = {name: tensor.shape for name, tensor in get_peft_model_state_dict(model).items()}
    found = {name: tensor.shape for name, tensor in state.items()}
    if expected != found:
        wrong = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
        raise ConfigError(
            f"{where}: its tensors are not this model's adapter tensors ({len(wrong)} differ in name or shape, "
            f"e.g. {wrong[0]}: export {found.get(wrong[0])}, this run {expected.get(wrong[0])})"
        )
    set_peft_model_state_dict(model, state)
