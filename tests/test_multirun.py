"""Hydra multirun: the basic launcher (one W&B run per job, grouped by sweep), an Optuna search on the joblib
launcher, the SLURM (submitit) launcher config, and DDP jobs under -m without stray folders. Sweeps run as
subprocesses of ``train.py`` on the tiny Llama, launched from an empty folder with ``TUNELAB_ROOT`` elsewhere."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from tunelab.loggers import sweep_group, wandb_logger

from .conftest import CONFIGS, ROOT, tiny_overrides


def sweep_overrides(alpaca_file: Path, *drop: str) -> list[str]:
    """The tiny run without its fixed output folder (Hydra gives each job one), a few steps with one validation."""
    keep = [o for o in tiny_overrides(alpaca_file, Path("unused")) if not o.startswith(("paths.output_dir", *drop))]
    return [*keep, "debug=fast", "test=false", "task.generation.num_samples=0"]


def run_sweep(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[Path, str]:
    """Run ``train.py <args>`` from an empty launch folder (``env`` added; "" unsets); return (the only sweep
    folder, output)."""
    launch, root = tmp_path / "launch", tmp_path / "root"
    launch.mkdir()
    base = {**os.environ, "TUNELAB_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    for key, value in (env or {}).items():
        base[key] = value
        if not value:
            del base[key]
    command = [sys.executable, str(ROOT / "train.py"), *args]
    result = subprocess.run(command, cwd=launch, capture_output=True, text=True, timeout=300, env=base)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert not list(launch.iterdir()), "nothing may be written into the launch folder"
    sweeps = list({p.parent.parent for p in root.rglob(".hydra")})  # job folders hold .hydra
    assert len(sweeps) == 1, sweeps
    return sweeps[0], output


def folders(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_dir()}


def job_folders(sweep: Path) -> set[str]:
    return {p.name for p in sweep.iterdir() if p.is_dir()}


def metrics(job: Path) -> dict:
    return json.loads((job / "metrics.json").read_text())


def job_overrides(job: Path) -> list[str]:
    return yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())


def test_slurm_launcher_follows_trainer_nodes_and_devices(monkeypatch, tmp_path):
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=8"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)

    # the sbatch script submitit would submit for this sweep (a fake srun stands in for a SLURM cluster)
    import submitit
    from hydra.utils import instantiate

    (tmp_path / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    scripts: list[str] = []

    def submit(executor: submitit.AutoExecutor, *args: object) -> list:
        scripts.append(executor._executor._make_submission_file_text("python -u job.py", "uid"))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", submit)
    slurm = instantiate(launcher)
    slurm.config = cfg
    slurm.launch([["method.r=8"]], initial_job_idx=0)
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8"):
        assert f"#SBATCH {line}\n" in scripts[0]

    # what Lightning makes of one of those 16 tasks (rank 9 = node 1, local rank 1): SLURM creates the processes
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    slurm_env = {
        "SLURM_NTASKS": launcher.nodes * launcher.tasks_per_node,  # what sbatch --nodes x --ntasks-per-node gives
        "SLURM_NTASKS_PER_NODE": launcher.tasks_per_node,
        "SLURM_NNODES": launcher.nodes,
        "SLURM_NODELIST": "node[01-02]",
        "SLURM_PROCID": 9,
        "SLURM_LOCALID": 1,
        "SLURM_NODEID": 1,
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_ID": 1,
    }
    for key, value in slurm_env.items():
        monkeypatch.setenv(key, str(value))
    for key in ("MASTER_ADDR", "MASTER_PORT"):  # Lightning writes them from SLURM's: removed again after the test
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # the Trainer sets rank 9 process-wide
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy="ddp",
        logger=False,
    )
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.node_rank, trainer.local_rank) == (16, 9, 1, 1)
    assert trainer.strategy.cluster_environment.main_address == "node01"


def test_wandb_group_is_the_sweep_only_under_multirun(tmp_path):
    assert sweep_group() is None  # no Hydra at all
    assert wandb_logger(project="p", name="n", save_dir=str(tmp_path), mode="offline")._wandb_init["group"] is None
    for experiment, expected in ((None, ""), ("lora_rank", "lora_rank/")):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            overrides = [f"experiment={experiment}"] if experiment else []
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        stamp = Path(cfg.hydra.sweep.dir).name
        try:
            for mode, group in ((RunMode.RUN, None), (RunMode.MULTIRUN, f"{expected}{stamp}")):
                OmegaConf.set_readonly(cfg.hydra, False)
                cfg.hydra.mode = mode
                HydraConfig.instance().set_config(cfg)
                assert sweep_group() == group
                logger = wandb_logger(project="p", name="n", save_dir=str(tmp_path), mode="offline", group="mine")
                assert logger._wandb_init["group"] == "mine"  # an explicit group is kept
        finally:
            HydraConfig.instance().cfg = None


def wandb_records(path: Path) -> Iterator:
    """The protobuf records of an offline ``run-<id>.wandb`` file (LevelDB log format: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == kind == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.slow  # multirun subprocesses
def test_basic_launcher_jobs_are_wandb_runs_of_one_group(alpaca_file, tmp_path):
    wandb_dirs = {k: str(tmp_path / "wandb-home") for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")}
    args = ["-m", "method=lora", "method.r=1,2", "logger=wandb", "logger.wandb.mode=offline"]
    sweep, _ = run_sweep(tmp_path, *args, *sweep_overrides(alpaca_file), env={**wandb_dirs, "WANDB_MODE": ""})
    assert job_folders(sweep) == {"0", "1"}
    runs = {}
    for job in ("0", "1"):
        assert metrics(sweep / job)["trainable_params"] > 0
        (run_file,) = (sweep / job / "wandb").glob("offline-run-*/run-*.wandb")
        records = list(wandb_records(run_file))
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert any(r.WhichOneof("record_type") == "exit" for r in records)  # the job finished its run
        runs[run.run_id] = run.run_group
    assert metrics(sweep / "1")["trainable_params"] == 2 * metrics(sweep / "0")["trainable_params"]  # r=2 vs r=1
    assert len(runs) == 2 and set(runs.values()) == {sweep.name}


@pytest.mark.slow  # multirun subprocesses
def test_optuna_search_runs_parallel_trials_and_writes_the_best(alpaca_file, tmp_path):
    """Two trials asked at once and run side by side by the joblib launcher (two processes)."""
    args = ["hparams_search=lora_optuna", "hydra.sweeper.n_trials=2", "method.r=choice(1,2)"]  # no -m: a sweep
    args += ["hydra/launcher=joblib", "hydra.sweeper.n_jobs=2"]
    sweep, output = run_sweep(tmp_path, *args, *sweep_overrides(alpaca_file, "task.optimizer.lr"))
    assert "Joblib.Parallel(n_jobs=2" in output and "is launching 2 jobs" in output
    assert sweep.parent.name == "lora_optuna"
    assert job_folders(sweep) == {"0", "1"}
    losses = []
    for job in ("0", "1"):
        losses.append(metrics(sweep / job)["best/val/loss"])
        suggested = dict(o.split("=", 1) for o in job_overrides(sweep / job))
        assert suggested["method.r"] in ("1", "2")
        assert 1e-5 <= float(suggested["task.optimizer.lr"]) <= 1e-3
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and set(best["best_params"]) == {"method.r", "task.optimizer.lr"}
    assert best["best_value"] == pytest.approx(min(losses))


@pytest.mark.slow  # multirun subprocesses
def test_ddp_jobs_under_multirun_leave_no_stray_folders(alpaca_file, tmp_path):
    args = ["-m", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "method.r=4,8"]
    sweep, _ = run_sweep(tmp_path, *args, *sweep_overrides(alpaca_file, "trainer.devices", "trainer.accelerator"))
    # rank 1 re-runs only its job, as a single run in the job's folder: no second sweep, no .hydra of its own
    jobs = [f"multirun/{sweep.name}/{job}" for job in ("0", "1")]
    subfolders = {f"{job}/{sub}" for job in jobs for sub in (".hydra", "checkpoints", "adapter")}
    assert folders(tmp_path / "root") == {"multirun", f"multirun/{sweep.name}", *jobs, *subfolders}
    for job, rank in (("0", 4), ("1", 8)):
        rank_1_log = (sweep / job / "train_ddp_process_1.log").read_text()  # rank 1 logged in its job's folder
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in rank_1_log
        assert f"method.r={rank}" in job_overrides(sweep / job)
        assert metrics(sweep / job)["data"]["train"]["examples"] == 32
    assert metrics(sweep / "1")["trainable_params"] == 2 * metrics(sweep / "0")["trainable_params"]


def test_parallel_joblib_refuses_multi_process_jobs():
    from omegaconf import OmegaConf

    from tunelab.errors import ConfigError
    from tunelab.multirun import check_launcher_fits_trainer

    joblib = OmegaConf.create({"_target_": "hydra_plugins.hydra_joblib_launcher.JoblibLauncher", "n_jobs": 2})
    ddp = OmegaConf.create({"accelerator": "cpu", "devices": 2})
    with pytest.raises(ConfigError, match="n_jobs=1"):
        check_launcher_fits_trainer(joblib, ddp)
    check_launcher_fits_trainer(OmegaConf.merge(joblib, {"n_jobs": 1}), ddp)
    check_launcher_fits_trainer(joblib, OmegaConf.create({"accelerator": "cpu", "devices": "auto"}))
