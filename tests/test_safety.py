"""A run folder is data, never code, and nothing a run writes holds a secret.

- A checkpoint whose unpickling would run code (here: create a marker file) is refused by every load of a
  checkpoint: ``runs.checkpoint_state``, ``evaluate.py ckpt_path=...``, a resume (Lightning's own load) and the
  FSDP strategy's full-checkpoint load; a real checkpoint still loads.
- A run folder's ``model.trust_remote_code: true`` is not followed; the caller's own flag decides.
- Secret-looking config values (``hf_token``, ``model.token``, an ``${oc.env:...}`` secret, ``key=value`` words of
  the command line) appear in no file of a run folder: ``config.yaml``, ``run_info.json``, Hydra's ``.hydra/``
  copies, the offline W&B run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tunelab.errors import ConfigError
from tunelab.evaluate import evaluate
from tunelab.run_info import redact
from tunelab.runs import checkpoint_state, load_export
from tunelab.train import train

from .conftest import CONFIGS, tiny_overrides

SECRET = "abc123"  # given on the command line
ENV_SECRET = "envsecret789"  # read by ${oc.env:...}
WANDB_KEY = "w" * 40  # the environment's W&B API key


class Exploit:
    """Unpickled, it opens (creates) ``marker``: what any global a crafted pickle names could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def crafted(tmp_path: Path) -> tuple[Path, Path]:
    """``(checkpoint, marker)``: ``<run>/checkpoints/best.ckpt`` that creates ``marker`` when unpickled freely."""
    path, marker = tmp_path / "run" / "checkpoints" / "best.ckpt", tmp_path / "marker"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "epoch": 0, "exploit": Exploit(marker)}, path)
    return path, marker


def test_the_crafted_checkpoint_runs_code_when_unpickled_freely(crafted):
    path, marker = crafted
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_checkpoint_state_refuses_a_crafted_checkpoint(crafted):
    path, marker = crafted
    with pytest.raises(ConfigError, match=r"refusing to load .*best\.ckpt: it is not a plain checkpoint .*io\.open"):
        checkpoint_state(path)
    assert not marker.exists()


def test_evaluate_refuses_a_crafted_checkpoint_before_loading_a_model(crafted, alpaca_file, compose_cfg, tmp_path):
    path, marker = crafted
    run_cfg = compose_cfg(tiny_overrides(alpaca_file, path.parent.parent))
    OmegaConf.save(run_cfg, path.parent.parent / "config.yaml", resolve=True)
    with pytest.raises(ConfigError, match="refusing to load"):
        evaluate(compose_cfg([f"ckpt_path={path}"], config_name="evaluate"))
    assert not marker.exists()


def test_resume_refuses_a_crafted_checkpoint(crafted, alpaca_file, compose_cfg, tmp_path):
    """Lightning loads a resume checkpoint through tunelab.checkpoints.AtomicCheckpointIO: as data only, whatever
    ``weights_only`` Lightning asks for."""
    path, marker = crafted
    with pytest.raises(ConfigError, match=r"refusing to load .*unpickling it could run code"):
        train(compose_cfg([*tiny_overrides(alpaca_file, tmp_path / "resumed"), f"ckpt_path={path}"]))
    assert not marker.exists()


def test_fsdp_full_checkpoint_load_refuses_a_crafted_checkpoint(crafted):
    import lightning.pytorch.strategies.fsdp as lightning_fsdp

    from tunelab.compat.lightning import eager_full_checkpoints

    path, marker = crafted
    with eager_full_checkpoints(), pytest.raises(ConfigError, match="refusing to load"):
        lightning_fsdp._lazy_load(path)
    assert not marker.exists()


def test_redact_replaces_secret_values_and_nothing_else(monkeypatch):
    monkeypatch.setenv("TUNELAB_SAFETY_TOKEN", ENV_SECRET)
    cfg = OmegaConf.create(
        {
            "model": {"hf_token": SECRET, "token": "${oc.env:TUNELAB_SAFETY_TOKEN}", "use_auth_token": True},
            "logger": {"WANDB_API_KEY": "k" * 40, "client_secret": None, "notes": "from ${model.hf_token}"},
            "generation": {"max_new_tokens": 8, "num_key_value_heads": 2, "tokenizer": "smollm2_package"},
            "method": {"projection_prng_key": 0, "cache_key": 1.5},  # numbers (a seed) are no credential
        }
    )
    argv = ["train.py", f"+model.hf_token={SECRET}", "--db-password=hunter22", "logger=wandb", f"tag=x{SECRET}y"]
    joined = f"data.size=8,+model.hf_token={SECRET},seed=1"  # as Hydra's override_dirname joins them
    config, words = redact((cfg, [*argv, joined]))
    assert config == {
        "model": {"hf_token": "***", "token": "***", "use_auth_token": True},
        "logger": {"WANDB_API_KEY": "***", "client_secret": None, "notes": "from ***"},
        "generation": {"max_new_tokens": 8, "num_key_value_heads": 2, "tokenizer": "smollm2_package"},
        "method": {"projection_prng_key": 0, "cache_key": 1.5},
    }
    assert words[:-1] == ["train.py", "+model.hf_token=***", "--db-password=***", "logger=wandb", "tag=x***y"]
    assert words[-1] == "data.size=8,+model.hf_token=***,seed=1"


