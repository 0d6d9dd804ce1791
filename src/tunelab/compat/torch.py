"""Workarounds for torch (checked on torch 2.13.0, pinned in pyproject), and the one way tunelab reads a checkpoint.

Each workaround names the behaviour it works around and the test in ``tests/test_compat.py`` that fails once torch
no longer shows it (then it can go). :func:`load_checkpoint` is every ``torch.load`` of a checkpoint file tunelab
does itself; ``tests/test_safety.py`` checks it.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import ConfigError


def loader_generator(seed: int) -> torch.Generator:
    """A private generator for a DataLoader, seeded with ``seed``.

    **Starting an epoch draws from the global RNG** (torch 2.13.0, ``_BaseDataLoaderIter.__init__``): every
    iterator of a DataLoader without a ``generator`` draws its workers' base seed from the global generator, so
    dropout masks after a resume (which starts a fresh iterator mid-run) would differ from an uninterrupted run.
    ``test_torch_dataloader_still_draws_from_the_global_rng`` fails once it stops drawing, and this can go.
    """
    return torch.Generator().manual_seed(seed)


def load_checkpoint(path: str | Path, *, map_location: Any = "cpu", safe_globals: tuple[Any, ...] = ()) -> Any:
    """A checkpoint file's contents on the CPU, unpickled as data only: a file that would run code is refused.

    A ``.ckpt`` is a pickle, and unpickling may call any function the file names. ``torch.load(weights_only=True)``
    (torch 2.13.0) rebuilds tensors, dicts, lists, tuples, str, int, float, bool and None (plus torch's own dtypes,
    sizes and devices) and refuses any other global with ``pickle.UnpicklingError``. A checkpoint train.py writes
    holds nothing else, for every task (state dict, loop and callback states, optimizer and scheduler states, data
    module position; :mod:`tunelab.callbacks.rng` stores NumPy's RNG keys as a tensor for this reason), so no type
    is allowlisted with ``torch.serialization.add_safe_globals``. ``weights_only=True`` is passed explicitly: left
    unset, torch's default (True since torch 2.6) turns False under ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``.

    ``safe_globals``: classes a library's own checkpoint files hold (DeepSpeed's: :mod:`tunelab.compat.deepspeed`),
    rebuilt as data (the class is looked up, its instance's fields set; no other code runs).

    Raises :class:`~tunelab.errors.ConfigError` naming the file and what it asked to run.
    """
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"WeightsUnpickler error: (.*?)(\.\s|$)", str(error), re.MULTILINE)
        reason = found.group(1) if found else str(error).splitlines()[0]
        raise ConfigError(
            f"refusing to load {path}: it is not a plain checkpoint ({reason}), and unpickling it could run code; "
            "checkpoints written by train.py hold only tensors and plain values"
        ) from None
