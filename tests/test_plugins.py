"""A user's own method and objective (tests/plugins/toy.py + its YAMLs) train through ``python train.py`` and
compose with every other axis, without any file under ``src/`` naming them (issue 16)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.slow  # one train.py subprocess

PLUGIN = ["plugins=[tests.plugins.toy]", "hydra.searchpath=[file://tests/plugins/configs]"]


def test_a_plugin_method_and_objective_train_through_train_py(alpaca_file: Path, tmp_path: Path) -> None:
    overrides = [*PLUGIN, "method=toy_norm", "task=toy_lm", *tiny_overrides(alpaca_file, tmp_path)]
    overrides = [o for o in overrides if not o.startswith("task.generation")] + [
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
    ]
    command = [sys.executable, "train.py", *overrides, f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["val/loss"] < metrics["untrained/val/loss"], metrics
    # norm tuning on the tiny Llama: 2 blocks x 2 RMSNorms + the final norm, 64 gains each
    assert metrics["trainable_params"] == 5 * 64, metrics
    assert "method=toy_norm model=tiny" in result.stdout


def test_no_source_file_names_the_plugin() -> None:
    sources = "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))
    assert "toy_norm" not in sources and "toy_lm" not in sources


def test_an_unknown_name_points_to_plugins(compose_cfg, tmp_path: Path) -> None:
    from tunelab.config_checks import check_config
    from tunelab.errors import ConfigError

    cfg = compose_cfg([f"paths.output_dir={tmp_path}"])
    cfg.method.name = "not_registered"
    with pytest.raises(ConfigError, match=r"method='not_registered' is not one of .*plugins=\[your_package\.module\]"):
        check_config(cfg)
