"""DDP on 2 CPU processes (gloo). Launched as a subprocess: inside pytest, Lightning's DDP would re-run
the pytest command in the child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import ROOT, tiny_overrides


def test_ddp_trains_on_two_cpu_processes(alpaca_file, tmp_path):
    output_dir = tmp_path / "run"
    overrides = [
        o
        for o in tiny_overrides(alpaca_file, output_dir)
        if not o.startswith(("trainer.devices", "trainer.accelerator"))
    ]
    command = [
        sys.executable,
        "train.py",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        f"hydra.run.dir={output_dir}",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["val/loss"] < metrics["untrained/val/loss"]
    assert (output_dir / "adapter" / "adapter_config.json").exists()
    # 88 training examples over 2 ranks x batch 4 = 11 optimizer steps per epoch
    assert metrics["data"]["train"]["examples"] == 88
    assert (output_dir / "checkpoints" / "last.ckpt").exists()
