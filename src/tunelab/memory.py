"""Peak memory of this process, without Lightning (the HF side of ``benchmarks/vs_hf_trainer.py`` measures itself
with it too): CUDA's allocator peak on a GPU, the kernel's resident-set high-water mark (``VmHWM``) on Linux."""

from __future__ import annotations

from pathlib import Path

import torch

PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or the kernel's RSS high-water mark (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif PROC_CLEAR_REFS.exists():
        PROC_CLEAR_REFS.write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak since the last reset (MiB): allocated CUDA memory, else peak RSS; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if not PROC_STATUS.exists():
        return None
    line = next(line for line in PROC_STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**10  # kB
