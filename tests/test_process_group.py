"""A rank that dies or hangs ends the others within the process-group timeout, with one line that names it
(``tunelab.compat.lightning.LostRankLauncher``); the timeout, ``trainer.strategy.timeout_s``, reaches every
multi-process strategy."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch.distributed as dist
from hydra.utils import instantiate

from tunelab.compat.lightning import LostRankError, LostRankLauncher
from tunelab.config_checks import check_config
from tunelab.errors import ConfigError

from .conftest import run_distributed

MULTI_PROCESS_TRAINERS = ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"]
TIMEOUT_S = 60  # also the rendezvous timeout: on CI's 2 loaded cores, a rank's start took more than 20 s once
HANG_S = 120  # a hung rank that nobody kills ends itself after this, so a failing test leaves no process behind
GLOO_CLOSED = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
    "[127.0.0.1]:31882. This is typically caused by a remote worker crashing. Check the logs of the remote worker "
    "before reporting an error. GLHF! 🏖️"
)  # what gloo raises on rank 0 once rank 1 is SIGKILLed (measured on torch 2.13.0)


class FailRank(pl.Callback):
    """Rank ``rank`` fails at the start of optimizer step ``step``: SIGKILLs itself, or (``hang=True``) sleeps
    :data:`HANG_S` first; before, it prints ``[fail-rank] killed|hangs at <unix time>`` on stderr."""

    def __init__(self, rank: int = 1, step: int = 3, hang: bool = False) -> None:
        self.rank, self.step, self.hang = rank, step, hang

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank != self.rank or trainer.global_step != self.step:
            return
        print(f"[fail-rank] {'hangs' if self.hang else 'killed'} at {time.time()}", file=sys.stderr, flush=True)
        if self.hang:
            time.sleep(HANG_S)
        os.kill(os.getpid(), signal.SIGKILL)


def failed_at(stderr: str) -> float:
    """When :class:`FailRank` failed its rank, read from the run's stderr."""
    (when,) = re.findall(r"^\[fail-rank\] \w+ at ([\d.]+)$", stderr, re.MULTILINE)
    return float(when)