@pytest.fixture(scope="module")
def secret_run(alpaca_file, tmp_path_factory) -> Path:
    """A tiny 2-step run through Hydra's own job runner (which writes ``.hydra/``), logging to an offline W&B run,
    with secrets on its command line, in an ``${oc.env:...}`` override and in the W&B key of the environment."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.utils import run_job
    from hydra.types import HydraContext

    run_dir = tmp_path_factory.mktemp("secret") / "run"
    overrides = [
        *tiny_overrides(alpaca_file, run_dir),
        f"hydra.run.dir={run_dir}",
        f"+model.hf_token={SECRET}",
        "+model.token=${oc.env:TUNELAB_SAFETY_TOKEN}",
        "logger=wandb",
        "logger.wandb.mode=offline",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "task.generation.num_samples=0",
        "validate_before_training=false",
        "test=false",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNELAB_SAFETY_TOKEN", ENV_SECRET)
        patch.setenv("WANDB_API_KEY", WANDB_KEY)
        patch.setenv("WANDB_MODE", "offline")  # Lightning's offline WandbLogger changes it; restored afterwards
        patch.setattr(sys, "argv", ["train.py", *overrides])
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        job = run_job(train, cfg, "hydra.run.dir", None, HydraContext(config_loader=None, callbacks=Callbacks()), False)
        _ = job.return_value  # re-raises the run's exception, if any
    return run_dir


def test_no_file_of_a_run_folder_holds_a_secret(secret_run):
    files = {p.relative_to(secret_run).as_posix(): p.read_bytes() for p in secret_run.rglob("*") if p.is_file()}
    hydra_copies = {".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml"}
    assert {"config.yaml", "run_info.json", *hydra_copies} <= set(files)
    assert any(name.endswith(".wandb") for name in files), sorted(files)
    secrets = (SECRET, ENV_SECRET, WANDB_KEY)
    leaks = {name: found for name, data in files.items() if (found := [s for s in secrets if s.encode() in data])}
    assert not leaks
    assert OmegaConf.load(secret_run / "config.yaml").model.hf_token == "***"
    assert "+model.hf_token=***" in (secret_run / "run_info.json").read_text()


def test_a_sweeps_multirun_yaml_is_redacted(tmp_path):
    """Under ``-m`` the launcher writes the sweep's overrides to ``<sweep>/multirun.yaml`` before any job starts."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import _save_config
    from hydra.types import RunMode

    from tunelab.run_info import write_run_info

    sweep = tmp_path / "sweep"
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"hydra.sweep.dir={sweep}", f"+model.hf_token={SECRET}"], return_hydra_config=True
        )
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.mode, cfg.hydra.runtime.output_dir = RunMode.MULTIRUN, str(sweep / "0")
    _save_config(cfg, "multirun.yaml", sweep)  # as hydra's BasicLauncher does
    try:
        HydraConfig.instance().set_config(cfg)
        write_run_info(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), sweep / "0")
    finally:
        HydraConfig.instance().cfg = None
    assert SECRET not in (sweep / "multirun.yaml").read_text()
    assert "+model.hf_token=***" in (sweep / "multirun.yaml").read_text()


def test_a_real_checkpoint_loads_as_data(secret_run):
    from tunelab.compat.torch import load_checkpoint

    checkpoint = load_checkpoint(secret_run / "checkpoints" / "last.ckpt")
    assert {"state_dict", "loops", "callbacks", "optimizer_states", "lr_schedulers"} <= set(checkpoint)
    assert any("RngStateCallback" in name for name in checkpoint["callbacks"])  # NumPy's state included
    assert checkpoint_state(secret_run / "checkpoints" / "best.ckpt")


