"""One optimizer step's loss and update do not depend on how its batch is split: batch 8 == batch 1 x
accumulation 8 == 2 DDP processes x batch 4 (fp32, no dropout, tiny model), step by step."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tunelab.train import train

from .conftest import run_distributed, tiny_overrides

STEPS = 11  # 88 training examples / 8 per optimizer step


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


def test_batch_split_does_not_change_the_loss_trajectory(alpaca_file, compose_cfg, tmp_path):
    runs = {}
    for name, batch_size, accumulate in (("batch8", 8, 1), ("batch1_x_accumulate8", 1, 8)):
        output_dir = tmp_path / name
        train(compose_cfg([*tiny_overrides(alpaca_file, output_dir), *split_overrides(batch_size, accumulate)]))
        runs[name] = step_losses(output_dir)
    ddp_dir = tmp_path / "ddp2_x_batch4"
    result = run_distributed(alpaca_file, ddp_dir, "ddp", *split_overrides(4, 1))
    assert result.returncode == 0, result.stderr[-3000:]
    runs["ddp2_x_batch4"] = step_losses(ddp_dir)

    reference = runs["batch8"]
    assert len(reference) == STEPS and reference[-1] < reference[0]
    for name, losses in runs.items():
        assert losses == pytest.approx(reference, abs=1e-3), name
