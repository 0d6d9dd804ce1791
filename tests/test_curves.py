"""tunelab.curves reads the CSV logger's file, skips rows where a metric was not logged, and writes a PNG."""

from __future__ import annotations

import pytest

from tunelab.curves import plot, series


def test_curves_follow_the_logged_rows(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,train/loss,val/acc\n0,,0.5\n4,0.9,\n9,0.7,\n9,,0.75\n")
    assert series(run, "train/loss") == ([4, 9], [0.9, 0.7])
    assert series(run, "val/acc") == ([0, 9], [0.5, 0.75])
    summary = plot([run], ["lora"], ["train/loss", "val/acc", "val/kl"], tmp_path / "out.png")
    assert summary == [
        "train/loss [lora]: 0.9 (step 4) -> 0.7 (step 9)",
        "val/acc [lora]: 0.5 (step 0) -> 0.75 (step 9)",
        "val/kl [lora]: not logged",
    ]
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_metrics_csv_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"no metrics\.csv"):
        series(tmp_path, "val/acc")