LOST_RANK_LINES = {
    # rank 0 meets the closed connection at its next collective (Lightning's process observer: within 5 s)
    "killed": (
        r"the process group broke \(gloo: [^)]*Connection (closed|reset) by peer[^)]*\); "
        r"rank 1 \(pid \d+\) died of SIGKILL \(out of memory\? killed by the scheduler\?\)",
        (0, 15),
    ),
    # rank 0 waits the timeout in its collective, then kills rank 1
    "hung": (
        rf"a collective got no answer within trainer\.strategy\.timeout_s={TIMEOUT_S} \(gloo: [^)]*\); "
        r"rank 1 \(pid \d+\) was still running \(hung\?\) and has been killed",
        (TIMEOUT_S - 2, TIMEOUT_S + 30),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("fate", LOST_RANK_LINES)
def test_a_lost_rank_ends_rank_zero_with_one_line(alpaca_file, tmp_path, fate):
    """DDP on 2 CPU processes; rank 1 is SIGKILLed, or hangs, at step 3 of 11."""
    expected, (earliest, latest) = LOST_RANK_LINES[fate]
    result = run_distributed(
        alpaca_file,
        tmp_path / "run",
        "ddp",
        f"trainer.strategy.timeout_s={TIMEOUT_S}",
        f"+callbacks.fail._target_={__name__}.FailRank",
        f"+callbacks.fail.hang={fate == 'hung'}",
        timeout=HANG_S + 300,
    )
    ended = time.time()  # run_distributed returns once every rank has closed its end of the output pipes
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.fullmatch(rf"error: rank 0 stopped: {expected}; check the other ranks' output above", errors[0]), errors
    assert earliest <= ended - failed_at(result.stderr) < latest


def cpu_environment(monkeypatch: pytest.MonkeyPatch):
    """Lightning's environment of a process that runs as local rank 0 and starts nobody (``LOCAL_RANK`` set)."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # the launcher sets none then
    return LightningEnvironment()


def test_rank_zero_names_the_rank_that_died_and_kills_the_one_that_hangs(monkeypatch):
    launcher = LostRankLauncher(cpu_environment(monkeypatch), 3, 1, timedelta(seconds=TIMEOUT_S))
    killed = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    killed.wait()
    hung = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({HANG_S})"])
    launcher.procs.extend([killed, hung])  # as if it had started ranks 1 and 2

    def collective() -> None:
        raise RuntimeError(GLOO_CLOSED)

    with pytest.raises(LostRankError) as caught:
        launcher.launch(collective)
    assert str(caught.value) == (
        "rank 0 stopped: the process group broke (torch.distributed: Connection closed by peer [127.0.0.1]:31882); "
        f"rank 1 (pid {killed.pid}) died of SIGKILL (out of memory? killed by the scheduler?); "
        f"rank 2 (pid {hung.pid}) was still running (hung?) and has been killed; check the other ranks' output above"
    )
    assert hung.poll() == -signal.SIGKILL
    assert launcher.procs == []  # Lightning's process observer polls this list: nothing left for it to kill for


def test_a_rank_that_never_joins_is_told_apart_from_a_silent_collective(monkeypatch):
    """The TCP store's rendezvous error (torch 2.13.0) names the join, not a collective."""
    launcher = LostRankLauncher(cpu_environment(monkeypatch), 2, 1, timedelta(seconds=TIMEOUT_S))

    def rendezvous() -> None:
        raise dist.DistStoreError("Timed out after 61 seconds waiting for clients. 1/2 clients joined.")

    with pytest.raises(LostRankError) as caught:
        launcher.launch(rendezvous)
    assert str(caught.value) == (
        f"rank 0 stopped: not every rank joined the process group within trainer.strategy.timeout_s={TIMEOUT_S} "
        "(slow start? raise it) (torch.distributed: Timed out after 61 seconds waiting for clients); "
        f"another rank died, or hung past trainer.strategy.timeout_s={TIMEOUT_S}; check the other ranks' output above"
    )


def test_other_errors_pass_the_launcher_unchanged(monkeypatch):
    launcher = LostRankLauncher(cpu_environment(monkeypatch), 2, 1, timedelta(seconds=TIMEOUT_S))

    def step() -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        launcher.launch(step)


@pytest.mark.parametrize("trainer", MULTI_PROCESS_TRAINERS)
def test_the_timeout_reaches_every_multi_process_strategy(trainer, compose_cfg, cache_dir):
    from tunelab.models.loading import load_model

    model = load_model(compose_cfg(["model=tiny"]).model, cache_dir).model
    for overrides, seconds in (([], 1800), ([f"trainer.strategy.timeout_s={TIMEOUT_S}"], TIMEOUT_S)):
        cfg = compose_cfg(["model=tiny", f"trainer={trainer}", *overrides])
        strategy = instantiate(cfg.trainer.strategy)(model=model, accelerator="cpu")
        assert strategy._timeout == timedelta(seconds=seconds)
    built = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, logger=False, enable_progress_bar=False)
    assert isinstance(built.strategy.launcher, LostRankLauncher)
    assert built.strategy.launcher.timeout == timedelta(seconds=TIMEOUT_S)


@pytest.mark.parametrize("timeout_s", [0, -5, "soon"])
def test_a_timeout_that_is_no_time_is_refused(timeout_s, compose_cfg, tmp_path):
    cfg = compose_cfg(["trainer=ddp", "trainer.accelerator=cpu", f"trainer.strategy.timeout_s={timeout_s}"])
    with pytest.raises(ConfigError, match=rf"trainer\.strategy\.timeout_s={timeout_s} must be a time > 0 in seconds"):
        check_config(cfg)
