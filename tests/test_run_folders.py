"""A launch never writes into another run's folder (tunelab.run_folders): a fresh folder, or one refused line."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tunelab.run_folders import claim_new

from .conftest import ROOT

pytestmark = pytest.mark.slow

QUICK = [
    "model=tiny",
    "debug=fast",
    "trainer.max_steps=1",
    "validate_before_training=false",
    "test=false",
    "export.adapter=false",
    "task.generation.num_samples=0",
    "trainer.enable_progress_bar=false",
]


def launch(*overrides: str, root: Path) -> subprocess.Popen:
    env = {**os.environ, "TUNELAB_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "train.py", *QUICK, *overrides]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=600)
    return process.returncode, stderr


def test_claim_new_passes_over_taken_folders_even_when_racing(tmp_path: Path) -> None:
    taken = tmp_path / "outputs" / "2026-12-01_10-00-00"
    taken.mkdir(parents=True)
    claimed: list[Path] = []
    threads = [threading.Thread(target=lambda: claimed.append(claim_new(taken))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(p.name for p in claimed) == sorted(f"2026-12-01_10-00-00_{i}" for i in range(1, 9))


def test_two_launches_in_the_same_second_get_two_folders(tmp_path: Path) -> None:
    """Every default folder name of the next two minutes is already another run's; two launches at once both
    run, each in a folder of its own (`<second>_1`, `<second>_2` when they share a second), and no other
    run's folder is touched."""
    runs = tmp_path / "outputs" / "tiny-lora-hpo_qa"
    now = datetime.now()
    for offset in range(120):
        folder = runs / (now + timedelta(seconds=offset)).strftime("%Y-%m-%d_%H-%M-%S")
        folder.mkdir(parents=True)
        (folder / "run_info.json").write_text("another run")
    first, second = launch(root=tmp_path), launch(root=tmp_path)
    assert finish(first)[0] == 0 and finish(second)[0] == 0
    fresh = sorted(p for p in runs.iterdir() if (p / "metrics.json").exists())
    assert len(fresh) == 2 and all("_" in p.name.rsplit("-", 1)[-1] for p in fresh), fresh  # suffixed names
    assert all((p / "run_info.json").read_text() != "another run" for p in fresh)
    untouched = [p for p in runs.iterdir() if p not in fresh]
    assert len(untouched) == 120 and all(sorted(os.listdir(p)) == ["run_info.json"] for p in untouched)


def test_a_named_folder_holding_a_run_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    run = tmp_path / "earlier"
    run.mkdir()
    (run / "run_info.json").write_text("an earlier run")
    code, stderr = finish(launch(f"hydra.run.dir={run}", root=tmp_path))
    assert code == 2
    assert stderr.strip().splitlines() == [
        f"error: hydra.run.dir={run} already holds a run; give a new hydra.run.dir, or resume that run with "
        f"ckpt_path={run}/checkpoints/last.ckpt"
    ]
    assert sorted(os.listdir(run)) == ["run_info.json"] and (run / "run_info.json").read_text() == "an earlier run"


def test_two_launches_into_one_named_new_folder_run_once(tmp_path: Path) -> None:
    """The folder is claimed with an exclusive marker: of two launches one runs, the other is refused."""
    run = tmp_path / "shared"
    first, second = launch(f"hydra.run.dir={run}", root=tmp_path), launch(f"hydra.run.dir={run}", root=tmp_path)
    codes = sorted([finish(first)[0], finish(second)[0]])
    assert codes == [0, 2]
    assert (run / "metrics.json").exists()
