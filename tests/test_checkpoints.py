"""Checkpoint files and run records a later run trusts: atomic writes, refused corrupt checkpoints, the metric
history a resume appends to (in-process; the SIGKILL runs are tests/test_kill_resume.py)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunelab.atomic import replace_file, write_text
from tunelab.checkpoints import AtomicCheckpointIO, check_checkpoint_file
from tunelab.errors import ConfigError
from tunelab.loggers import CSVLogger


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(4096.0)}, "global_step": 3}, path)
    return path


def test_a_complete_checkpoint_passes_and_loads_as_data(checkpoint: Path) -> None:
    check_checkpoint_file(checkpoint)
    loaded = AtomicCheckpointIO().load_checkpoint(checkpoint)
    assert loaded["global_step"] == 3 and torch.equal(loaded["state_dict"]["w"], torch.arange(4096.0))


def test_a_truncated_checkpoint_is_refused_in_one_sentence(checkpoint: Path) -> None:
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"^ckpt_path=.*last\.ckpt is not a complete torch checkpoint") as error:
        check_checkpoint_file(checkpoint)
    assert "\n" not in str(error.value)


def test_a_corrupted_byte_is_refused_by_its_checksum(checkpoint: Path) -> None:
    data = bytearray(checkpoint.read_bytes())
    offset = data.index(torch.arange(4096.0)[1000:1001].numpy().tobytes())  # inside the tensor's bytes
    data[offset] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"is corrupt \(archive member .*data/0 fails its checksum\)"):
        check_checkpoint_file(checkpoint)


def test_a_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^ckpt_path=.*nothing\.ckpt does not exist$"):
        check_checkpoint_file(tmp_path / "nothing.ckpt")


def test_train_refuses_a_truncated_ckpt_path_before_any_weights_load(checkpoint: Path, tmp_path: Path) -> None:
    """The check runs in check_config: one line, exit status 2, no model built (fast)."""
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "train.py", "model=tiny", f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path / 'r'}"]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: ckpt_path={checkpoint} is not a complete torch checkpoint (truncated, or another kind of file); "
        "give another checkpoint (e.g. <run>/checkpoints/last.ckpt) or start the run again"
    ]
    assert "method=lora model=tiny" not in result.stdout  # the model report: printed once weights are loaded


def test_a_writer_killed_midway_leaves_the_old_file_whole(tmp_path: Path) -> None:
    """replace_file: a process SIGKILLed while writing leaves the previous contents, plus only a hidden temp."""
    target = tmp_path / "metrics.json"
    write_text(target, "old")
    script = (
        "import os, signal, sys\n"
        "from tunelab.atomic import replace_file\n"
        "def write(temporary):\n"
        "    temporary.write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"replace_file({str(target)!r}, write)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert target.read_text() == "old"
    [leftover] = [p for p in tmp_path.iterdir() if p != target]
    assert leftover.name.startswith(".metrics.json.") and leftover.suffix == ".tmp"


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"

    def fail(temporary: Path) -> None:
        temporary.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_file(target, fail)
    assert list(tmp_path.iterdir()) == []


def logged(run_dir: Path, steps: range, value: float) -> None:
    logger = CSVLogger(str(run_dir))
    for step in steps:
        logger.log_metrics({"train/loss": value + step}, step=step)
    logger.finalize("success")


def read(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_each_row_is_on_disk_as_soon_as_it_is_logged(tmp_path: Path) -> None:
    logger = CSVLogger(str(tmp_path))
    logger.log_metrics({"train/loss": 1.5}, step=0)
    assert read(tmp_path) == [{"step": "0", "train/loss": "1.5"}]


def test_a_resumed_logger_appends_and_drops_the_rerun_steps(tmp_path: Path) -> None:
    """Killed after step 6 with the checkpoint at step 4: steps 4..6 run again and are logged once."""
    logged(tmp_path, range(7), 0.0)
    logged(tmp_path, range(4, 9), 100.0)
    assert [(r["step"], r["train/loss"]) for r in read(tmp_path)] == [
        *((str(s), str(float(s))) for s in range(4)),
        *((str(s), str(100.0 + s)) for s in range(4, 9)),
    ]


def test_a_new_metric_after_a_resume_keeps_the_history(tmp_path: Path) -> None:
    logged(tmp_path, range(3), 0.0)
    logger = CSVLogger(str(tmp_path))
    logger.log_metrics({"val/loss": 9.0}, step=3)
    rows = read(tmp_path)
    assert [r["step"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[-1] == {"step": "3", "train/loss": "", "val/loss": "9.0"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_lightning_csv_logger_still_deletes_the_history(tmp_path: Path) -> None:
    """Lightning 2.6.6's CSVLogger removes metrics.csv when it starts in a folder holding one: the reason for
    tunelab.loggers.HistoryWriter. Fails once Lightning keeps it (then HistoryWriter's override can go)."""
    from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger

    logged(tmp_path, range(3), 0.0)
    logger = LightningCSVLogger(str(tmp_path), name="", version="")
    logger.log_metrics({"train/loss": 5.0}, step=3)
    logger.save()
    assert [r["step"] for r in read(tmp_path)] == ["3"]


def test_the_atomic_temp_is_unique_per_writer(tmp_path: Path) -> None:
    """Two writers of one target never share a temporary: each is its own mkstemp file."""
    seen: list[Path] = []

    def record(temporary: Path) -> None:
        seen.append(temporary)
        temporary.write_text(str(os.getpid()))

    replace_file(tmp_path / "x", record)
    replace_file(tmp_path / "x", record)
    assert len(set(seen)) == 2 and all(p.parent == tmp_path for p in seen)