def test_the_wandb_logger_redacts_the_command_line_and_hyperparameters(monkeypatch, tmp_path):
    from tunelab.loggers import wandb_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys, "argv", ["train.py", f"+model.hf_token={SECRET}"])
    logger = wandb_logger(project="p", name="n", save_dir=str(tmp_path), mode="offline")
    logger.log_hyperparams({"model": {"hf_token": SECRET}, "lr": 0.1})
    assert dict(logger.experiment.config)["model"] == {"hf_token": "***"}
    run_file, deadline = next(tmp_path.rglob("*.wandb")), time.monotonic() + 60
    while b"+model.hf_token=" not in run_file.read_bytes():  # W&B writes the command line seconds after the start
        assert time.monotonic() < deadline, "W&B wrote no command line within 60 s"
        time.sleep(0.2)
    logger.experiment.finish()
    assert sys.argv[1] == f"+model.hf_token={SECRET}"  # restored once the run started
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


class Stop(Exception):
    """Raised by the spy once it has seen what a model load was asked for."""


@pytest.fixture
def remote_code_run(secret_run, tmp_path) -> Path:
    """A copy of a run folder whose config.yaml says ``model.trust_remote_code: true``; its adapter dir."""
    run_dir = tmp_path / "remote"
    shutil.copytree(secret_run / "adapter", run_dir / "adapter")
    run_cfg = OmegaConf.load(secret_run / "config.yaml")
    run_cfg.model.trust_remote_code = True
    OmegaConf.save(run_cfg, run_dir / "config.yaml")
    return run_dir / "adapter"


def spy_on_load_model(monkeypatch, target: str) -> list[bool]:
    seen: list[bool] = []

    def spy(model_cfg, *args, **kwargs):
        seen.append(model_cfg.trust_remote_code)
        raise Stop

    monkeypatch.setattr(target, spy)
    return seen


@pytest.mark.parametrize("asked", [False, True])
def test_load_export_follows_the_callers_trust_remote_code_not_the_runs(asked, remote_code_run, cache_dir, monkeypatch):
    seen = spy_on_load_model(monkeypatch, "tunelab.models.loading.load_model")
    with pytest.raises(Stop):
        load_export(remote_code_run, str(cache_dir), **({"trust_remote_code": True} if asked else {}))
    assert seen == [asked]


@pytest.mark.parametrize("asked", [False, True])
def test_evaluate_follows_its_own_trust_remote_code_not_the_runs(asked, remote_code_run, compose_cfg, monkeypatch):
    seen = spy_on_load_model(monkeypatch, "tunelab.build.load_model")
    flag = ["model.trust_remote_code=true"] if asked else []
    with pytest.raises(Stop):
        evaluate(compose_cfg([f"adapter_path={remote_code_run}", *flag], config_name="evaluate"))
    assert seen == [asked]


def test_deepspeed_checkpoint_files_load_as_data_only(crafted, tmp_path):
    """A resume of a trainer=deepspeed_* run reads DeepSpeed's .pt files through tunelab.compat.deepspeed: its
    own classes (ZeRO stage, loss scaler, fragment addresses) load, a file that would run code is refused."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from tunelab.compat.deepspeed import weights_only_engine_loads

    own = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"zero_stage": ZeroStageEnum(2), "scaler": LossScaler(1.0), "at": fragment_address(4, 0)}, own)
    path, marker = crafted
    with weights_only_engine_loads():
        loaded = TorchCheckpointEngine().load(str(own), map_location="cpu")
        with pytest.raises(ConfigError, match=r"refusing to load .*unpickling it could run code"):
            TorchCheckpointEngine().load(str(path), map_location="cpu")
    assert loaded["zero_stage"] == ZeroStageEnum(2) and loaded["at"] == fragment_address(4, 0)
    assert loaded["scaler"].cur_scale == 1.0
    assert not marker.exists()


def test_a_run_stopped_by_its_config_check_leaves_no_secret_in_hydra_copies(tmp_path):
    """Hydra writes .hydra/ before the job starts; the job-start callback redacts it before the config check."""
    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "stopped"
    command = [
        sys.executable,
        "train.py",
        "model=tiny",
        f"+model.hf_token={SECRET}",
        "data.batch_size=0",
        f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("error: data.batch_size=0"), result.stderr
    copies = sorted(p.name for p in (run_dir / ".hydra").iterdir())
    assert copies == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert all(SECRET not in (run_dir / ".hydra" / name).read_text() for name in copies)
    assert "***" in (run_dir / ".hydra" / "overrides.yaml").read_text()
