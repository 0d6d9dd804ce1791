"""Logger factories."""

from __future__ import annotations

import csv
import io
import netrc
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from tunelab.atomic import write_text
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


class HistoryWriter(ExperimentWriter):
    """Lightning's CSV experiment writer, except that it keeps the rows a run folder's ``metrics.csv`` holds.

    Lightning (2.6.6, ``_ExperimentWriter._check_log_dir_exists``) deletes ``metrics.csv`` when it starts in a folder
    that has one, so a resumed run lost its history. Here the file's rows stay. When the first row of this process
    arrives, with step ``s``, every kept row with a step ``>= s`` is dropped: those steps ran after the checkpoint
    the run resumed from, and run again now, so none is repeated; the rows before ``s`` (written as they were
    logged, see :class:`CSVLogger`) are all there, so none is lost. Rewrites of the file are atomic.

    One window remains: Lightning logs a step's training row after that batch's end hooks, where a mid-epoch
    checkpoint is written, so a kill in the milliseconds between that checkpoint's rename and the row reaching
    the file loses that one row (the resumed run starts after it)."""

    def _check_log_dir_exists(self) -> None:
        self._resumed = os.path.isfile(self.metrics_file_path)
        if self._resumed:
            with open(self.metrics_file_path, newline="") as handle:
                self.metrics_keys = list(csv.DictReader(handle).fieldnames or [])

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics_dict, step)
        if self._resumed:
            self._resumed = False
            self._drop_rows_from(self.metrics[-1]["step"])

    def _drop_rows_from(self, step: int) -> None:
        with open(self.metrics_file_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        kept = [row for row in rows if row.get("step", "").isdigit() and int(row["step"]) < step]
        if len(kept) < len(rows):
            self._write_rows(kept)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as handle:
            self._write_rows(list(csv.DictReader(handle)), fieldnames)

    def _write_rows(self, rows: list[dict[str, Any]], fieldnames: list[str] | None = None) -> None:
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=fieldnames or self.metrics_keys)
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.metrics_file_path, out.getvalue())


class CSVLogger(LightningCSVLogger):
    """Lightning's ``CSVLogger`` writing each row as it is logged (a killed run loses none) into a history a
    resume appends to (:class:`HistoryWriter`)."""

    def __init__(self, save_dir: str, name: str = "", version: str = "") -> None:
        super().__init__(save_dir=save_dir, name=name, version=version, flush_logs_every_n_steps=1)

    @property
    @rank_zero_experiment
    def experiment(self) -> HistoryWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = HistoryWriter(log_dir=self.log_dir)
        return self._experiment


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
