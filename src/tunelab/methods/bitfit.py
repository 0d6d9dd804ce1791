"""BitFit (Ben Zaken et al., 2022): train only the bias terms, freeze every weight matrix.

For y = W x + b only b trains. Models whose Linear layers have no bias (Llama, Mistral, SmolLM2) would have
nothing to train; with ``missing_biases: add`` each Linear inside the transformer blocks gets a zero bias
(so the model's function is unchanged at step 0) and those train, and the config's ``attention_bias`` /
``mlp_bias`` flags are switched on so the result saves and reloads as a plain transformers model.
``missing_biases: fail`` refuses instead. ``train_norms`` also trains the normalisation gains (a common
variant for bias-free models). No library implements this (peft has no BitFit), hence this file.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.errors import ConfigError
from tunelab.methods.spec import METHODS, Method

MISSING_BIASES = ("add", "fail")
CONFIG_FLAGS = {"self_attn": "attention_bias", "mlp": "mlp_bias"}


def block_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """Linear layers inside the transformer blocks (the LM head and embeddings excluded)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head and ".layers." in f".{name}"
    ]


def add_zero_biases(model: torch.nn.Module, linears: list[tuple[str, torch.nn.Linear]]) -> int:
    """Give every bias-free Linear a zero bias; set the matching config flags. Returns how many were added."""
    added = 0
    for name, linear in linears:
        if linear.bias is None:
            linear.bias = torch.nn.Parameter(
                torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
            )
            added += 1
            for part, flag in CONFIG_FLAGS.items():
                if f".{part}." in f".{name}." and hasattr(model.config, flag):
                    setattr(model.config, flag, True)
    return added


def adapt_bitfit(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Freeze everything but biases (adding zero biases where the model has none, if allowed)."""
    if method_cfg.missing_biases not in MISSING_BIASES:
        raise ConfigError(f"method.missing_biases={method_cfg.missing_biases!r} is not one of {list(MISSING_BIASES)}")
    linears = block_linears(model)
    if any(linear.bias is None for _, linear in linears):
        if method_cfg.missing_biases == "fail":
            raise ConfigError(
                f"method=bitfit: {type(model).__name__} has Linear layers without bias terms; set "
                "method.missing_biases=add to give them zero-initialised trainable biases"
            )
        print(f"[tunelab] bitfit: added zero-initialised biases to {add_zero_biases(model, linears)} Linear layers")
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        is_norm_gain = method_cfg.train_norms and "norm" in name.lower()
        if name.endswith(".bias") or is_norm_gain:
            param.requires_grad_(True)
    return model


METHODS.register(Method(name="bitfit", adapt=adapt_bitfit, trains_base_in_place=True))
