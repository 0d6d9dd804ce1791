"""AdaLoRA (Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning") through peft.

Each target weight gets an update in SVD form, Delta W = (alpha / r_k) * P Lambda Q, with P (d_out x r),
Q (r x d_in) and the diagonal Lambda (r entries, starting at 0, so training starts at the base model) trained,
r = ``init_r``. After each optimizer step the rank allocator scores every triplet (P column, Lambda entry, Q row)
by the smoothed sensitivity |w * grad| times its uncertainty (EMAs with ``beta1``, ``beta2``) and zeroes the
lowest Lambda entries so the total rank follows a cubic budget from ``init_r`` to ``target_r`` per layer: held
for ``tinit`` steps, lowered every ``deltaT`` steps, fixed (the mask kept) for the last ``tfinal`` steps. The loss
gains ``orth_reg_weight`` times the mean over P and Q of ||P^T P - I||_F, ||Q Q^T - I||_F.

tunelab wires it through :attr:`Method.callbacks`: :class:`AdaLoraAllocation` sets peft's ``total_step`` to the
run's optimizer steps (``TaskModule.total_training_steps``, counted under gradient accumulation), calls peft's
``update_and_allocate`` once per optimizer step, adds the regulariser's gradient (peft adds the term only to a
loss the model computes from ``labels``, and tunelab's tasks compute their losses themselves), and checkpoints the
allocator's state so a resumed run allocates as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback
from omegaconf import DictConfig

from tunelab.errors import ConfigError
from tunelab.methods.peft_task import inject_peft, module_names
from tunelab.methods.spec import METHODS, Method
from tunelab.trainer_config import strategy_name

ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def check_adalora(cfg: DictConfig, head: str) -> None:
    """Ranks 1 <= ``target_r`` <= ``init_r``, EMA factors in (0, 1), ``deltaT`` >= 1, ``orth_reg_weight`` >= 0;
    not under DeepSpeed or FSDP: :class:`AdaLoraAllocation` reads every P and Q whole, with its gradient in
    ``p.grad``, after the optimizer step (peft 0.21.2's rank allocator; its DeepSpeed branch needs transformers'
    ``HfDeepSpeedConfig``, which Lightning does not set). ZeRO keeps gradients in its own partitioned buffers,
    ZeRO-3 and FSDP shard the parameters themselves (measured: ZeRO-3 fails in the orthogonality term)."""
    method = cfg.method
    strategy = strategy_name(cfg.trainer.get("strategy", "auto"))
    if "deepspeed" in strategy or "fsdp" in strategy:
        raise ConfigError(
            f"method=adalora cannot run under trainer.strategy={strategy}: its rank allocator reads each adapter "
            "weight and its gradient whole after every optimizer step, and DeepSpeed / FSDP partition them; use "
            "trainer=ddp (or one device)"
        )
    if not (isinstance(method.init_r, int) and not isinstance(method.init_r, bool) and method.init_r >= 1):
        raise ConfigError(
            f"method.init_r={method.init_r} must be a whole rank >= 1 (P Lambda Q starts with init_r triplets); "
            "set method.init_r=12 or another positive integer"
        )
    if not (isinstance(method.target_r, int) and 1 <= method.target_r <= method.init_r):
        raise ConfigError(
            f"method.target_r={method.target_r} must be a whole rank in [1, method.init_r={method.init_r}]; "
            "set method.target_r to at most method.init_r"
        )
    for beta in ("beta1", "beta2"):
        if not 0 < method[beta] < 1:
            raise ConfigError(f"method.{beta}={method[beta]} must lie in (0, 1); set method.{beta}=0.85")
    if not (isinstance(method.deltaT, int) and method.deltaT >= 1):
        raise ConfigError(f"method.deltaT={method.deltaT} must be a whole number of steps >= 1; set method.deltaT=1")
    if method.orth_reg_weight < 0:
        raise ConfigError(
            f"method.orth_reg_weight={method.orth_reg_weight} must be >= 0; set method.orth_reg_weight=0.5"
        )


def adalora_config(method_cfg: DictConfig, task_type: str):
    """The peft ``AdaLoraConfig`` of a ``configs/method/adalora.yaml``-shaped config. peft wants ``total_step``
    now, before the run's length is known: it gets the smallest schedule-consistent value, ``tinit + tfinal + 1``,
    which :class:`AdaLoraAllocation` replaces by the run's optimizer steps when fit starts."""
    from peft import AdaLoraConfig

    return AdaLoraConfig(
        task_type=task_type,
        init_r=method_cfg.init_r,
        target_r=method_cfg.target_r,
        lora_alpha=method_cfg.alpha,
        lora_dropout=method_cfg.dropout,
        target_modules=module_names(method_cfg.target_modules),
        tinit=method_cfg.tinit,
        tfinal=method_cfg.tfinal,
        deltaT=method_cfg.deltaT,
        beta1=method_cfg.beta1,
        beta2=method_cfg.beta2,
        orth_reg_weight=method_cfg.orth_reg_weight,
        total_step=method_cfg.tinit + method_cfg.tfinal + 1,
    )


