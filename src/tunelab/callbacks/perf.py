"""Training speed and memory of a run, for the method tables: median step time and peak memory.

Step time is the wall time of one training batch (forward, backward, optimizer step), measured from
batch start to batch end; the first ``warmup_steps`` are left out (allocator and kernel warm-up). On CUDA
the timer synchronises the device at both ends, which costs a host sync per step: set
``callbacks.perf=null`` (remove the callback) for production speed. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the process's peak resident set size on CPU.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, else the process's peak RSS (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class StepTimer(Callback):
    def __init__(self, warmup_steps: int = 2) -> None:
        self.warmup_steps = warmup_steps
        self.step_seconds: list[float] = []
        self._seen = 0
        self._started = 0.0

    def _sync(self, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module)
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sync(pl_module)
        self._seen += 1
        if self._seen > self.warmup_steps:
            self.step_seconds.append(time.perf_counter() - self._started)

    def summary(self, device: torch.device) -> dict[str, float]:
        """``perf/step_time_s`` (median over timed steps, if any) and ``perf/peak_mem_mib``."""
        result = {"perf/peak_mem_mib": round(peak_memory_mib(device), 1)}
        if self.step_seconds:
            result["perf/step_time_s"] = round(statistics.median(self.step_seconds), 4)
        return result
