"""Logger factories."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

MODES = ("auto", "online", "offline", "disabled")


def wandb_has_credentials() -> bool:
    """True when an API key is in the environment or ``~/.netrc`` holds a W&B login."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def sweep_group() -> str | None:
    """Under ``-m``, the W&B group shared by every job of this sweep: its sweep folder (``<time>`` for the
    default ``multirun/<time>``, else ``<parent>/<time>``, e.g. ``lora_rank/<time>``); None for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(HydraConfig.get().sweep.dir).resolve()
    return sweep_dir.name if sweep_dir.parent.name == "multirun" else f"{sweep_dir.parent.name}/{sweep_dir.name}"


def wandb_logger(
    project: str,
    name: str,
    save_dir: str,
    mode: str = "auto",
    group: str | None = None,
    tags: list[str] | None = None,
) -> Any:
    """A Lightning ``WandbLogger``; ``mode=auto`` logs online with credentials and offline without.

    ``group=None`` under ``-m`` becomes :func:`sweep_group` (each job is its own run, one group per sweep)."""
    from lightning.pytorch.loggers import WandbLogger

    if mode not in MODES:
        raise ValueError(f"logger.wandb.mode={mode!r} is not one of {list(MODES)}")
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_has_credentials() else "offline")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        group=group if group is not None else sweep_group(),
        tags=list(tags or []),
        mode=mode,
        offline=mode == "offline",
    )
