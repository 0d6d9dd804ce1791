"""SIGKILL a run, resume it from last.ckpt in the same folder: it ends as the uninterrupted run, bit for bit.

fp32 on CPU, the tiny model with LoRA dropout (so the RNG state matters), 24 steps: validations at steps 6, 12,
18 and 24, a mid-epoch checkpoint every 4 steps (steps 12 and 24 have both). Killed at a step between checkpoints,
right after the validation of step 12 (before its checkpoints are written), and half-way through writing the
checkpoint file of step 8. Compared with the
uninterrupted run: best.ckpt and last.ckpt (weights, step, score), metrics.csv row for row, metrics.json's
validation figures and the exported adapter.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.compat.torch import load_checkpoint

from .conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.slow

STEPS, VAL_EVERY, CKPT_EVERY = 24, 6, 4


def command(alpaca_file: Path, run_dir: Path, *extra: str) -> list[str]:
    overrides = [o for o in tiny_overrides(alpaca_file, run_dir) if not o.startswith("paths.output_dir")]
    return [
        sys.executable,
        "train.py",
        *overrides,
        f"hydra.run.dir={run_dir}",
        "method=lora",
        "method.dropout=0.1",
        "data.train_size=48",  # 12 batches per epoch: the run crosses an epoch end
        f"trainer.max_steps={STEPS}",
        "trainer.max_epochs=-1",
        f"trainer.val_check_interval={VAL_EVERY}",
        "trainer.check_val_every_n_epoch=null",
        f"callbacks.last_checkpoint.every_n_train_steps={CKPT_EVERY}",
        "~callbacks.early_stopping",
        "task.generation.num_samples=0",
        "test=false",
        *extra,
    ]


def run(arguments: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(arguments, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def val_losses(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["val/loss"]) for r in rows(run_dir) if r.get("val/loss")}


@pytest.fixture(scope="module")
def uninterrupted(alpaca_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("kill") / "uninterrupted"
    result = run(command(alpaca_file, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_best_ckpt_is_the_best_validation_even_on_a_checkpoint_step(uninterrupted: Path) -> None:
    """best.ckpt holds the weights of the validation with the lowest val/loss, saved right after it, although
    that step (24) is also a mid-epoch checkpoint step; metrics.json reports that validation's score."""
    losses = val_losses(uninterrupted)
    trained = {step: loss for step, loss in losses.items() if step > 0}  # step 0: the untrained validation
    assert sorted(trained) == [5, 11, 17, 23]  # logged at the step label of the batch before them
    best_step = min(trained, key=trained.get)
    assert best_step == STEPS - 1  # the loss still falls: the best validation is the one on a checkpoint step
    best = load_checkpoint(uninterrupted / "checkpoints" / "best.ckpt")
    assert best["global_step"] == best_step + 1
    metrics = json.loads((uninterrupted / "metrics.json").read_text())
    assert metrics["best/val/loss"] == pytest.approx(trained[best_step], abs=1e-6)
    assert metrics["best/val/loss"] == pytest.approx(metrics["val/loss"], abs=1e-6)
    last = load_checkpoint(uninterrupted / "checkpoints" / "last.ckpt")
    assert last["global_step"] == STEPS
    scores = [state["best_model_score"] for state in last["callbacks"].values() if "best_model_score" in state]
    assert scores == [
        best["callbacks"][next(k for k in best["callbacks"] if "ModelCheckpoint" in k)]["best_model_score"]
    ]
    assert float(scores[0]) == pytest.approx(trained[best_step], abs=1e-6)  # the one score: best.ckpt's, earned


def assert_same_checkpoint(a: Path, b: Path) -> None:
    left, right = load_checkpoint(a), load_checkpoint(b)
    assert left["global_step"] == right["global_step"] and left["epoch"] == right["epoch"]
    assert left["state_dict"].keys() == right["state_dict"].keys()
    for name, tensor in left["state_dict"].items():
        assert torch.equal(tensor, right["state_dict"][name]), name
    assert left["callbacks"].keys() == right["callbacks"].keys()
    for key, state in left["callbacks"].items():
        if "ModelCheckpoint" in key:
            assert state["best_model_score"] == right["callbacks"][key]["best_model_score"], key
            assert state["best_model_path"] == right["callbacks"][key]["best_model_path"].replace(
                str(b.parent.parent), str(a.parent.parent)
            )


@pytest.mark.parametrize(
    ("step", "at"),
    [(5, "train_batch_end"), (12, "validation_end"), (8, "checkpoint_write")],
    ids=["between_checkpoints", "after_a_validation", "mid_checkpoint_write"],
)
def test_sigkill_then_resume_ends_as_the_uninterrupted_run(
    alpaca_file: Path, uninterrupted: Path, tmp_path: Path, step: int, at: str
) -> None:
    run_dir = tmp_path / "killed"
    kill = [
        "+callbacks.kill._target_=tests.stopping.KillAt",
        f"+callbacks.kill.step={step}",
        f"+callbacks.kill.at={at}",
    ]
    killed = run(command(alpaca_file, run_dir, *kill))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run_dir / "metrics.json").exists()
    resumed = run(command(alpaca_file, run_dir, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert rows(run_dir) == rows(uninterrupted)  # every step once, every value equal: nothing lost or repeated
    for name in ("best.ckpt", "last.ckpt"):
        assert_same_checkpoint(uninterrupted / "checkpoints" / name, run_dir / "checkpoints" / name)
    adapter, reference = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (run_dir, uninterrupted))
    assert adapter.keys() == reference.keys()
    assert all(torch.equal(adapter[k], reference[k]) for k in reference)
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, uninterrupted))
    assert ours["best/val/loss"] == theirs["best/val/loss"] and ours["val/loss"] == theirs["val/loss"]
    # a write cut short leaves only a hidden temporary, never a file named like a checkpoint
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "best.ckpt",
        "last.ckpt",
    ]
