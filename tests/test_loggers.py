"""W&B logging through Lightning, offline (no network here): each run is its own offline run folder."""

from __future__ import annotations

import pytest

from tunelab.loggers import wandb_logger
from tunelab.train import train

from .conftest import tiny_overrides


def test_auto_mode_goes_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    logger = wandb_logger(project="p", name="n", save_dir=str(tmp_path), mode="auto")
    assert logger._wandb_init["mode"] == "offline"


def test_unknown_mode_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"logger\.wandb\.mode"):
        wandb_logger(project="p", name="n", save_dir=str(tmp_path), mode="sometimes")


def test_training_logs_to_an_offline_wandb_run(alpaca_file, compose_cfg, tmp_path):
    overrides = [
        *tiny_overrides(alpaca_file, tmp_path),
        "logger=wandb",
        "logger.wandb.mode=offline",
        "trainer.max_steps=3",
        "test=false",
        "task.generation.num_samples=0",
    ]
    train(compose_cfg(overrides))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))
    assert (tmp_path / "metrics.csv").exists()
