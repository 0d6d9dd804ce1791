"""The shared optimizer: fused AdamW takes the same steps as torch's reference for-loop AdamW, with weight decay on
matrices only, and the warm-up + cosine schedule of the config."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from tunelab.tasks.optim import build_optimizer


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))


def optimizer_cfg(fused: bool):
    return OmegaConf.create({"lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.99], "eps": 1e-8, "fused": fused})


SCHEDULER = OmegaConf.create({"name": "cosine", "warmup_steps": 2, "warmup_ratio": 0.0})


def warmup_then_cosine(step: int, warmup: int = 2, total: int = 6) -> float:
    """The multiplier of the learning rate, written out: linear from 0 over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, steps: int = 6) -> list[float]:
    generator = torch.Generator().manual_seed(1)
    rates = []
    for _ in range(steps):
        inputs = torch.randn(5, 8, generator=generator)
        model(inputs).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            rates.append(scheduler.get_last_lr()[0])
            scheduler.step()
    return rates


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_matches_reference_with_decay_on_matrices_only(fused):
    model, reference = small_model(), small_model()
    built = build_optimizer(model, optimizer_cfg(fused), SCHEDULER, total_steps=6)
    optimizer = built["optimizer"]
    assert bool(optimizer.defaults["fused"]) is fused
    assert [len(group["params"]) for group in optimizer.param_groups] == [2, 4]  # 2 matrices | 2 biases + norm
    decayed = [p for p in reference.parameters() if p.ndim >= 2]
    plain = [p for p in reference.parameters() if p.ndim < 2]
    groups = [{"params": decayed, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}]
    expected = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, foreach=False)
    reference_scheduler = torch.optim.lr_scheduler.LambdaLR(expected, warmup_then_cosine)
    rates = train(model, optimizer, built["lr_scheduler"]["scheduler"])
    assert rates == pytest.approx(train(reference, expected, reference_scheduler), abs=1e-9)
    assert rates[0] == 0.0 and rates[2] == pytest.approx(1e-2)
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_groups_put_decayed_first_and_scale_each_groups_lr():
    """Decayed groups come first whatever the parameter order (the two groups of earlier runs' checkpoints, in
    their order), then by lr scale; each group's lr is lr * its scale."""
    from tunelab.tasks.optim import parameter_groups

    model = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    plain = parameter_groups(model, 0.1, 1e-3)
    assert [[p.shape for p in g["params"]] for g in plain] == [[(4, 4), (2, 4)], [(4,), (4,), (4,), (2,)]]
    assert [(g["weight_decay"], g["lr"]) for g in plain] == [(0.1, 1e-3), (0.0, 1e-3)]
    scaled = parameter_groups(model, 0.1, 1e-3, lambda name: 4.0 if name.startswith("2.") else 1.0)
    assert [(len(g["params"]), g["weight_decay"], g["lr"]) for g in scaled] == [
        (1, 0.1, 1e-3),
        (1, 0.1, 4e-3),
        (3, 0.0, 1e-3),
        (1, 0.0, 4e-3),
    ]
