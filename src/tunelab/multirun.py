"""Hydra jobs that launch DDP processes: each multirun job's ranks write into that job's folder only.

Lightning's DDP launcher starts ranks > 0 by re-running ``sys.argv`` (plus ``hydra.run.dir``). Under ``-m`` that
command is the whole sweep, so rank 1 would start a second sweep in a second folder; and the launcher's
environment (``LOCAL_RANK``, ``MASTER_PORT``, ...) and process group outlive the job, so the next job would
wait for ranks that have exited.
"""

from __future__ import annotations

import os
import sys

from omegaconf import DictConfig

# set by Lightning's DDP process launcher in the launching process; a later multirun job must not inherit them
DDP_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def run_job(cfg: DictConfig) -> float | None:
    """``tunelab.train.run`` as one Hydra job; under ``-m``, DDP's extra ranks run this job only (below). A
    tunelab error ends the job with one line (:func:`tunelab.errors.one_line_errors`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from tunelab.errors import one_line_errors
    from tunelab.train import run

    with one_line_errors():
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return run(cfg)
        check_launcher_fits_trainer(HydraConfig.get().launcher, cfg.trainer)
        argv, env = list(sys.argv), {k: os.environ.get(k) for k in DDP_LAUNCH_ENV}
        ddp_children_run_this_job()
        try:
            return run(cfg)
        finally:
            sys.argv = argv
            release_ddp(env)


def launches_processes(trainer_cfg: DictConfig) -> bool:
    """Whether the trainer starts more than one process per node (DDP-style launch)."""
    devices = trainer_cfg.devices
    if devices == "auto":
        import torch

        return trainer_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.device_count() > 1
    return int(devices) > 1 if str(devices).isdigit() else True


def check_launcher_fits_trainer(launcher_cfg: DictConfig, trainer_cfg: DictConfig) -> None:
    """joblib runs parallel jobs in worker processes, where Lightning's DDP launcher re-runs joblib's worker
    module instead of train.py: refuse that combination with one sentence."""
    from tunelab.errors import ConfigError

    parallel_joblib = "joblib" in str(launcher_cfg.get("_target_", "")).lower() and launcher_cfg.get("n_jobs") != 1
    if parallel_joblib and launches_processes(trainer_cfg):
        raise ConfigError(
            "hydra/launcher=joblib with n_jobs != 1 cannot run multi-process (DDP / FSDP / DeepSpeed) jobs: "
            "set hydra.launcher.n_jobs=1 or use the basic launcher"
        )


def ddp_children_run_this_job() -> None:
    """Under ``-m``, make Lightning's DDP launcher re-run this job only, in this job's folder, for ranks > 0.

    Lightning re-runs ``sys.argv`` plus ``hydra.run.dir=<HydraConfig run.dir>``: left alone, rank 1 would start
    the whole sweep again in a second sweep folder. Here it gets this job's overrides as a single run
    (``hydra.mode=RUN`` beats a config's ``hydra.mode: MULTIRUN``, e.g. hparams_search) in this job's folder.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    hydra_cfg = HydraConfig.get()
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def release_ddp(env: dict[str, str | None]) -> None:
    """After a multirun job: close its process group and restore the launcher's env, so the next job launches
    its own DDP processes (otherwise it would see ``LOCAL_RANK`` and wait for ranks that have exited)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
