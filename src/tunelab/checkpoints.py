"""Checkpoints a resumed run, the test split and an export can trust.

A run writes two kinds (``configs/callbacks/default.yaml``):

- ``best.ckpt``: Lightning's ``ModelCheckpoint`` ranked by ``monitor``, saving only at the end of a validation
  (``every_n_train_steps: null``, ``save_on_train_epoch_end: false``), so every validation that improves the score
  writes, right then, the weights it scored. (Lightning 2.6.6 skips the save at a validation whose step another
  save of the same callback already wrote, as a mid-epoch ``every_n_train_steps`` save does, and it scores a
  mid-epoch save with the last validation's value: the cadence below is therefore a second callback.)
- ``last.ckpt``: :class:`LastCheckpoint`, the state to resume from, unranked (it carries no score).

Both are written by :class:`AtomicCheckpointIO` (temp file, fsync, rename) and read as data only
(:func:`tunelab.compat.torch.load_checkpoint`); :func:`check_checkpoint_file` refuses a truncated or corrupt
``ckpt_path`` before any weights load.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn

from tunelab.atomic import replace_file
from tunelab.compat.lightning import validation_due
from tunelab.compat.torch import load_checkpoint
from tunelab.errors import ConfigError


class LastCheckpoint(Checkpoint):
    """``<dirpath>/last.ckpt``, the resume point: written after every validation during fit, at the end of every
    training epoch that had none, and every ``every_n_train_steps`` optimizer steps (mid-epoch resume points).

    A step due for both a cadence save and a validation is saved once, after the validation: resumed from a
    checkpoint written at the end of such a batch but before its validation, Lightning (2.6.6) fast-forwards past
    that validation, so the resumed run would never validate there (no metric row, no chance at ``best.ckpt``,
    early stopping one check behind). Saved after it, the checkpoint also holds the early-stopping and
    ``best.ckpt`` state that validation updated (checkpoint callbacks run after the others).
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = None, filename: str = "last") -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ConfigError(
                f"callbacks.last_checkpoint.every_n_train_steps={every_n_train_steps}: give a number of optimizer "
                "steps >= 1, or null for no mid-epoch checkpoints"
            )
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.every_n_train_steps = every_n_train_steps
        self._saved_step: int | None = None

    @property
    def state_key(self) -> str:
        return f"LastCheckpoint{{'filename': '{self.path.name}'}}"

    def _save(self, trainer: Trainer) -> None:
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = self.every_n_train_steps
        if every and trainer.global_step % every == 0 and not validation_due(trainer):
            self._save(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._saved_step != trainer.global_step:
            self._save(trainer)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint file IO, with a save that a kill cannot tear and a load that runs no code.

    Save: ``torch.save`` into a unique temporary beside the target, fsync, rename (:func:`tunelab.atomic.
    replace_file`); Lightning's own ``_atomic_save`` (2.6.6) renames without fsync. Load: weights only, whatever
    Lightning asks for (:func:`tunelab.compat.torch.load_checkpoint`), so ``trainer.fit(ckpt_path=...)`` and
    ``trainer.test(ckpt_path=...)`` refuse a checkpoint that would run code."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        replace_file(path, lambda temporary: torch.save(checkpoint, temporary))

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return load_checkpoint(path)


def check_checkpoint_file(path: str | Path, key: str = "ckpt_path") -> None:
    """Refuse, in one sentence, a ``ckpt_path`` that is missing, not a torch checkpoint, or truncated / corrupt.

    A file ``torch.save`` wrote is a zip archive: a truncated one has lost its central directory (at the end), and
    a corrupted byte fails its member's CRC-32, which ``testzip`` checks by reading the file once (about a second
    per GB). A folder (a sharded DeepSpeed / FSDP checkpoint) is left to its strategy."""
    path = Path(path)
    if path.is_dir():
        return
    if not path.is_file():
        raise ConfigError(f"{key}={path} does not exist")
    fix = "give another checkpoint (e.g. <run>/checkpoints/last.ckpt) or start the run again"
    if not zipfile.is_zipfile(path):
        raise ConfigError(
            f"{key}={path} is not a complete torch checkpoint (truncated, or another kind of file); {fix}"
        )
    with zipfile.ZipFile(path) as archive:
        try:
            bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            bad = f"{error}"
    if bad is not None:
        raise ConfigError(f"{key}={path} is corrupt (archive member {bad} fails its checksum); {fix}")
