"""Workarounds for bitsandbytes (checked on bitsandbytes 0.50.2; pyproject allows >= 0.45).

Each function names the behaviour it works around and the test in ``tests/test_compat.py`` that fails once
bitsandbytes no longer shows it (then it can go).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def disable_cpu_repacking(layers: Iterable[torch.nn.Module]) -> None:
    """Switch off the eval-time CPU weight repacking of each 4-bit layer (``bitsandbytes.nn.Linear4bit``).

    **An evaluation pass stops gradients through 4-bit layers** (bitsandbytes 0.50.2, ``Linear4bit.forward`` on
    CPUs with avx512_bf16): an eval-mode forward of an input without grad repacks the layer's weight in place for a
    faster CPU kernel, and every later forward runs ``gemv_4bit``, which has no autograd kernel: no gradient reaches
    the layer's input (LoRA matrices before it train on nothing, silently) and the outputs move by ~1e-3.
    ``test_bitsandbytes_still_stops_gradients_after_an_eval_pass`` fails once gradients survive the repacking
    (or bitsandbytes no longer repacks), and this function can go.
    """
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
