"""Shared checks of the method tests: a tiny chat batch, aligned logits, what trains, how much, perturbation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf

from tunelab.data.collate import TrainingCollator
from tunelab.data.records import ChatExample
from tunelab.data.tokenization import encode_example
from tunelab.tasks.sft import causal_lm_loss

from .conftest import CONFIGS, synthetic_pairs


def method_cfg(name: str):
    """configs/method/<name>.yaml over the YAMLs its ``defaults`` list extends (as Hydra composes it)."""
    cfg = OmegaConf.load(CONFIGS / "method" / f"{name}.yaml")
    parents = [parent for parent in cfg.pop("defaults", []) if parent != "_self_"]
    cfg = OmegaConf.merge(*(method_cfg(parent) for parent in parents), cfg)
    if name in ("lora", "dora"):
        cfg.target_modules = ["q_proj", "v_proj"]
    if "num_virtual_tokens" in cfg:
        cfg.num_virtual_tokens = 4
    return cfg


def batch_for(tokenizer) -> dict[str, torch.Tensor]:
    examples = [
        encode_example(
            tokenizer,
            ChatExample(({"role": "user", "content": row["instruction"]},), row["output"], f"mem:{i}"),
            64,
        )
        for i, row in enumerate(synthetic_pairs(4))
    ]
    return TrainingCollator(tokenizer.pad_token_id)(examples)


def aligned_logits(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, -batch["input_ids"].shape[1] :]


def sft_loss(batch) -> Callable[[torch.nn.Module], torch.Tensor]:
    return lambda model: causal_lm_loss(aligned_logits(model, batch), batch["labels"])[0]


def assert_steps_change_exactly(model, loss_fn: Callable[[torch.nn.Module], torch.Tensor], trainable: set[str]):
    """Three Adam steps on ``loss_fn(model)``: every parameter named in ``trainable`` gets a non-zero gradient at
    one step or more and changes; every other parameter gets no gradient and stays as it was.

    No weight decay, so a tensor can only move through its gradient. "One step or more", not "the first step": a
    zero-initialised factor (LoRA's B, a gated branch whose output starts at 0) gives the tensors behind it a zero
    gradient until the first update has moved it."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    reached: set[str] = set()
    model.train()
    for _ in range(3):
        loss_fn(model).backward()
        reached |= nonzero_gradients(model, trainable)
        optimizer.step()
        optimizer.zero_grad()
    starved = sorted(trainable - reached)
    assert not starved, f"trainable, but no non-zero gradient in 3 steps: {starved}"
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (n in trainable), f"{n} changed={changed} trainable={n in trainable}"


def nonzero_gradients(model, trainable: set[str]) -> set[str]:
    """Names of the parameters with a non-zero gradient now; a parameter outside ``trainable`` must have none."""
    for n, p in model.named_parameters():
        assert p.grad is None or n in trainable, f"{n} is not trainable but has a gradient"
    return {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.any())}


