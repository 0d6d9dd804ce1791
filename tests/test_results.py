"""tunelab.results: one row per multirun job with metric and ``cfg:`` setting columns, CSV / Markdown / PNG out."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from tunelab import results


@pytest.fixture
def sweep(tmp_path):
    for rank, loss in ((8, 2.1), (2, 2.4), (32, 2.0)):
        job = tmp_path / f"r{rank}"
        job.mkdir()
        (job / "metrics.json").write_text(json.dumps({"val/loss": loss, "trainable_params": 1000 * rank}))
        (job / "config.yaml").write_text(f"method:\n  name: lora\n  r: {rank}\n")
    (tmp_path / "multirun.yaml").write_text("not a job\n")
    return tmp_path


def test_rows_hold_metrics_and_job_settings(sweep):
    rows = results.collect(sweep, ["cfg:method.r", "val/loss", "val/rougeL"])
    assert rows == [
        {"run": "r2", "cfg:method.r": 2, "val/loss": 2.4, "val/rougeL": None},
        {"run": "r8", "cfg:method.r": 8, "val/loss": 2.1, "val/rougeL": None},  # natural order: r8 before r32
        {"run": "r32", "cfg:method.r": 32, "val/loss": 2.0, "val/rougeL": None},
    ]
    assert results.markdown(rows).splitlines()[2] == "| r2 | 2 | 2.4 |  |"


def test_command_writes_csv_markdown_and_plot(sweep, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out" / "table"
    argv = ["results", str(sweep), "--columns", "cfg:method.r", "trainable_params"]
    monkeypatch.setattr(sys, "argv", [*argv, "--plot", "cfg:method.r", "val/loss", "--out", str(out)])
    results.main()
    with open(out.with_suffix(".csv")) as handle:
        table = list(csv.DictReader(handle))
    assert [(row["run"], row["cfg:method.r"], row["val/loss"]) for row in table] == [
        ("r2", "2", "2.4"),
        ("r8", "8", "2.1"),
        ("r32", "32", "2.0"),
    ]
    assert out.with_suffix(".md").read_text() == capsys.readouterr().out
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_an_empty_folder_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"no \*/metrics\.json"):
        results.collect(tmp_path, ["val/loss"])
