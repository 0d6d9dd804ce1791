"""Resume: N steps in one run == k steps, stop, resume from last.ckpt for N - k steps (fp32, tiny model)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tunelab.train import train

from .conftest import tiny_overrides
from .stopping import StopAfterSteps


def step_losses(output_dir: Path) -> dict[int, float]:
    """Training loss by logged step (one row per optimizer step, log_every_n_steps=1)."""
    with open(output_dir / "metrics.csv") as handle:
        pairs = [
            (int(row["step"]), float(row["train/loss"])) for row in csv.DictReader(handle) if row.get("train/loss")
        ]
    assert len({step for step, _ in pairs}) == len(pairs), "a step logged twice"
    return dict(pairs)


def resume_overrides(alpaca_file: Path, output_dir: Path, max_steps: int) -> list[str]:
    return [
        *tiny_overrides(alpaca_file, output_dir),
        "method=lora",
        "method.dropout=0.1",  # dropout draws random masks: resume must restore the RNG too
        "data.train_size=64",  # 16 batches of 4 per epoch: N=22 crosses into epoch 2
        f"trainer.max_steps={max_steps}",
        "trainer.max_epochs=-1",
        "trainer.val_check_interval=5",
        "trainer.check_val_every_n_epoch=null",
        "task.generation.num_samples=0",
        "task.scheduler.warmup_steps=3",
        "callbacks.last_checkpoint.every_n_train_steps=1",
        "validate_before_training=false",
        "test=false",
        "export.adapter=false",
        "~callbacks.early_stopping",
    ]


@pytest.mark.parametrize("stop_at", [7, 16])
def test_resume_reproduces_uninterrupted_losses(alpaca_file, compose_cfg, tmp_path, stop_at):
    total = 22
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    train(compose_cfg(resume_overrides(alpaca_file, full_dir, total)))
    stop = [f"+callbacks.stop._target_={StopAfterSteps.__module__}.StopAfterSteps", f"+callbacks.stop.steps={stop_at}"]
    train(compose_cfg([*resume_overrides(alpaca_file, part_dir, total), *stop]))
    before_stop = step_losses(part_dir)
    assert sorted(before_stop) == list(range(stop_at))
    last = part_dir / "checkpoints" / "last.ckpt"
    train(compose_cfg([*resume_overrides(alpaca_file, part_dir, total), f"ckpt_path={last}"]))
    uninterrupted, history = step_losses(full_dir), step_losses(part_dir)
    assert sorted(uninterrupted) == list(range(total))
    assert sorted(history) == list(range(total))  # the resume appended: no step repeated or skipped
    assert {k: history[k] for k in before_stop} == before_stop
    assert history == pytest.approx(uninterrupted, abs=1e-5)


@pytest.mark.parametrize(
    "method",
    [
        ["method=dora"],  # the magnitude vectors are trained tensors too
        ["method=vera"],  # the frozen shared projections are rebuilt from their seed, not trained
        ["method=loha"],
        ["method=lokr"],
        ["method=lora", "method.lora_plus_ratio=16"],  # LoRA+: B's parameter group at 16x the learning rate
    ],
    ids=["dora", "vera", "loha", "lokr", "lora_plus"],
)
def test_the_lora_family_resumes_to_the_uninterrupted_losses(method, alpaca_file, compose_cfg, tmp_path):
    """12 steps in one run == 7 steps, stop, resume from last.ckpt: every step's loss within 1e-5 (fp32), for each
    method of the LoRA family whose state is only its trained tensors and the optimizer's (AdaLoRA, which also
    carries its allocator, has its own resume test in tests/test_adalora.py)."""
    total, stop_at = 12, 7

    def overrides(output_dir: Path, *extra: str) -> list[str]:
        base = [o for o in resume_overrides(alpaca_file, output_dir, total) if not o.startswith("method")]
        return [*base, *method, *extra]

    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    train(compose_cfg(overrides(full_dir)))
    stop = [f"+callbacks.stop._target_={StopAfterSteps.__module__}.StopAfterSteps", f"+callbacks.stop.steps={stop_at}"]
    train(compose_cfg(overrides(part_dir, *stop)))
    train(compose_cfg(overrides(part_dir, f"ckpt_path={part_dir / 'checkpoints' / 'last.ckpt'}")))
    uninterrupted, history = step_losses(full_dir), step_losses(part_dir)
    assert sorted(history) == sorted(uninterrupted) == list(range(total))
    assert history == pytest.approx(uninterrupted, abs=1e-5)