def adapt_adalora(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Freeze ``model`` and add AdaLoRA's SVD-form updates to ``method_cfg.target_modules``."""
    return inject_peft(model, method_cfg, adalora_config)


def orthogonality_penalty(tuner: Any) -> torch.Tensor:
    """peft's AdaLoRA regulariser (``AdaLoraModel.forward``): the mean over the trained P (``lora_B``) and Q
    (``lora_A``) of ||P^T P - I||_F and ||Q Q^T - I||_F."""
    name = tuner.trainable_adapter_name
    terms = []
    for key, p in tuner.model.named_parameters():
        if ("lora_A" in key or "lora_B" in key) and name in key:
            gram = p @ p.T if "lora_A" in key else p.T @ p
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=p.dtype, device=p.device)))
    return torch.stack(terms).mean()


class AdaLoraAllocation(Callback):
    """Drives AdaLoRA's rank allocation in a Lightning fit (``pl_module.model``: the peft-wrapped model).

    - fit start: peft's ``total_step`` = ``pl_module.total_training_steps()``; a schedule with no budgeting phase
      (``tinit >= total - tfinal``) is a ConfigError
    - before each optimizer step (gradients unscaled, before clipping): adds ``orth_reg_weight`` times the
      regulariser's gradient. The parameters do not change inside an accumulation window, so this equals adding
      the term to every micro-batch loss (Lightning divides each by the accumulation count). The logged
      ``train/loss`` is the task loss without it.
    - after each optimizer step (gradients still held: Lightning zeroes them before the next backward):
      ``update_and_allocate(trainer.global_step)``, the count of optimizer steps taken, once per step and never
      per micro-batch
    - checkpoints: the allocator's sensitivity EMAs and the rank pattern (the zeroed Lambda entries are in the
      trained tensors), restored on resume
    """

    def __init__(self) -> None:
        self.tuner: Any = None
        self.restored: dict[str, Any] | None = None
        self.allocated_at = 0

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.tuner = pl_module.model.base_model
        config = self.tuner.peft_config[self.tuner.trainable_adapter_name]
        total = pl_module.total_training_steps()
        if config.tinit >= total - config.tfinal:
            raise ConfigError(
                f"method.tinit={config.tinit} and method.tfinal={config.tfinal} leave no rank-budgeting step in "
                f"this run's {total} optimizer steps; set them so that tinit + tfinal < {total}"
            )
        self.tuner.rankallocator.set_total_step(total)
        if self.restored is not None:
            self.restore(self.restored, pl_module.device)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.allocated_at = trainer.global_step

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        weight = self.tuner.peft_config[self.tuner.trainable_adapter_name].orth_reg_weight
        if weight == 0:
            return
        params = [
            p
            for key, p in self.tuner.model.named_parameters()
            if ("lora_A" in key or "lora_B" in key) and self.tuner.trainable_adapter_name in key
        ]
        with torch.enable_grad():
            grads = torch.autograd.grad(weight * orthogonality_penalty(self.tuner), params)
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad if p.grad is None else p.grad + grad

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.allocated_at:
            return
        self.allocated_at = trainer.global_step
        self.tuner.update_and_allocate(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        if self.tuner is None:
            return {}
        allocator = self.tuner.rankallocator
        state = {key: dict(getattr(allocator, key)) for key in ALLOCATOR_STATE}
        return state | {"rank_pattern": allocator.peft_config.rank_pattern}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored = state_dict or None
        if self.tuner is not None and self.restored is not None:
            self.restore(self.restored, next(self.tuner.parameters()).device)

    def restore(self, state: dict[str, Any], device: torch.device) -> None:
        allocator = self.tuner.rankallocator
        for key in ALLOCATOR_STATE:
            setattr(allocator, key, {name: tensor.to(device) for name, tensor in state[key].items()})
        allocator.peft_config.rank_pattern = state["rank_pattern"]
        self.restored = None


METHODS.register(
    Method(
        name="adalora",
        adapt=adapt_adalora,
        check=check_adalora,
        callbacks=lambda method_cfg: [AdaLoraAllocation()],
    )
)
