"""A tunelab error ends a run with one line on stderr (``error: <message>``), status 2; HYDRA_FULL_ERROR=1 shows
its stack; under ``-m`` the job fails to Hydra and the sweep goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import OmegaConf

from tunelab.errors import ConfigError, DataError, one_line_errors, tunelab_error

from .conftest import ROOT, synthetic_pairs, tiny_overrides

MEDQA_WITHOUT_PATH = ["method=lora", "model=llama7b", "data=medqa", "trainer=fsdp"]
MEDQA_LINE = "error: data=medqa reads a local file: set data.path=/path/to/file.jsonl"


def run_train(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def wrapped(error: Exception) -> Exception:
    """``error`` as Lightning or Hydra hands it on: the cause of another error, itself the context of a third."""
    outer = RuntimeError("a hook failed")
    outer.__cause__ = error
    last = ValueError("while reporting")
    last.__context__ = outer
    return last


def test_tunelab_error_is_found_down_the_cause_and_context_chain():
    data_error = DataError("missing field", file="f.jsonl", line=3, field="output")
    assert tunelab_error(data_error) is data_error
    assert tunelab_error(wrapped(data_error)) is data_error
    assert tunelab_error(wrapped(KeyError("bug"))) is None
    looped = RuntimeError("loop")
    looped.__context__ = RuntimeError("back")
    looped.__context__.__context__ = looped
    assert tunelab_error(looped) is None


@pytest.fixture
def hydra_mode(monkeypatch):
    """Set the Hydra run mode one_line_errors sees (None: outside any Hydra job)."""

    def _set(mode: RunMode | None) -> None:
        cfg = None if mode is None else OmegaConf.create({"hydra": {"mode": mode}})
        monkeypatch.setattr(HydraConfig.instance(), "cfg", cfg)

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    return _set


@pytest.mark.parametrize("mode", [None, RunMode.RUN])
def test_single_run_exits_2_with_one_line(hydra_mode, capsys, mode):
    hydra_mode(mode)
    with pytest.raises(SystemExit) as info, one_line_errors():
        raise wrapped(DataError("missing field", file="f.jsonl", line=3, field="output"))
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: f.jsonl, line 3: field 'output': missing field\n"


def test_sweep_job_fails_to_hydra_in_one_line(hydra_mode, capsys):
    hydra_mode(RunMode.MULTIRUN)
    error = ConfigError("method.r=0 must be a whole rank >= 1")
    refused = pytest.raises(CompactHydraException, match=r"^method\.r=0 must be a whole rank >= 1$")
    with refused as info, one_line_errors():
        raise error
    assert info.value.__cause__ is error
    assert capsys.readouterr().err == "error: method.r=0 must be a whole rank >= 1\n"


def test_other_errors_and_full_error_go_through_unchanged(hydra_mode, monkeypatch, capsys):
    hydra_mode(None)
    with pytest.raises(KeyError), one_line_errors():
        raise KeyError("a bug keeps its stack")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError), one_line_errors():
        raise ConfigError("shown with its stack")
    assert capsys.readouterr().err == ""


def test_config_error_is_one_line_from_train_py(tmp_path: Path):
    result = run_train(*MEDQA_WITHOUT_PATH, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert last_line(result.stderr) == MEDQA_LINE
    assert "Traceback" not in result.stderr


def test_full_error_shows_the_stack(tmp_path: Path):
    result = run_train(*MEDQA_WITHOUT_PATH, f"hydra.run.dir={tmp_path}", env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "tunelab.errors.ConfigError: data=medqa reads a local file" in result.stderr


def test_evaluate_py_reports_the_same_way(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "evaluate.py", f"hydra.run.dir={tmp_path}"],  # neither ckpt_path nor adapter_path
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert last_line(result.stderr).startswith("error: ") and "ckpt_path" in last_line(result.stderr)
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # a train.py subprocess that loads the tiny model
def test_data_error_raised_in_trainer_setup_is_one_line(tmp_path: Path):
    rows = synthetic_pairs(60)
    del rows[2]["output"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_train(*tiny_overrides(bad, tmp_path / "run"), f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert last_line(result.stderr) == f"error: {bad}, line 3: field 'output': missing field"
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # a two-job sweep subprocess
def test_sweep_reports_each_failed_job_and_runs_the_rest(tmp_path: Path):
    result = run_train("-m", "data.batch_size=0,-1", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert [line.split(" must ")[0] for line in lines] == ["error: data.batch_size=0", "error: data.batch_size=-1"]
    assert "#1 : data.batch_size=-1" in result.stdout  # the second job ran after the first failed
    assert "Traceback" not in result.stderr
