"""LoRA (Hu et al., 2021) through peft.

A frozen weight W (d_out x d_in) gets a low-rank update: h = W x + (alpha / r) * B A x, with
A (r x d_in, Kaiming init) and B (d_out x r, zero init) trained, so the adapted model starts equal to the
base model. With ``use_rslora`` the scale is alpha / sqrt(r). Merging folds B A into W.

Mixture-of-experts models whose experts are fused parameters (one (E, d_out, d_in) tensor per projection, e.g.
Qwen3-MoE's ``mlp.experts.gate_up_proj``) rather than Linear layers are reached through ``target_parameters``
(peft's ``ParamWrapper``): each expert e gets its own rank-r pair, W_e + (alpha / r) B_e A_e, with peft storing
A as one (E r x d_in) and B as one (d_out x r E) matrix (A_e = A.reshape(E, r, d_in)[e], B_e = B.reshape(d_out,
r, E)[:, :, e]). peft adds the delta to the parameter for each forward, so it cannot drop out the branch input:
``target_parameters`` needs ``dropout=0``.

``method.init`` picks peft's initialisation of A, B (``init_lora_weights``); each keeps the adapted model equal
to the base at step 0: ``gaussian`` (A ~ N(0, 1/r^2), B = 0); ``pissa`` / ``pissa_niter_<N>`` (PiSSA, Meng et al.
2024: A, B from the top-r singular triplets of W, exact or N subspace iterations, and W becomes the residual
W - s B A); ``olora`` (OLoRA, Buyukakyuz 2024: B A from the QR factors of W, W the residual); ``eva`` (EVA,
Paischer et al. 2024: A = the top right singular vectors of the layer inputs on ``method.eva_batches`` training
batches, ranks redistributed by explained variance up to ``eva_rho * r``; B = 0; :func:`eva_from_data`);
``loftq`` (LoftQ, Li et al. 2023: W becomes its 4-bit quantization Q and B A the best rank-r fit of W - Q; peft
computes it on CUDA only).

LoRA+ (Hayou et al. 2024): with ``method.lora_plus_ratio`` the B matrices train at ``lr * ratio`` (A at ``lr``),
as does DoRA's magnitude vector (peft's ``create_loraplus_optimizer`` also puts 1-d adapter tensors with B):
:func:`lora_plus_scale`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.errors import ConfigError
from tunelab.methods.peft_task import inject_peft, module_names
from tunelab.methods.spec import METHODS, Method
from tunelab.trainer_config import strategy_name


def check_rank(method_cfg: DictConfig) -> None:
    """``method.r``: a whole rank >= 1."""
    r = method_cfg.r
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise ConfigError(
            f"method.r={r} must be a whole rank >= 1 (B A has r columns); set method.r=8 or another positive integer"
        )


def check_parameter_dropout(method_cfg: DictConfig) -> None:
    """``method.target_parameters`` (LoRA on a parameter) needs ``method.dropout=0`` (peft's ``ParamWrapper``)."""
    if method_cfg.get("target_parameters") and method_cfg.dropout:
        raise ConfigError(
            f"method.dropout={method_cfg.dropout} cannot apply to method.target_parameters (peft adds LoRA to a "
            "parameter, with no branch input to drop out); set method.dropout=0 (or model.lora_dropout=0)"
        )


def check_parameter_strategy(cfg: DictConfig) -> None:
    """``method.target_parameters`` cannot run under FSDP: peft parametrizes the targeted tensor of its module for
    each forward, and FSDP has put its own attribute of that name there (measured with the locked torch 2.13 /
    peft 0.21.2: "Module already has an attribute named 'down_proj'"); DDP and DeepSpeed ZeRO-2 / ZeRO-3 run."""
    if cfg.method.get("target_parameters") and "fsdp" in strategy_name(cfg.trainer.get("strategy", "auto")):
        raise ConfigError(
            "method.target_parameters (LoRA on fused expert tensors) cannot run with trainer=fsdp, whose sharded "
            "parameters peft cannot parametrize; use trainer=deepspeed_zero3 (or deepspeed_zero2 / ddp)"
        )


INITS = ("default", "gaussian", "pissa", "pissa_niter_<N>", "olora", "eva", "loftq")
LORA_PLUS_GROUP = ("lora_B", "lora_magnitude_vector")  # the tensors LoRA+ trains at lr * ratio


def init_lora_weights(method_cfg: DictConfig) -> bool | str:
    """peft's ``init_lora_weights`` for ``method.init`` (``default`` is peft's Kaiming A / zero B: ``True``)."""
    init = method_cfg.init
    niter = str(init).removeprefix("pissa_niter_")
    pissa_niter = str(init).startswith("pissa_niter_") and niter.isdigit() and int(niter) >= 1
    if not (isinstance(init, str) and (init in INITS or pissa_niter)):
        raise ConfigError(f"method.init={init!r} is not one of {list(INITS)}: set method.init to one of them")
    return True if init == "default" else init


def check_init(method_cfg: DictConfig) -> None:
    """``method.init`` is known; ``loftq`` needs CUDA (peft quantizes W on it); ``method.lora_plus_ratio`` > 0."""
    init = init_lora_weights(method_cfg)
    if init == "loftq" and not torch.cuda.is_available():
        raise ConfigError("method.init=loftq needs a CUDA GPU (peft computes LoftQ there): use another method.init")
    ratio = method_cfg.lora_plus_ratio
    if ratio is not None and not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0):
        raise ConfigError(f"method.lora_plus_ratio={ratio} must be a positive number (B's lr / A's lr) or null")


