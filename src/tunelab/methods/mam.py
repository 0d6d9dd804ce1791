"""MAM adapter (He et al., 2022, Towards a Unified View of Parameter-Efficient Transfer Learning).

Prefix tuning on attention plus a scaled parallel adapter on the FFN:

- attention: trainable key/value prefixes P_k, P_v (length l) at every layer: head = Attn(x W_q, [P_k; x W_k],
  [P_v; x W_v]), through peft's prefix tuning (``method.prefix_projection`` chooses the MLP
  reparameterisation);
- FFN: FFN(x) + s * U f(D x), the adapter reading the FFN *input* x in parallel (not its output).

The paper's setting is l = 30, bottleneck 512, s = 4 on 300M+ models; the default here is sized for
SmolLM2-135M. Needs a model whose FFN is one module (Llama family); peft has no parallel adapter, hence
this file (the shared branch machinery is :mod:`tunelab.methods.inhouse`).
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.methods.adapter import add_bottlenecks
from tunelab.methods.inhouse import remember_method, train_branches
from tunelab.methods.prompt_learning import adapt_prefix
from tunelab.methods.spec import METHODS, Method


def adapt_mam(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Parallel FFN adapters, then peft prefix tuning (which freezes the backbone); adapters + prefix train."""
    add_bottlenecks(model, method_cfg, "ffn", placement="parallel")
    model = adapt_prefix(model, method_cfg, tokenizer)
    train_branches(model)
    return remember_method(model, method_cfg)


METHODS.register(Method(name="mam", adapt=adapt_mam, virtual_tokens=True, sublayers=lambda method_cfg: ["ffn"]))
