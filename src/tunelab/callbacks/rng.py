"""Save the random-number-generator states in checkpoints and restore them on resume.

Lightning checkpoints model, optimizer, scheduler and loop progress but not the global RNGs, so dropout
masks after a resume would differ from an uninterrupted run. The states are captured when the checkpoint
is written and put back when training starts again.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def numpy_state_as_tensors() -> tuple[Any, ...]:
    """NumPy's RNG state with its key array as a tensor (checkpoints load with ``weights_only=True``)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.copy()), int(position), int(has_gauss), float(cached)


class RngStateCallback(Callback):
    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": numpy_state_as_tensors(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending is None:
            return
        random.setstate(self._pending["python"])
        name, keys, position, has_gauss, cached = self._pending["numpy"]
        np.random.set_state((name, keys.numpy(), position, has_gauss, cached))
        torch.set_rng_state(self._pending["torch"])
        if "cuda" in self._pending and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._pending["cuda"])
        self._pending = None
