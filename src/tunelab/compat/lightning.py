"""Workarounds for Lightning (checked on lightning 2.6.6 with torch 2.13.0; pyproject allows lightning 2.6.x).

Each class and function names the Lightning behaviour it works around and the test that fails once Lightning
no longer shows it (then it can go): ``tests/test_precision.py`` for :class:`BF16MixedPrecision`,
``tests/test_compat.py`` for the others.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins import ClusterEnvironment
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch.optim import Optimizer

from tunelab.compat.torch import load_checkpoint
from tunelab.errors import TunelabError


class BF16MixedPrecision(MixedPrecision):
    """Lightning's ``bf16-mixed`` autocast plugin that clips gradients with any optimizer, fused ones included.

    **bf16-mixed refuses to clip with a fused optimizer** (lightning 2.6.x, ``MixedPrecision.clip_gradients``):
    the AMP plugin raises "does not allow for gradient clipping because it performs unscaling of gradients
    internally" for every optimizer with ``_step_supports_amp_scaling`` (torch's fused AdamW), although under
    ``bf16-mixed`` there is no grad scaler and the gradients are never scaled. This plugin clips as the plain
    precision plugin does when no scaler exists. Under ``16-mixed`` the refusal is real (the plugin then skips
    ``scaler.unscale_`` for such optimizers, so clipping would see scaled gradients): that combination is refused
    at config time instead. ``tests/test_precision.py::test_lightning_still_refuses_fused_clipping_under_bf16``
    fails once Lightning stops refusing, and this class can go.
    """

    def __init__(self, device: str) -> None:
        super().__init__("bf16-mixed", device)

    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        """The base plugin's clipping: bf16 gradients carry no loss scale, so nothing needs unscaling first."""
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)


