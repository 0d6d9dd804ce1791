"""DDP on 2 CPU processes (gloo)."""

from __future__ import annotations

import json

import pytest

from .conftest import run_distributed

pytestmark = pytest.mark.slow  # multi-process runs (2 CPU processes, subprocess)


def test_ddp_trains_on_two_cpu_processes(alpaca_file, tmp_path):
    output_dir = tmp_path / "run"
    result = run_distributed(alpaca_file, output_dir, "ddp", "trainer.max_epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["val/loss"] < metrics["untrained/val/loss"]
    assert (output_dir / "adapter" / "adapter_config.json").exists()
    # 88 training examples over 2 ranks x batch 4 = 11 optimizer steps per epoch
    assert metrics["data"]["train"]["examples"] == 88
    assert (output_dir / "checkpoints" / "last.ckpt").exists()
