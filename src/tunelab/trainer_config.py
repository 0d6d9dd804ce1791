"""Facts read off the ``trainer`` config group: the hardware it asks for, its strategy and its precision."""

from __future__ import annotations

from omegaconf import DictConfig

PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true")


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def runs_on_cpu(accelerator: str) -> bool:
    """Whether ``trainer.accelerator`` resolves to CPU processes (``auto`` does on a machine without CUDA)."""
    return accelerator == "cpu" or (accelerator == "auto" and not gpu_available())


def uses_gpu(trainer_cfg: DictConfig) -> bool:
    """Whether the Trainer will run on CUDA: asked for (gpu / cuda), or ``auto`` with a GPU visible."""
    return trainer_cfg.accelerator in ("auto", "gpu", "cuda") and gpu_available()


def strategy_name(strategy: str | DictConfig) -> str:
    """A configured strategy's name in lower case: Lightning's name, or a factory config's ``_target_``."""
    return str(strategy.get("_target_", "") if isinstance(strategy, DictConfig) else strategy).lower()


def shards_parameters(trainer_cfg: DictConfig) -> bool:
    """Whether the strategy splits each parameter over ranks: FSDP (all sharding modes but NO_SHARD) or ZeRO-3."""
    strategy = trainer_cfg.strategy
    if isinstance(strategy, DictConfig):
        target = str(strategy.get("_target_", ""))
        if target.endswith("fsdp_strategy"):
            return strategy.get("sharding_strategy", "FULL_SHARD") != "NO_SHARD"
        return target.endswith("deepspeed_strategy") and strategy.get("stage") == 3
    return "fsdp" in str(strategy) or "stage_3" in str(strategy)


def resolve_precision(cfg: DictConfig) -> str:
    """``trainer.precision=auto`` made concrete, in place (so the saved config records what ran): bf16-mixed when
    the run uses a GPU with bf16 (Ampere or newer), else 32-true."""
    if cfg.trainer.precision == "auto":
        import torch

        cfg.trainer.precision = "bf16-mixed" if uses_gpu(cfg.trainer) and torch.cuda.is_bf16_supported() else "32-true"
    return cfg.trainer.precision