def check_method_rank(cfg: DictConfig, head: str) -> None:
    """The config check of a rank-r peft method with no LoRA-specific knobs (vera, loha, lokr): :func:`check_rank`."""
    check_rank(cfg.method)


def check_lora(cfg: DictConfig, head: str) -> None:
    """The lora entry's config check (before weights load): :func:`check_rank`, :func:`check_init`,
    :func:`check_parameter_dropout`, :func:`check_parameter_strategy`."""
    check_rank(cfg.method)
    check_init(cfg.method)
    check_parameter_dropout(cfg.method)
    check_parameter_strategy(cfg)


def lora_plus_scale(method_cfg: DictConfig, param_name: str) -> float:
    """LoRA+: ``lora_plus_ratio`` for B (and DoRA's magnitude) when set, else 1."""
    ratio = method_cfg.lora_plus_ratio
    if ratio is None or not set(param_name.split(".")) & set(LORA_PLUS_GROUP):
        return 1.0
    return float(ratio)


def eva_from_data(model: torch.nn.Module, method_cfg: DictConfig, datamodule: Any) -> None:
    """With ``method.init=eva``: peft's ``initialize_lora_eva_weights`` over the first ``method.eva_batches``
    training batches (in order; their ``input_ids`` / ``attention_mask``, padding left out of the SVD; peft cycles
    them until the components converge), through :func:`backbone_forward`."""
    from itertools import islice

    from peft.tuners.lora import initialize_lora_eva_weights

    if method_cfg.init != "eva":
        return
    datamodule.prepare_data()
    datamodule.setup("fit")
    batches = list(islice(datamodule.ordered_loader("train"), method_cfg.eva_batches))
    if not all(isinstance(b, dict) and "input_ids" in b for b in batches):
        raise ConfigError("method.init=eva needs token batches (input_ids) of training data: use another method.init")
    inputs = [{key: b[key] for key in ("input_ids", "attention_mask") if key in b} for b in batches]
    initialize_lora_eva_weights(model, inputs, forward_fn=backbone_forward, show_progress_bar=False)


def backbone_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """The transformers backbone of a peft model on ``inputs``: the target layers see the same inputs as in the
    whole model, without the head's (vocabulary-wide) logits."""
    return model.get_base_model().base_model(**inputs)


def check_target_parameters(model: torch.nn.Module, method_cfg: DictConfig) -> None:
    """Every name of ``method.target_parameters`` names a parameter of ``model`` (peft matches ``name`` or a dotted
    suffix ``.name``, as for modules); the refusal names the missing names and a few of the model's 3-D (fused
    expert) parameter names."""
    names = [name for name, _ in model.named_parameters()]
    missing = [
        t for t in method_cfg.get("target_parameters") or [] if not any(n == t or n.endswith(f".{t}") for n in names)
    ]
    if missing:
        fused = sorted({re.split(r"\.\d+\.", name)[-1] for name, p in model.named_parameters() if p.dim() == 3})
        fix = f"its 3-D (fused expert) parameters are named {fused[:12]}: set method.target_parameters to some of them"
        raise ConfigError(
            f"method.target_parameters names {missing}, which match no parameter of {type(model).__name__}; "
            + (fix if fused else "it has no fused expert parameters: set method.target_parameters=[]")
        )


def lora_config(method_cfg: DictConfig, task_type: str):
    """The peft ``LoraConfig`` for a ``configs/method/lora.yaml``-shaped config (its rank checked again);
    ``target_parameters`` goes to peft only when non-empty."""
    from peft import EvaConfig, LoftQConfig, LoraConfig

    check_rank(method_cfg)
    check_parameter_dropout(method_cfg)
    init = init_lora_weights(method_cfg)
    return LoraConfig(
        task_type=task_type,
        r=method_cfg.r,
        lora_alpha=method_cfg.alpha,
        lora_dropout=method_cfg.dropout,
        target_modules=module_names(method_cfg.target_modules),
        bias=method_cfg.bias,
        use_rslora=method_cfg.use_rslora,
        target_parameters=module_names(method_cfg.get("target_parameters") or []) or None,
        use_dora=method_cfg.use_dora,
        init_lora_weights=init,
        eva_config=EvaConfig(rho=method_cfg.eva_rho) if init == "eva" else None,
        loftq_config=LoftQConfig() if init == "loftq" else {},
    )


def adapt_lora(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Freeze ``model`` and inject LoRA adapters into ``method_cfg.target_modules`` and ``target_parameters``
    (each name checked: :func:`check_target_modules`, :func:`check_target_parameters`)."""
    check_target_parameters(model, method_cfg)
    return inject_peft(model, method_cfg, lora_config)


LORA = METHODS.register(
    Method(name="lora", adapt=adapt_lora, check=check_lora, init_from_data=eva_from_data, lr_scale=lora_plus_scale)
)