def perturb_trainable(model) -> None:
    """Move the trainable parameters away from their (often identity) init."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


@dataclass(frozen=True)
class Architecture:
    """What the trainable-parameter closed forms need of a model, read from its config (never from its modules)."""

    layers: int
    hidden: int
    kv_width: int  # keys (or values) per token of one layer: what a peft prefix holds per layer and token
    linears: dict[str, tuple[int, int]]  # (d_in, d_out) of each Linear of one block, by its name inside the block
    query_value: tuple[str, str]  # the block's query and value projections (UniPELT's gated LoRA)
    biases: int  # bias terms BitFit trains: the model's own, or the zero biases it adds to a bias-free model
    head: int  # the classification head whose copy peft trains for SEQ_CLS (0 for a causal LM)


def llama_architecture(config) -> Architecture:
    """A Llama-family decoder (``config``: the ``config:`` block of configs/model/*.yaml or a transformers config)."""
    d, ff = config.hidden_size, config.intermediate_size
    kv = d // config.num_attention_heads * config.num_key_value_heads
    linears = {
        "self_attn.q_proj": (d, d),
        "self_attn.k_proj": (d, kv),
        "self_attn.v_proj": (d, kv),
        "self_attn.o_proj": (d, d),
        "mlp.gate_proj": (d, ff),
        "mlp.up_proj": (d, ff),
        "mlp.down_proj": (ff, d),
    }
    layers = config.num_hidden_layers
    biases = layers * sum(d_out for _, d_out in linears.values())
    return Architecture(layers, d, kv, linears, ("self_attn.q_proj", "self_attn.v_proj"), biases, head=0)


def targeted(arch: Architecture, targets) -> list[str]:
    """Block Linears a peft ``target_modules`` list selects: names equal to, or ending in ``.``, a target."""
    return [name for name in arch.linears if any(name == t or name.endswith(f".{t}") for t in targets)]


def lora_params(arch: Architecture, r: int, names) -> int:
    """LoRA on the block Linears ``names``: A (r x d_in) and B (d_out x r) each."""
    return sum(r * (arch.linears[name][0] + arch.linears[name][1]) for name in names)


def bottleneck_params(d: int, m: int, gated: bool = False) -> int:
    """Houlsby bottleneck d -> m -> d with biases (2 d m + m + d), plus a d -> 1 gate with bias when gated."""
    return 2 * d * m + m + d + (d + 1 if gated else 0)


def prefix_params(arch: Architecture, cfg) -> int:
    """peft prefix tuning, n virtual tokens: a direct table n x (layers * 2 * kv_width); with ``prefix_projection``
    an n x kv_width table through Linear(kv_width, h), tanh, Linear(h, layers * 2 * kv_width)."""
    n, per_token = cfg.num_virtual_tokens, arch.layers * 2 * arch.kv_width
    if not cfg.prefix_projection:
        return n * per_token
    h = cfg.get("encoder_hidden_size") or arch.hidden
    return n * arch.kv_width + (arch.kv_width * h + h) + (h * per_token + per_token)


def ia3_count(arch: Architecture, cfg) -> int:
    """(IA)^3: a vector per targeted Linear and layer, d_in long for a feed-forward module (it scales the input),
    else d_out."""
    feedforward = targeted(arch, cfg.feedforward_modules)
    widths = [arch.linears[name][0 if name in feedforward else 1] for name in targeted(arch, cfg.target_modules)]
    return arch.layers * sum(widths)


def ptuning_count(arch: Architecture, cfg) -> int:
    """P-tuning with the MLP encoder: n x d inputs through Linear(d, h), Linear(h, h), Linear(h, d), with biases."""
    d, h = arch.hidden, cfg.encoder_hidden_size
    return cfg.num_virtual_tokens * d + (d * h + h) + (h * h + h) + (h * d + d)


def lora_count(arch: Architecture, cfg) -> int:
    """LoRA (and QLoRA) on every targeted Linear of every layer."""
    return arch.layers * lora_params(arch, cfg.r, targeted(arch, cfg.target_modules))


def dora_count(arch: Architecture, cfg) -> int:
    """DoRA: LoRA's A and B plus one magnitude per output feature of every targeted Linear of every layer."""
    magnitudes = sum(arch.linears[name][1] for name in targeted(arch, cfg.target_modules))
    return lora_count(arch, cfg) + arch.layers * magnitudes


def vera_count(arch: Architecture, cfg) -> int:
    """VeRA: per targeted Linear and layer, the vectors d (r) and b (d_out); the shared A and B are frozen."""
    return arch.layers * sum(cfg.r + arch.linears[name][1] for name in targeted(arch, cfg.target_modules))


def loha_count(arch: Architecture, cfg) -> int:
    """LoHa: two rank-r pairs B (d_out x r), A (r x d_in) per targeted Linear and layer."""
    return 2 * lora_count(arch, cfg)


def near_square_factors(dim: int) -> tuple[int, int]:
    """dim = m n with m <= n and m the largest divisor of dim not above its square root."""
    m = max(k for k in range(1, int(dim**0.5) + 1) if dim % k == 0)
    return m, dim // m


def lokr_count(arch: Architecture, cfg) -> int:
    """LoKr (``decompose_factor=-1``): d_out = a c and d_in = b e near their square roots; C (a x b) in full, and
    M (c x e) in full, or as c x r and r x e factors when r < max(c, e) / 2."""
    assert cfg.decompose_factor == -1

    def per_linear(d_in: int, d_out: int) -> int:
        (a, c), (b, e) = near_square_factors(d_out), near_square_factors(d_in)
        return a * b + (cfg.r * (c + e) if cfg.r < max(c, e) / 2 else c * e)

    return arch.layers * sum(per_linear(*arch.linears[name]) for name in targeted(arch, cfg.target_modules))


def adalora_count(arch: Architecture, cfg) -> int:
    """AdaLoRA at init_r: P (d_out x r), Q (r x d_in) and the r entries of Lambda per targeted Linear and layer."""
    names = targeted(arch, cfg.target_modules)
    return arch.layers * (lora_params(arch, cfg.init_r, names) + cfg.init_r * len(names))


def adapter_count(arch: Architecture, cfg) -> int:
    """A bottleneck on the d-wide output of each position in ``cfg.positions``, every layer."""
    return arch.layers * len(cfg.positions) * bottleneck_params(arch.hidden, cfg.bottleneck_size)


def mam_count(arch: Architecture, cfg) -> int:
    """A parallel bottleneck on each layer's FFN (d in, d out) and a prefix."""
    return arch.layers * bottleneck_params(arch.hidden, cfg.bottleneck_size) + prefix_params(arch, cfg)


def unipelt_count(arch: Architecture, cfg) -> int:
    """Per layer: gated LoRA on query and value (A, B and a d_in -> 1 gate each), a gated FFN-output bottleneck and
    one prefix-gate logit; and a prefix."""
    gates = sum(arch.linears[name][0] + 1 for name in arch.query_value)
    per_layer = lora_params(arch, cfg.lora_r, arch.query_value) + gates
    per_layer += bottleneck_params(arch.hidden, cfg.bottleneck_size, gated=True) + 1
    return arch.layers * per_layer + prefix_params(arch, cfg)


CLOSED_FORMS: dict[str, Callable[[Architecture, Any], int]] = {
    "lora": lora_count,
    "dora": dora_count,
    "qlora": lora_count,
    "ia3": ia3_count,
    "vera": vera_count,
    "loha": loha_count,
    "lokr": lokr_count,
    "adalora": adalora_count,
    "prompt": lambda arch, cfg: cfg.num_virtual_tokens * arch.hidden,  # an n x d prompt
    "ptuning": ptuning_count,
    "prefix": prefix_params,
    "ptuning_v2": prefix_params,
    "adapter": adapter_count,
    "mam": mam_count,
    "unipelt": unipelt_count,
    "bitfit": lambda arch, cfg: arch.biases,
}
NOT_PEFT = ("adapter", "bitfit")  # no peft wrapper, so no trained copy of a classification head


def closed_form_trainable(arch: Architecture, cfg) -> int:
    """The number of parameters method ``cfg`` trains on ``arch`` (knobs from its config, ``train_norms`` off)."""
    return CLOSED_FORMS[cfg.name](arch, cfg) + (0 if cfg.name in NOT_PEFT else arch.head)


def assert_trainable_count(model, expected: int) -> None:
    """tunelab's start-up report (and peft's own count, for a peft model) give ``expected`` trainable parameters."""
    from peft import PeftModel

    from tunelab.methods import parameter_report

    assert parameter_report(model).trainable == expected, f"tunelab reports {parameter_report(model)}, not {expected:,}"
    if isinstance(model, PeftModel):
        assert model.get_nb_trainable_parameters()[0] == expected, f"peft counts {model.get_nb_trainable_parameters()}"
