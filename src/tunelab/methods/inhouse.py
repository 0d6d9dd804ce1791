"""Machinery shared by the methods we implement ourselves (adapter, mam, unipelt).

peft 0.21 has no Houlsby bottleneck adapter, no parallel adapter and no gated (UniPELT) branches, so these
are written here; peft's prefix tuning is reused where a method includes a prefix (mam, unipelt).

A *branch* is a small trainable module attached as a child of the frozen module it adapts (so its
parameters are named ``<module path>.<kind>.*`` and move, save and shard with the model). A forward hook
adds its output to the module's output:

- sequential: ``y = f(x) + branch(f(x))``  (Houlsby adapter after a sublayer)
- parallel:   ``y = f(x) + branch(x)``     (LoRA, the parallel adapter of He et al., 2022)

A gated branch (UniPELT) multiplies its output by ``g = sigmoid(w^T z + b)``, one scalar per token, where
``z`` is the branch input. :func:`adapters_disabled` switches every branch (and a peft prefix) off, which
restores the base model exactly. Only the trained tensors are saved, next to the method config that
rebuilds their modules on a fresh base model (:func:`save_inhouse`, :func:`load_inhouse`).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tunelab.compat.peft import disable_adapter
from tunelab.errors import ConfigError

WEIGHTS_FILE = "tunelab_adapter.safetensors"
METHOD_FILE = "tunelab_method.yaml"
PLACEMENTS = ("sequential", "parallel")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

# Where the sublayers of each model family live (module names matched at the end of the full name).
SUBLAYERS: dict[str, dict[str, str]] = {
    "llama": {
        "attention_output": r"self_attn\.o_proj",
        "ffn": r"layers\.\d+\.mlp",
        "ffn_output": r"mlp\.down_proj",
        "query": r"self_attn\.q_proj",
        "value": r"self_attn\.v_proj",
    },
    "bert": {
        "attention_output": r"attention\.output\.dense",
        "ffn_output": r"layer\.\d+\.output\.dense",
        "query": r"attention\.self\.query",
        "value": r"attention\.self\.value",
    },
}
SUBLAYERS.update({family: SUBLAYERS["llama"] for family in ("mistral", "qwen2", "qwen3", "gemma", "phi3")})


class Branch(nn.Module):
    """Base of every in-house branch: a placement, an on/off switch and an optional per-token gate."""

    def __init__(self, in_features: int, placement: str, gated: bool) -> None:
        super().__init__()
        if placement not in PLACEMENTS:
            raise ConfigError(f"branch placement {placement!r} is not one of {list(PLACEMENTS)}")
        self.placement = placement
        self.enabled = True
        self.gate = nn.Linear(in_features, 1) if gated else None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.delta(x)
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x)) * out
        return out


class Bottleneck(Branch):
    """Adapter: ``scale * up(act(down(dropout(x))))``; near-identity init (N(0, init_std), zero biases)."""

    def __init__(
        self,
        features: int,
        size: int,
        *,
        activation: str = "relu",
        scale: float = 1.0,
        dropout: float = 0.0,
        init_std: float = 1e-2,
        placement: str = "sequential",
        gated: bool = False,
    ) -> None:
        super().__init__(features, placement, gated)
        if size < 1:
            raise ConfigError(f"adapter bottleneck size must be >= 1, got {size}")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"adapter activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        self.down, self.up = nn.Linear(features, size), nn.Linear(size, features)
        self.act, self.dropout, self.scale = ACTIVATIONS[activation](), nn.Dropout(dropout), scale
        for layer in (self.down, self.up):
            nn.init.trunc_normal_(layer.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            nn.init.zeros_(layer.bias)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.act(self.down(self.dropout(x))))


class LowRank(Branch):
    """LoRA: ``(alpha / r) * B A dropout(x)``, A Kaiming-uniform, B zero (the branch starts at 0)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        *,
        alpha: float,
        dropout: float = 0.0,
        gated: bool = False,
    ) -> None:
        super().__init__(in_features, "parallel", gated)
        if r < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {r}")
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.dropout, self.scaling = nn.Dropout(dropout), alpha / r
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5)
        nn.init.zeros_(self.lora_B.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.lora_B(self.lora_A(self.dropout(x)))


def _add_branch_output(kind: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
    branch: Branch = getattr(module, kind)
    if not branch.enabled:
        return output
    source = inputs[0] if branch.placement == "parallel" else output
    return output + branch(source.to(branch_dtype(branch))).to(output.dtype)


def branch_dtype(branch: Branch) -> torch.dtype:
    return next(branch.parameters()).dtype


def attach(module: nn.Module, kind: str, branch: Branch) -> None:
    """Make ``branch`` a child of ``module`` named ``kind`` and add its output in a forward hook."""
    if hasattr(module, kind):
        raise ConfigError(f"{type(module).__name__} already has a '{kind}' branch")
    reference = next(module.parameters(), None)
    if reference is not None:
        float_dtype = reference.dtype if reference.dtype.is_floating_point else torch.float32
        branch.to(device=reference.device, dtype=float_dtype)
    module.add_module(kind, branch)
    module.register_forward_hook(functools.partial(_add_branch_output, kind))


def check_family_supports(method_name: str, model_type: str, roles: list[str]) -> None:
    """Refuse, before any weights load, a method whose sublayer roles this model family lacks."""
    if model_type not in SUBLAYERS:
        raise ConfigError(
            f"method={method_name} knows the sublayers of model types {sorted(SUBLAYERS)}, not {model_type!r}; "
            "use method=lora or method=ia3 for this model"
        )
    for role in roles:
        if role not in SUBLAYERS[model_type]:
            able = sorted(family for family, table in SUBLAYERS.items() if role in table)
            raise ConfigError(
                f"method={method_name} adapts the '{role}' sublayer, which model_type={model_type!r} does not have "
                f"as one module (model types that do: {able})"
            )


def sublayers(model: nn.Module, role: str) -> list[tuple[str, nn.Module]]:
    """Modules playing ``role`` (e.g. ``ffn_output``) in every block, by name pattern of the model family."""
    pattern = SUBLAYERS[model.config.model_type][role]  # apply_method checked both with check_family_supports
    regex = re.compile(rf"(^|\.){pattern}$")
    found = [(name, module) for name, module in model.named_modules() if regex.search(name)]
    if not found:
        raise ConfigError(f"no '{role}' modules matching {pattern!r} in {type(model).__name__}")
    return found


def out_features(module: nn.Module) -> int:
    """Width of a sublayer's output: a Linear's ``out_features`` or an MLP's down projection."""
    if isinstance(module, nn.Linear) or hasattr(module, "out_features"):
        return int(module.out_features)
    return int(module.down_proj.out_features)


def in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear) or hasattr(module, "in_features"):
        return int(module.in_features)
    return int(module.gate_proj.in_features)


def branches(model: nn.Module) -> Iterator[Branch]:
    return (module for module in model.modules() if isinstance(module, Branch))


def train_branches(model: nn.Module) -> None:
    """Unfreeze every branch (a peft wrapper freezes all non-peft parameters)."""
    for branch in branches(model):
        branch.requires_grad_(True)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: switch off every in-house branch and, for a peft model, peft's adapter."""
    switched = [branch for branch in branches(model) if branch.enabled]
    for branch in switched:
        branch.enabled = False
    try:
        with disable_adapter(model):
            yield model
    finally:
        for branch in switched:
            branch.enabled = True


def remember_method(model: nn.Module, method_cfg: DictConfig) -> nn.Module:
    """Record the method config on the model, so :func:`save_inhouse` can write it with the weights."""
    model.tunelab_method = OmegaConf.to_container(method_cfg, resolve=True)
    return model


def is_inhouse(model: nn.Module) -> bool:
    return hasattr(model, "tunelab_method")


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter the method trains (branches, peft prefix, gates, ...), by name in ``model``."""
    return {name: param.detach().contiguous() for name, param in model.named_parameters() if param.requires_grad}


def save_inhouse(model: nn.Module, directory: Path, state: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the trained tensors (from ``state`` when given: a sharded model's gathered tensors) and the method
    config that rebuilds their modules to ``directory``."""
    from safetensors.torch import save_file

    from tunelab.strategies import unwrapped_name

    directory.mkdir(parents=True, exist_ok=True)
    tensors = trained_state(model)
    if state is not None:
        tensors = {unwrapped_name(name): state[unwrapped_name(name)].contiguous() for name in tensors}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / METHOD_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(model.tunelab_method)))
    return directory


def is_inhouse_dir(directory: Path) -> bool:
    return (directory / METHOD_FILE).exists()


def load_inhouse(base_model: nn.Module, directory: Path, tokenizer: Any = None) -> nn.Module:
    """Rebuild the method on ``base_model`` from ``directory`` and load its trained tensors."""
    from safetensors.torch import load_file

    from tunelab.methods import apply_method

    model = apply_method(base_model, OmegaConf.load(directory / METHOD_FILE), tokenizer)
    saved = load_file(str(directory / WEIGHTS_FILE))
    mismatched = set(trained_state(model)) ^ set(saved)
    if mismatched:
        raise ConfigError(
            f"{directory / WEIGHTS_FILE} does not match {directory / METHOD_FILE}: {len(mismatched)} tensors "
            f"differ, e.g. {sorted(mismatched)[0]}"
        )
    model.load_state_dict(saved, strict=False)
    return model