def clip_gradients(
    module: LightningModule, optimizer: Optimizer, clip_val: float | None, algorithm: str | None
) -> None:
    """``module.clip_gradients``, except that under FSDP the root module clips by the norm over every rank's shards.

    **FSDP refuses norm clipping** (lightning 2.6.6, ``FSDPPrecision.clip_grad_by_norm``, open issue
    Lightning-AI/pytorch-lightning#19235): the precision plugin has no reference to the FSDP root, whose
    ``clip_grad_norm_`` is the only correct norm over sharded gradients, so it raises "gradient_clip_algorithm='norm'
    is currently not supported". ``test_lightning_fsdp_still_refuses_norm_clipping`` fails once it clips, and this
    function can go.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = module.trainer.strategy.model
    clips_norm = clip_val and algorithm in (None, "norm")
    if isinstance(root, FullyShardedDataParallel) and clips_norm:
        root.clip_grad_norm_(clip_val)
        return
    module.clip_gradients(optimizer, clip_val, algorithm)


def realign_logging_step(trainer: Trainer, module: LightningModule) -> None:
    """Set the logger step to the optimizer step; call on the first training batch after a checkpoint restore.

    **The logger step comes back off by one** (lightning 2.6.6, ``fit_loop.epoch_loop._batches_that_stepped``):
    resumed from a checkpoint that a validation wrote at the last batch of an epoch, Lightning restores the step
    its loggers label rows with one short (validation every ``val_check_interval`` steps and a checkpoint every
    step, as ``tests/test_resume.py`` runs) or one over (Lightning's default validation and checkpoint per epoch),
    so the resumed curves in CSV / W&B repeat or skip a step label. With one optimizer under automatic
    optimization the logger step counts optimizer steps, i.e. equals ``trainer.global_step`` at every batch start
    (Lightning's own adjustments have run by then). ``test_lightning_still_restores_the_logging_step_off_by_one``
    fails once Lightning restores it, and this function (with ``tunelab.callbacks.resume``) can go.
    """
    if module.automatic_optimization and len(trainer.optimizers) == 1:
        trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step


def validation_due(trainer: Trainer) -> bool:
    """Whether a validation runs at the end of the current training batch; ask from ``on_train_batch_end``.

    Lightning (2.6.6) has no public question for it: its epoch loop decides in ``on_advance_end`` with
    ``_TrainingEpochLoop._should_check_val_fx(data_fetcher)``, after the batch-end hooks, from state those hooks
    already see. :class:`tunelab.checkpoints.LastCheckpoint` asks, to save after that validation rather than
    before it (Lightning resumed from a checkpoint saved before a due validation skips the validation);
    ``tests/test_resume.py::test_sigkill_then_resume_ends_as_the_uninterrupted_run`` fails if the answer is wrong.
    A time-based ``val_check_interval`` is answered from the clock, as Lightning does."""
    epoch_loop = trainer.fit_loop.epoch_loop
    return bool(epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


@contextmanager
def full_state_dict(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """FSDP state dicts (model and optimizer) of ``module`` gathered whole on rank 0, offloaded to host memory
    unless ``device`` (the compute device) is the CPU.

    **Full state dicts crash CPU process groups** (lightning 2.6.6 ``_get_full_state_dict_context`` with torch 2.13.0
    FSDP): Lightning always asks for ``offload_to_cpu=True``; on a CPU compute device torch's
    ``FlatParamHandle.to_cpu`` then "moves" the gathered flat parameter to where it already is and frees it, and
    rank 0 reads the freed memory (with 2 or more ranks: a segmentation fault under ``use_orig_params=True``, as
    ``trainer=fsdp`` runs, else "out of bounds for storage of size 0"). GPUs still offload, as Lightning does.
    ``test_lightning_full_state_dict_still_crashes_a_cpu_group`` fails once that gather survives, and the strategy
    overrides that use this can go.
    """
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    offload_to_cpu = device.type != "cpu"
    with FSDP.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=offload_to_cpu, rank0_only=True),
        FullOptimStateDictConfig(offload_to_cpu=offload_to_cpu, rank0_only=True),
    ):
        yield


@contextmanager
def eager_full_checkpoints() -> Iterator[None]:
    """Make Lightning's FSDP strategy read a full checkpoint file with ``torch.load`` instead of lazily.

    **The lazy loader fails on untyped storages** (lightning 2.6.6 ``lightning.fabric.utilities.load._lazy_load``
    with torch 2.13.0): it builds ``TypedStorage(dtype=cls().dtype)`` for every storage, and torch saves a tensor
    whose dtype has no legacy typed storage (e.g. uint32: the NumPy RNG key array that
    ``tunelab.callbacks.rng`` checkpoints) with an ``UntypedStorage``, which has no ``dtype``: AttributeError.
    ``test_lightning_lazy_load_still_fails_on_untyped_storages`` fails once it loads them. The lazy loader is also
    a plain unpickler (it calls any global the file names), while the eager load here,
    :func:`tunelab.compat.torch.load_checkpoint`, refuses a file that would run code: that part stays.
    """
    from unittest import mock

    import lightning.pytorch.strategies.fsdp as lightning_fsdp

    with mock.patch.object(lightning_fsdp, "_lazy_load", load_checkpoint):
        yield


class LostRankError(TunelabError):
    """This rank's process group broke: another rank died, never joined, or a collective got no answer within the
    timeout."""


GLOO_LOST_PEER = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Timed out waiting",
    "timeout caused pair closure",
)  # how gloo (torch 2.13.0) reports a peer that is gone or silent, in plain RuntimeErrors
RENDEZVOUS_TIMED_OUT = "waiting for clients"  # the TCP store (torch 2.13.0) when a rank never joined in the timeout
EXIT_GRACE_S = 2.0  # a dying peer's exit status can trail the connection its death closed


def breaks_process_group(error: BaseException) -> bool:
    """Whether ``error`` is a collective or the rendezvous store failing for want of another rank: torch's backend
    and store errors (NCCL, the TCP store), or gloo's plain RuntimeErrors for a closed or silent peer."""
    import torch.distributed as dist

    if isinstance(error, dist.DistBackendError | dist.DistStoreError):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in GLOO_LOST_PEER)


def backend_reason(error: BaseException) -> str:
    """The backend's own words for ``error``: its first sentence, without gloo's ``[source.cc:line]`` prefix."""
    import torch.distributed as dist

    lines = str(error).strip().splitlines() or [type(error).__name__]
    sentence = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).split(". ")[0].rstrip(".")
    backend = dist.get_backend() if dist.is_initialized() else "torch.distributed"
    return f"{backend}: {sentence}"


class LostRankLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher (rank 0 starts the other local ranks as subprocesses of itself) that ends a rank
    whose process group broke with one line: :class:`LostRankError`, which names the rank, the backend's reason,
    the process-group timeout and, on rank 0, what became of each rank it started (ranks still running are killed).

    **A lost rank ends the others with the backend's raw error, or after the whole timeout** (lightning 2.6.6
    ``_SubprocessScriptLauncher`` with torch 2.13.0 gloo): rank 1 SIGKILLed mid-training, rank 0 fails in its next
    collective with gloo's RuntimeError ("Connection reset by peer", ~115 lines of stack, exit status 1); rank 1
    hung, rank 0 waits in its collective for the whole process-group timeout (Lightning's default: 30 minutes), and
    a rank still hanging when rank 0 ends is never stopped. Lightning's process observer (a thread of rank 0 that
    polls the ranks it started every 5 s and SIGKILLs every process once one exits non-zero) still runs; the ranks
    this launcher examines are taken off the list it shares with that observer first, so the observer does not
    kill rank 0 before its line is printed. ``test_lightning_launcher_still_passes_a_lost_rank_through_raw`` fails
    once Lightning reports a lost rank itself, and this class can go.
    """

    def __init__(
        self, cluster_environment: ClusterEnvironment, num_processes: int, num_nodes: int, timeout: timedelta | None
    ) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self.timeout = timeout

    def launch(self, function: Callable, *args: Any, trainer: Trainer | None = None, **kwargs: Any) -> Any:
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        except RuntimeError as error:
            if not breaks_process_group(error):
                raise
            raise LostRankError(self.lost_rank_message(error)) from error

    def lost_rank_message(self, error: BaseException) -> str:
        """One line: this rank, why its group broke, the fate of the ranks it started (rank 0), what to check."""
        timeout = (
            f"trainer.strategy.timeout_s={self.timeout.total_seconds():g}"
            if self.timeout is not None
            else "the process-group timeout"
        )
        if RENDEZVOUS_TIMED_OUT in str(error):
            what = f"not every rank joined the process group within {timeout} (slow start? raise it)"
        elif re.search("time[ds]? ?out", str(error), re.IGNORECASE):
            what = f"a collective got no answer within {timeout}"
        else:
            what = "the process group broke"
        fates = self.stop_started_ranks()
        others = "; ".join(fates) if fates else f"another rank died, or hung past {timeout}"
        return (
            f"rank {self.cluster_environment.global_rank()} stopped: {what} ({backend_reason(error)}); {others}; "
            "check the other ranks' output above"
        )

    def stop_started_ranks(self) -> list[str]:
        """What became of each rank this process started (none but on a node's rank 0), each killed if still
        running after :data:`EXIT_GRACE_S`; they are taken off Lightning's observer list first."""
        started = list(self.procs)
        self.procs.clear()  # the list Lightning's process observer polls: it now has nothing left to kill for
        first = self.cluster_environment.node_rank() * self.num_processes
        fates = []
        for local_rank, proc in enumerate(started, start=1):
            name = f"rank {first + local_rank} (pid {proc.pid})"
            try:
                code = proc.wait(timeout=EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                fates.append(f"{name} was still running (hung?) and has been killed")
                continue
            if code == -signal.SIGKILL:
                fates.append(f"{name} died of SIGKILL (out of memory? killed by the scheduler?)")
            elif code < 0:
                fates.append(f"{name} died of signal {-code} ({signal.strsignal(-code)})")
            else:
                fates.append(f"{name} exited with status {code}")
        return fates


class ReportsLostRanks:
    """Mixin for Lightning's DDP-family strategies (DDP, FSDP, DeepSpeed): every rank runs under a
    :class:`LostRankLauncher` given the strategy's process-group timeout, processes started by Lightning or not
    (torchrun, SLURM: then the launcher starts none and only reports)."""

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._launcher = LostRankLauncher(self.cluster_environment, self.num_processes, self.num_nodes, self._timeout)


class TunelabDDPStrategy(ReportsLostRanks, DDPStrategy):
    """Lightning's DDP with its default start method (rank 0 re-runs the command line for the other ranks), a lost
    rank reported by :class:`LostRankLauncher`."""


class TunelabFSDPStrategy(ReportsLostRanks, FSDPStrategy):
    """Lightning's FSDP, changed where Lightning 2.6.6 fails tunelab's runs.

    - **Later stages unwrap the root** (``FSDPStrategy._setup_model``, Lightning-AI/pytorch-lightning#19015):
      Lightning re-runs setup per stage (validate -> fit -> test) and, finding the blocks already wrapped, leaves
      the root unwrapped, its own parameters (embeddings, head) still flat shards. Here the LightningModule is
      wrapped once; later stages reuse that root.
    - **No CPU compute device** (``FSDPStrategy._setup_model``): Lightning passes the root device's CUDA index,
      ``None`` on CPU, and torch's FSDP then refuses ("FSDP needs a non-CPU accelerator device"); here it is given
      the CPU itself, so FSDP runs on gloo processes.
    - Full state dicts are gathered by :func:`full_state_dict` and full checkpoint files read by
      :func:`eager_full_checkpoints`, and a lost rank is reported by :class:`LostRankLauncher` (see those for the
      Lightning behaviour).

    ``test_lightning_fsdp_still_unwraps_the_root_at_a_later_stage`` and ``test_lightning_fsdp_still_refuses_the_cpu``
    fail once Lightning no longer does this, and the matching part can go.
    """

    _root: Any = None

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if self._root is not None and self._root.module is model:
            return self._root
        on_cpu = self.root_device.type == "cpu"
        wrapped = FSDP(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu") if on_cpu else self.root_device.index,
            **self.kwargs,
        )
        policy = self.kwargs.pop("auto_wrap_policy", None)  # applied above; Lightning warns if it sees it again
        try:
            self._root = super()._setup_model(wrapped)  # moves metrics, applies activation checkpointing
        finally:
            self.kwargs["auto_wrap_policy"] = policy
        return self._root

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        with eager_full_checkpoints():
            return super().load_checkpoint(checkpoint_path, weights_only)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        with full_state_dict(self.model, self.root_device):
            return self.model.state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # unwrap LightningOptimizer
        with full_state_dict(self.model, self.root_device):
            state = FSDP.optim_state_dict(self.model, optimizer)
        if self.global_rank == 0:
            return FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state
