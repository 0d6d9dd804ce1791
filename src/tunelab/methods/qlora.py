"""QLoRA (Dettmers et al., 2023): LoRA on a frozen base whose Linear weights are stored in 4 bits.

The base is loaded through bitsandbytes: each block Linear weight W is stored as NF4 (or FP4) codes with one
absmax scale per 64 weights (double quantization also quantizes those scales); the forward dequantizes
to ``compute_dtype`` on the fly: h = dequant(W) x + (alpha / r) B A x, and only A, B train (in full
precision). Merging folds B A into a *dequantized* copy of W, so the merged model is a plain full-precision
transformers model whose logits differ from the 4-bit adapter model's by the dequantization rounding
(measured in tests/test_qlora.py). peft + bitsandbytes do the work; this file configures and guards them.

CPU trap (CPUs with avx512_bf16): after an evaluation pass bitsandbytes stops gradients through its 4-bit
layers (:func:`tunelab.compat.bitsandbytes.disable_cpu_repacking` names the versions).
:func:`keep_cpu_kernels_trainable` switches that off on every 4-bit layer; the model loader calls it on every
quantized load, :func:`adapt_qlora` again on the model it is given.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.errors import ConfigError
from tunelab.methods.lora import check_init, check_rank, lora_config, lora_plus_scale
from tunelab.methods.peft_task import check_target_modules, peft_task_type
from tunelab.methods.spec import METHODS, Method
from tunelab.models.loading import keep_cpu_kernels_trainable
from tunelab.trainer_config import shards_parameters

QUANT_TYPES = ("nf4", "fp4")
QUANT_STORAGE = ("uint8", "float32", "bfloat16", "float16")
QLORA_INITS = ("default", "gaussian")  # pissa / olora / eva / loftq read or rewrite W in full precision


def qlora_quantization_config(method_cfg: DictConfig) -> Any:
    """The transformers ``BitsAndBytesConfig`` for 4-bit loading, from ``configs/method/qlora.yaml``."""
    from transformers import BitsAndBytesConfig

    from tunelab.models.loading import torch_dtype

    if method_cfg.quant_type not in QUANT_TYPES:
        raise ConfigError(f"method.quant_type={method_cfg.quant_type!r} is not one of {list(QUANT_TYPES)}")
    if method_cfg.quant_storage not in QUANT_STORAGE:
        raise ConfigError(f"method.quant_storage={method_cfg.quant_storage!r} is not one of {list(QUANT_STORAGE)}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method_cfg.quant_type,
        bnb_4bit_use_double_quant=method_cfg.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(method_cfg.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, method_cfg.quant_storage),
    )


def adapt_qlora(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """LoRA on a model loaded in 4 bits (``build_components`` loads it with :func:`qlora_quantization_config`)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if not keep_cpu_kernels_trainable(model):
        raise ConfigError(
            f"method=qlora: {type(model).__name__} has no 4-bit Linear layers; it must be loaded with the qlora "
            "quantization config and have nn.Linear layers for bitsandbytes to quantize"
        )
    check_target_modules(model, method_cfg)
    checkpointing = bool(getattr(model, "is_activation_checkpointing", False))
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    try:
        return get_peft_model(model, lora_config(method_cfg, peft_task_type(model)))
    except ValueError as error:
        raise ConfigError(f"method=qlora: {error}") from error


def dense_copy(quantized: torch.nn.Module, weight: torch.Tensor) -> torch.nn.Linear:
    """A plain Linear with ``weight`` and the 4-bit layer's bias."""
    linear = torch.nn.Linear(quantized.in_features, quantized.out_features, bias=quantized.bias is not None)
    linear.to(dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if quantized.bias is not None:
            linear.bias.copy_(quantized.bias)
    return linear


def dequantized_weight(quantized: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(quantized.weight, quantized.weight.quant_state).to(dtype)


def merge_dequantized(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A plain ``dtype`` transformers model: W = dequant(W_4bit) + delta_LoRA; ``model`` is left as it was."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    base = copy.deepcopy(model).get_base_model()
    for name, module in list(base.named_modules()):
        if isinstance(module, LoraLayer):
            quantized = module.get_base_layer()
            weight = dequantized_weight(quantized, dtype)
            for adapter in module.active_adapters:
                weight = weight + module.get_delta_weight(adapter).to(dtype)
            base.set_submodule(name, dense_copy(quantized, weight))
    for name, module in list(base.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            base.set_submodule(name, dense_copy(module, dequantized_weight(module, dtype)))
    base.hf_quantizer.remove_quantization_config(base)
    return base.to(dtype)


def check_qlora(cfg: DictConfig, head: str) -> None:
    """LoRA's rank and init knobs, where ``method.init`` is one of :data:`QLORA_INITS` (PiSSA / OLoRA rewrite W
    as a full-precision residual, EVA and LoftQ are for full-precision bases; ``use_dora`` and
    ``lora_plus_ratio`` work on 4 bits), and: sharded strategies flatten parameters in one float dtype, so the
    4-bit storage must be that dtype."""
    check_rank(cfg.method)
    check_init(cfg.method)
    if cfg.method.init not in QLORA_INITS:
        raise ConfigError(
            f"method=qlora supports method.init in {list(QLORA_INITS)} (a 4-bit W cannot take "
            f"{cfg.method.init}'s full-precision rewrite or reading): use method=lora for method.init={cfg.method.init}"
        )
    if shards_parameters(cfg.trainer) and cfg.method.quant_storage == "uint8":
        raise ConfigError(
            "method=qlora with a sharded strategy (FSDP / ZeRO-3) needs 4-bit weights stored in the float dtype "
            "the shards are flattened in: set method.quant_storage=bfloat16 (or the model dtype)"
        )


METHODS.register(
    Method(
        name="qlora",
        adapt=adapt_qlora,
        quantization=qlora_quantization_config,
        check=check_qlora,
        lr_scale=lora_plus_scale,
    )
)
