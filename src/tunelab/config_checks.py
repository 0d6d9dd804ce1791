"""Fail fast on config combinations that cannot work, before any weights load."""

from __future__ import annotations

from omegaconf import DictConfig

from tunelab.errors import ConfigError

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true")


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` with a one-line reason for a combination that cannot run here."""
    from tunelab.methods import METHODS
    from tunelab.models.loading import SOURCES, torch_dtype

    if cfg.method.name not in METHODS:
        raise ConfigError(f"method={cfg.method.name!r} is not one of {sorted(METHODS)}")
    if cfg.model.source not in SOURCES:
        raise ConfigError(f"model.source={cfg.model.source!r} is not one of {list(SOURCES)}")
    torch_dtype(cfg.model.dtype)
    if not cfg.data.get("builder") and not cfg.data.get("path"):
        raise ConfigError(f"data={cfg.data.name} reads a local file: set data.path=/path/to/file.jsonl")
    precision = str(cfg.trainer.precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not one of {list(PRECISIONS)}")
    wants_gpu = cfg.trainer.accelerator in ("gpu", "cuda")
    if wants_gpu and not gpu_available():
        raise ConfigError(
            f"trainer.accelerator={cfg.trainer.accelerator} but no CUDA GPU is visible; use trainer=cpu or trainer=ddp"
        )
    on_cpu = cfg.trainer.accelerator == "cpu" or (cfg.trainer.accelerator == "auto" and not gpu_available())
    if on_cpu and precision.startswith("16-"):
        raise ConfigError(
            f"trainer.precision={precision} needs a GPU (on CPU 16-mixed silently runs bf16 and 16-true gives "
            "NaN losses); use bf16-mixed or 32-true"
        )
    if cfg.ckpt_path is not None and not cfg.train:
        raise ConfigError("ckpt_path resumes training, but train=false; use evaluate.py ckpt_path=... instead")
    if cfg.method.name == "full" and cfg.export.merged:
        raise ConfigError("export.merged=true needs an adapter method; method=full already exports the full model")
