"""A seeded, rank-sharded sampler that can resume mid-epoch.

Written in-house because the stock options do not resume exactly: Lightning's mid-epoch restore replays the
epoch from its start unless the loader is stateful, and its stateful-loader path drops the state when the
optimizer config reads ``trainer.estimated_stepping_batches`` (Lightning issue #20550).

Order of epoch ``e``: a permutation from ``torch.Generator().manual_seed(seed + e)`` (identity when
``shuffle`` is false), padded by wrapping around to a multiple of ``world_size`` when ``pad`` is true, then
rank ``r`` takes positions ``r, r + world_size, ...``. :meth:`resume_from` makes the next iteration of
that epoch start after the samples this rank already consumed.

With ``sizes`` (e.g. each example's supervised-token count) it yields ``(index, total)`` pairs instead, where
``total`` is the sum of ``sizes`` over the sample's global batch: the ``global_batch`` consecutive positions of
the padded order that one optimizer step consumes over all ranks and accumulated micro-batches (rank ``r``'s
micro-batch ``m`` holds positions ``(m * batch + i) * world_size + r``). A loss divided by that total is the
same whether the batch is split by accumulation, by ranks, or not at all.

With ``lengths`` (length-grouped sampling) each run of ``group_size`` consecutive samples of the permutation
(a multiple of the global batch) is sorted longest first, so every micro-batch holds similar lengths and pads
little; which samples share a run still changes with the epoch's permutation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
        sizes: list[int] | None = None,
        global_batch: int = 1,
        lengths: list[int] | None = None,
        group_size: int = 1,
    ) -> None:
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.sizes, self.global_batch = sizes, global_batch
        self.lengths, self.group_size = lengths, group_size
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_from(self, epoch: int, consumed: int) -> None:
        """Start the next iteration at ``epoch``, skipping the first ``consumed`` samples of this rank."""
        self.epoch, self._skip = epoch, consumed

    def _epoch_order(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        if self.lengths is not None:
            lengths, size = self.lengths, self.group_size
            runs = (order[start : start + size] for start in range(0, len(order), size))
            order = [index for run in runs for index in sorted(run, key=lambda i: -lengths[i])]
        if self.pad and self.num_samples:
            total = math.ceil(self.num_samples / self.world_size) * self.world_size
            order += order[: total - len(order)]
        return order

    def _with_batch_totals(self, order: list[int]) -> list[tuple[int, int]]:
        assert self.sizes is not None
        step = self.global_batch
        totals = [sum(self.sizes[i] for i in order[start : start + step]) for start in range(0, len(order), step)]
        return [(index, totals[position // step]) for position, index in enumerate(order)]

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        order: list = self._epoch_order()
        if self.sizes is not None:
            order = self._with_batch_totals(order)
        skip, self._skip = self._skip, 0
        return iter(order[self.rank :: self.world_size][skip:])

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.num_samples / self.world_size)
        return len(range(self.rank, self.num_samples, self.world_size))
