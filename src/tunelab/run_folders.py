"""A run never writes into another run's folder: each launch claims a fresh one, or is refused.

:class:`ClaimRunFolder` is a Hydra callback (``configs/hydra/default.yaml``: ``hydra.callbacks``); it runs when a
launch starts, before Hydra writes anything (``.hydra/``, the job log) into the folder.

- ``python train.py ...`` with the default folder (``outputs/<run_name>/<second>``) creates it with an exclusive
  ``mkdir``; a folder that exists already (a launch of the same command in the same second) is passed over for
  ``<second>_1``, ``<second>_2``, ...: two launches always get two folders.
- ``hydra.run.dir=<folder>`` given on the command line is refused if the folder holds a run (:data:`RUN_FILES`),
  unless the command resumes it (``ckpt_path=...``); it is claimed with an exclusive marker file, so of two
  launches into the same new folder one is refused.
- ``-m`` sweeps claim their sweep folder (``multirun/<second>``) the same way; jobs number their subfolders.

Processes a launcher starts for ranks above 0 (``LOCAL_RANK``/``RANK``/``SLURM_PROCID`` > 0: Lightning's DDP
children, torchrun, srun) use the folder they are given and claim nothing: rank 0 did.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from tunelab.errors import ConfigError, one_line_errors

RUN_FILES = ("run_info.json", "config.yaml", "metrics.csv", "checkpoints", ".hydra")  # any: the folder holds a run
MARKER = ".tunelab-run"  # created exclusively by the launch that claims an explicitly named folder
RANK_VARIABLES = ("LOCAL_RANK", "RANK", "SLURM_PROCID")


def launched_rank() -> int:
    """This process's rank as its launcher set it (0 when none did)."""
    return max(int(os.environ.get(name, "0") or 0) for name in RANK_VARIABLES)


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_FILES)


def claim_new(folder: Path) -> Path:
    """Create ``folder`` (or ``folder_1``, ``folder_2``, ... if taken) with an exclusive ``mkdir``; return it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(10_000):
        candidate = folder if attempt == 0 else folder.with_name(f"{folder.name}_{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise ConfigError(f"{folder}: 10000 runs of this name in one second; give hydra.run.dir=<a new folder>")


def claim_named(folder: Path, key: str, resuming: bool) -> None:
    """Claim a folder the command line named: refused if it holds a run that this command does not resume."""
    if resuming:
        return
    fix = f"give a new {key}, or resume that run with ckpt_path={folder}/checkpoints/last.ckpt"
    if holds_run(folder):
        raise ConfigError(f"{key}={folder} already holds a run; {fix}")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        (folder / MARKER).open("x").close()
    except FileExistsError:
        raise ConfigError(f"{key}={folder} was claimed by another launch; {fix}") from None


def named_on_command_line(config: DictConfig, key: str) -> bool:
    return any(override.split("=", 1)[0].lstrip("+~") == key for override in config.hydra.overrides.hydra)


def claim(config: DictConfig, key: str) -> None:
    """Claim the folder at ``config.<key>`` (``hydra.run.dir`` or ``hydra.sweep.dir``) for this launch."""
    from omegaconf import OmegaConf

    if launched_rank() > 0:
        return
    folder = Path(str(OmegaConf.select(config, key)))
    if named_on_command_line(config, key):
        claim_named(folder, key, resuming=config.get("ckpt_path") is not None)
        return
    claimed = claim_new(folder)
    if claimed != folder:
        with read_write(config.hydra), open_dict(config.hydra):
            OmegaConf.update(config, key, str(claimed))
            # a sweep's jobs recompose their config from these overrides (ConfigLoader.load_sweep_config)
            config.hydra.overrides.hydra.append(f"{key}={claimed}")


class ClaimRunFolder(Callback):
    """Hydra callback: claims the run folder (``python train.py``) or the sweep folder (``-m``) before any write."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with one_line_errors():
            claim(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with one_line_errors():
            claim(config, "hydra.sweep.dir")
