"""One optimizer step's loss and update do not depend on how its batch is split: batch 8 == batch 1 x
accumulation 8 == 2 DDP processes x batch 4 (fp32, no dropout, tiny model), step by step."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tunelab.train import train

from .conftest import run_distributed, tiny_overrides

pytestmark = pytest.mark.slow  # multi-process runs (a 2-process DDP run, subprocess)

STEPS = 11  # 88 training examples / 8 per optimizer step
TOLERANCE = 4e-6  # 4 fp32 ulps at a loss of ~10.7 (summation order); largest measured: 1.9e-6 (2 ulps)


def step_losses(output_dir: Path) -> list[float]:
    """``train/loss`` of each optimizer step, in order."""
    with open(output_dir / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    return [float(row["train/loss"]) for row in sorted(rows, key=lambda row: int(row["step"]))]


def split_overrides(batch_size: int, accumulate: int) -> list[str]:
    return [
        "method=lora",
        "method.dropout=0",
        f"data.batch_size={batch_size}",
        f"trainer.accumulate_grad_batches={accumulate}",
        "trainer.max_epochs=1",
        "task.generation.num_samples=0",
        "validate_before_training=false",
        "test=false",
        "export.adapter=false",
    ]


def trained_losses(compose_cfg, alpaca_file, output_dir: Path, batch_size: int, accumulate: int) -> list[float]:
    train(compose_cfg([*tiny_overrides(alpaca_file, output_dir), *split_overrides(batch_size, accumulate)]))
    return step_losses(output_dir)


def largest_difference(losses: list[float], reference: list[float]) -> float:
    assert len(losses) == len(reference) == STEPS
    return max(abs(a - b) for a, b in zip(losses, reference, strict=True))


def test_batch_split_does_not_change_the_loss_trajectory(alpaca_file, compose_cfg, tmp_path):
    runs = {
        "batch8": trained_losses(compose_cfg, alpaca_file, tmp_path / "batch8", 8, 1),
        "batch1_x_accumulate8": trained_losses(compose_cfg, alpaca_file, tmp_path / "batch1_x_accumulate8", 1, 8),
    }
    ddp_dir = tmp_path / "ddp2_x_batch4"
    result = run_distributed(alpaca_file, ddp_dir, "ddp", *split_overrides(4, 1))
    assert result.returncode == 0, result.stderr[-3000:]
    runs["ddp2_x_batch4"] = step_losses(ddp_dir)

    reference = runs["batch8"]
    assert reference[-1] < reference[0]
    differences = {name: largest_difference(losses, reference) for name, losses in runs.items()}
    print(f"largest difference per split: {differences}")
    assert all(difference <= TOLERANCE for difference in differences.values()), differences


def test_the_per_micro_batch_mean_breaks_it(alpaca_file, compose_cfg, tmp_path, monkeypatch):
    """Without the step's token total (each micro-batch's own token mean, averaged: the usual normalisation), batch
    1 x accumulation 8 leaves the batch-8 trajectory by far more than the tolerance."""
    from tunelab.tasks.sft import SFTModule

    reference = trained_losses(compose_cfg, alpaca_file, tmp_path / "batch8", 8, 1)
    token_total_step = SFTModule.training_step

    def per_micro_batch_mean(self, batch, batch_idx):
        return token_total_step(self, {k: v for k, v in batch.items() if k != "global_batch_size"}, batch_idx)

    monkeypatch.setattr(SFTModule, "training_step", per_micro_batch_mean)
    broken = largest_difference(trained_losses(compose_cfg, alpaca_file, tmp_path / "broken", 1, 8), reference)
    print(f"largest difference with the per-micro-batch mean: {broken}")
    assert broken > 100 * TOLERANCE
