"""Adapter tuning (Houlsby et al., 2019): bottleneck adapters after the attention and FFN sublayers.

After a sublayer's output projection, h <- h + s * U f(D h), with D: d -> m (m << d), f a nonlinearity,
U: m -> d; the residual makes it an identity when U D ~ 0, and D, U start near zero (N(0, 1e-2^2),
truncated) so training starts from (almost) the base model. Only the adapters train (``train_norms`` also
trains the normalisation gains, as Houlsby et al. did with layer norms). peft has no bottleneck adapter
(see :mod:`tunelab.methods.inhouse`), hence this file.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.errors import ConfigError
from tunelab.methods.inhouse import Bottleneck, attach, out_features, remember_method, sublayers
from tunelab.methods.spec import METHODS, Method

POSITIONS = ("attention_output", "ffn_output")


def add_bottlenecks(model: torch.nn.Module, method_cfg: DictConfig, role: str, **placement: Any) -> None:
    """Attach a :class:`Bottleneck` (knobs from ``method_cfg``) to every sublayer playing ``role``."""
    for _, module in sublayers(model, role):
        branch = Bottleneck(
            out_features(module),
            method_cfg.bottleneck_size,
            activation=method_cfg.activation,
            scale=method_cfg.scale,
            dropout=method_cfg.dropout,
            init_std=method_cfg.init_std,
            **placement,
        )
        attach(module, "adapter", branch)


def freeze_all_but_branches(model: torch.nn.Module, train_norms: bool = False) -> None:
    """Freeze the backbone; train the branches (and the normalisation gains, if asked)."""
    from tunelab.methods.inhouse import train_branches

    model.requires_grad_(False)
    train_branches(model)
    if train_norms:
        for name, param in model.named_parameters():
            if "norm" in name.lower():
                param.requires_grad_(True)


def adapt_adapter(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Houlsby adapters after the sublayers named in ``method.positions``; only they train."""
    for position in method_cfg.positions:
        if position not in POSITIONS:
            raise ConfigError(f"method.positions entry {position!r} is not one of {list(POSITIONS)}")
        add_bottlenecks(model, method_cfg, position)
    freeze_all_but_branches(model, method_cfg.train_norms)
    return remember_method(model, method_cfg)


def adapter_sublayers(method_cfg: DictConfig) -> list[str]:
    """The sublayers a bottleneck follows: ``method.positions``."""
    return list(method_cfg.positions)


METHODS.register(Method(name="adapter", adapt=adapt_adapter, sublayers=adapter_sublayers))
