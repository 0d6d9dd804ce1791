"""Logger factories."""

from __future__ import annotations

import netrc
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

from tunelab.run_info import redact

MODES = ("auto", "online", "offline", "disabled")


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` that hands W&B no secret (:func:`tunelab.run_info.redact`).

    W&B stores with each run the command line it started from (``sys.argv``, read when the run starts, at the
    first log) and the hyper-parameters Lightning logs; both go through ``redact`` here. The class keeps
    Lightning's name: ``tunelab.train`` finishes a run's W&B loggers by that name."""

    @property
    def experiment(self) -> Any:
        if self._experiment is not None:
            return super().experiment
        argv = sys.argv
        sys.argv = redact(argv)
        try:
            return super().experiment
        finally:
            sys.argv = argv

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        super().log_hyperparams(redact(params))


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
) -> WandbLogger:
    """A Lightning ``WandbLogger`` that writes no secret (:class:`WandbLogger`); ``mode=auto`` logs online
    with credentials and offline without.

    ``group=None`` under ``-m`` becomes :func:`sweep_group` (each job is its own run, one group per sweep)."""
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
