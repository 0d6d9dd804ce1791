"""UniPELT (Mao et al., 2022): LoRA, prefix tuning and adapters in one model, each behind a learned gate.

Per layer, with sigma the logistic function and gates learned with everything else:

- gated LoRA on the query and value projections: W x + g_L (alpha / r) B A x, g_L = sigma(w_L^T x + b_L)
  per token (x: the projection's input);
- gated adapter after the FFN: h + g_A U f(D h), g_A = sigma(w_A^T h + b_A) per token;
- gated prefix: peft prefix tuning, with the value prefixes of layer i scaled by g_P,i = sigma(c_i).

One deviation from the paper: there g_P is computed from the layer input; peft builds the prefixes once per
batch before the backbone runs, so here the prefix gate is a learned per-layer scalar (starting at 0.5,
like the paper's gates at init). peft has none of the gates, hence this file.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from tunelab.methods.adapter import add_bottlenecks
from tunelab.methods.inhouse import LowRank, attach, remember_method, sublayers, train_branches
from tunelab.methods.prompt_learning import adapt_prefix
from tunelab.methods.spec import METHODS, Method


class PrefixGate(nn.Module):
    """Scales layer i's value prefix by sigma(c_i) in the output of peft's prefix encoder.

    peft lays the encoder output out as [..., num_layers, (key, value), token_dim] in its last dimension.
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_layers))

    def factors(self) -> torch.Tensor:
        ones = torch.ones_like(self.logits)
        return torch.stack([ones, torch.sigmoid(self.logits)], dim=-1)  # [num_layers, 2]


def _gate_prefix(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    factors = module.gate.factors().to(output.dtype)
    shaped = output.unflatten(-1, (*factors.shape, -1))
    return (shaped * factors[..., None]).flatten(-3)


def add_gated_lora(model: nn.Module, method_cfg: DictConfig) -> None:
    for role in ("query", "value"):
        for _, linear in sublayers(model, role):
            branch = LowRank(
                linear.in_features,
                linear.out_features,
                method_cfg.lora_r,
                alpha=method_cfg.lora_alpha,
                dropout=method_cfg.lora_dropout,
                gated=True,
            )
            attach(linear, "lora", branch)


def adapt_unipelt(model: nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> nn.Module:
    """Gated LoRA (query, value) + gated FFN adapters + gated peft prefix; only these and their gates train."""
    add_gated_lora(model, method_cfg)
    add_bottlenecks(model, method_cfg, "ffn_output", gated=True)
    model = adapt_prefix(model, method_cfg, tokenizer)
    encoder = model.prompt_encoder["default"]
    encoder.add_module("gate", PrefixGate(model.peft_config["default"].num_layers))
    encoder.register_forward_hook(_gate_prefix)
    train_branches(model)
    encoder.gate.requires_grad_(True)
    return remember_method(model, method_cfg)


METHODS.register(
    Method(
        name="unipelt",
        adapt=adapt_unipelt,
        virtual_tokens=True,
        sublayers=lambda method_cfg: ["query", "value", "ffn_output"],
    )
)
