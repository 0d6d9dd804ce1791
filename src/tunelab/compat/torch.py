"""Workarounds for torch (checked on torch 2.13.0, pinned in pyproject).

Each function names the behaviour it works around and the test in ``tests/test_compat.py`` that fails once torch
no longer shows it (then it can go).
"""

from __future__ import annotations

import torch


def loader_generator(seed: int) -> torch.Generator:
    """A private generator for a DataLoader, seeded with ``seed``.

    **Starting an epoch draws from the global RNG** (torch 2.13.0, ``_BaseDataLoaderIter.__init__``): every
    iterator of a DataLoader without a ``generator`` draws its workers' base seed from the global generator, so
    dropout masks after a resume (which starts a fresh iterator mid-run) would differ from an uninterrupted run.
    ``test_torch_dataloader_still_draws_from_the_global_rng`` fails once it stops drawing, and this can go.
    """
    return torch.Generator().manual_seed(seed)
