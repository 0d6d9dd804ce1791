"""Training speed and memory of a run, for the method tables: median step time and peak memory.

Step time is the wall time of one training batch (forward, backward, optimizer step), measured from
batch start to batch end; the first ``warmup_steps`` are left out (allocator and kernel warm-up). On CUDA
the timer synchronises the device at both ends, which costs a host sync per step: set
``callbacks.perf=null`` (remove the callback) for production speed. Peak memory, from the start of ``fit``
(the peak is reset there, so jobs of one multirun process are measured separately), is
``torch.cuda.max_memory_allocated`` on CUDA and the peak resident set size (``VmHWM``) on Linux CPUs.
Start-up is ``perf/first_batch_s``: seconds from the process's start (imports, config, model and data loading,
Trainer set-up) to the start of the first training batch, and ``perf/first_step_s``: to its end (plus one cold
forward / backward / optimizer step, whose cost is the model's, not the start-up's).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from tunelab.memory import peak_memory_mib, reset_peak_memory


def seconds_since_process_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


class StepTimer(Callback):
    def __init__(self, warmup_steps: int = 2) -> None:
        self.warmup_steps = warmup_steps
        self.step_seconds: list[float] = []
        self._seen = 0
        self._started = 0.0
        self.first_batch_s: float | None = None
        self.first_step_s: float | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        reset_peak_memory(pl_module.device)

    def _sync(self, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module)
        self._started = time.perf_counter()
        if self.first_batch_s is None:
            self.first_batch_s = seconds_since_process_start()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sync(pl_module)
        self._seen += 1
        if self._seen == 1:
            self.first_step_s = seconds_since_process_start()
        if self._seen > self.warmup_steps:
            self.step_seconds.append(time.perf_counter() - self._started)

    def summary(self, device: torch.device) -> dict[str, float]:
        """``perf/step_time_s`` (median over timed steps, if any), ``perf/peak_mem_mib``, ``perf/first_batch_s``,
        ``perf/first_step_s``."""
        result = {}
        peak = peak_memory_mib(device)
        if peak is not None:
            result["perf/peak_mem_mib"] = round(peak, 1)
        if self.step_seconds:
            result["perf/step_time_s"] = round(statistics.median(self.step_seconds), 4)
        if self.first_step_s is not None:
            result["perf/first_batch_s"] = round(self.first_batch_s, 3)
            result["perf/first_step_s"] = round(self.first_step_s, 3)
        return result
