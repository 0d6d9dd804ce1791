"""Write ``trl_grpo_reference.json``: trl's GRPO and RLOO advantages and losses on fixed per-token log-probs, the
reference that ``tests/test_grpo_losses.py`` holds :mod:`tunelab.tasks.grpo_losses` to without importing trl.

Run from the repository root with the dev dependencies installed (the stored file was written with trl 1.16.0)::

    .venv/bin/python -m tests.data.make_trl_grpo_reference

Advantages: trl computes them inside ``GRPOTrainer._generate_and_score_completions`` next to generation, so they are
replicated here line for line from trl 1.16.0 (``scale_rewards="group"`` / ``"none"``) with trl's own ``nanstd``.
Losses: each case goes through trl's ``GRPOTrainer._compute_loss``, called unbound on a namespace with the
attributes it reads and a ``_get_per_token_logps_and_entropies`` that returns the fixed log-probs; ``old_logps``
and ``ref_logps`` are the inputs ``old_per_token_logps`` / ``ref_per_token_logps``. GSPO is trl's
``loss_type="grpo"`` with ``importance_sampling_level="sequence"``; ``dapo`` normalizes by ``num_items_in_batch``,
set to the batch's completion tokens (one process, no gradient accumulation). RLOO: the leave-one-out advantages
replicated from ``RLOOTrainer._generate_and_score_completions`` (``normalize_advantages`` on and off; beta = 0, and
beta = 0.04 with the rewards penalized by beta x the sequences' summed ``old_logps - ref_logps``), and
``RLOOTrainer._compute_loss`` called the same way, with ``old_logps`` the sequences' summed old log-probs.
Everything is float64.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import trl
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.rloo_trainer import RLOOTrainer
from trl.trainer.utils import nanstd

OUTPUT = Path(__file__).with_name("trl_grpo_reference.json")
NUM_GENERATIONS = 3
MAX_COMPLETION_LENGTH = 5
EPSILON_LOW, EPSILON_HIGH = 0.2, 0.28
# 2 prompts x 3 completions of up to 4 tokens; the second group's rewards are all equal (zero variance).
INPUTS = {
    "rewards": [1.0, 0.0, 0.5, 0.25, 0.25, 0.25],
    "mask": [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]],
    "logps": [
        [-1.2, -0.4, -2.0, -0.9],
        [-0.7, -1.5, 0.0, 0.0],
        [-2.2, -0.3, -0.8, 0.0],
        [-0.5, 0.0, 0.0, 0.0],
        [-1.0, -1.1, -0.2, -3.0],
        [-0.6, -0.9, 0.0, 0.0],
    ],
    "old_logps": [
        [-1.0, -0.6, -1.6, -0.9],
        [-0.9, -1.2, 0.0, 0.0],
        [-2.0, -0.5, -1.1, 0.0],
        [-0.8, 0.0, 0.0, 0.0],
        [-1.3, -1.0, -0.4, -2.5],
        [-0.6, -1.2, 0.0, 0.0],
    ],
    "ref_logps": [
        [-1.1, -0.5, -1.8, -1.2],
        [-0.8, -1.3, 0.0, 0.0],
        [-2.4, -0.2, -0.9, 0.0],
        [-0.6, 0.0, 0.0, 0.0],
        [-1.2, -0.9, -0.3, -2.8],
        [-0.5, -1.0, 0.0, 0.0],
    ],
}
# (tunelab loss_type, scale_rewards) x beta; trl's loss type and importance sampling level follow.
LOSSES = (("grpo", True), ("dr_grpo", False), ("dapo", True), ("gspo", True))
BETAS = (0.0, 0.04)


def tensors() -> dict[str, torch.Tensor]:
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in INPUTS.items()}


def trl_advantages(rewards: torch.Tensor, scale: bool) -> torch.Tensor:
    """trl 1.16.0's ``sum_then_normalize`` branch with ``scale_rewards="group"`` (``scale``) or ``"none"``."""
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, NUM_GENERATIONS), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(NUM_GENERATIONS, dim=0)
    std_rewards = nanstd(rewards.view(-1, NUM_GENERATIONS), dim=1).repeat_interleave(NUM_GENERATIONS, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale:
        advantages = advantages / (std_rewards + 1e-4)
    return advantages


def trl_loss(loss_type: str, beta: float, advantages: torch.Tensor) -> tuple[float, dict[str, float]]:
    """The loss of trl's ``GRPOTrainer._compute_loss`` on :data:`INPUTS` and its clip / KL metrics."""
    data = tensors()
    mask = data["mask"].long()
    trl_loss_type = "grpo" if loss_type == "gspo" else loss_type
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (
            data["logps"],
            torch.zeros_like(data["logps"]),
            None,
        ),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="sequence" if loss_type == "gspo" else "token",
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=trl_loss_type,
        epsilon_low=EPSILON_LOW,
        epsilon_high=EPSILON_HIGH,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION_LENGTH,
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
    )
    width = mask.shape[1]
    inputs = {
        "prompt_ids": torch.zeros(mask.shape[0], 1, dtype=torch.long),
        "prompt_mask": torch.ones(mask.shape[0], 1, dtype=torch.long),
        "completion_ids": torch.zeros(mask.shape[0], width, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": data["old_logps"],
        "ref_per_token_logps": data["ref_logps"],
        "num_items_in_batch": mask.sum(),
    }
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    metrics = trainer._metrics["train"]
    return loss.item(), {
        "clip_region": metrics["clip_ratio/region_mean"][0],
        "kl": metrics["kl"][0] if beta else 0.0,
    }


def trl_rloo_advantages(rewards: torch.Tensor, normalize: bool, beta: float) -> torch.Tensor:
    """trl 1.16.0's RLOO advantages (every completion scorable), the rewards first penalized by ``beta`` x the
    sequence KL of the old log-probs to the reference's (``beta != 0``), optionally whitened over the batch."""
    if beta != 0.0:
        data = tensors()
        per_token_kl = data["old_logps"] - data["ref_logps"]
        kl = (per_token_kl * data["mask"]).sum(-1)
        rewards = rewards - beta * kl
    grouped_rewards = rewards.view(-1, NUM_GENERATIONS)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped_rewards) / (scorable_counts - 1)).view(-1)
    advantages = rewards - baselines
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return advantages


def trl_rloo_loss(advantages: torch.Tensor) -> tuple[float, float]:
    """The loss of trl's ``RLOOTrainer._compute_loss`` on :data:`INPUTS` and its clipped share of the sequences."""
    data = tensors()
    mask = data["mask"].long()
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (
            data["logps"],
            torch.zeros_like(data["logps"]),
            None,
        ),
        aux_loss_enabled=False,
        epsilon_low=EPSILON_LOW,
        epsilon_high=EPSILON_HIGH,
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x),
        _metrics={"train": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(mask.shape[0], 1, dtype=torch.long),
        "prompt_mask": torch.ones(mask.shape[0], 1, dtype=torch.long),
        "completion_ids": torch.zeros_like(mask),
        "completion_mask": mask,
        "advantages": advantages,
        "old_logps": (data["old_logps"] * mask).sum(1),
    }
    loss = RLOOTrainer._compute_loss(trainer, None, inputs)
    return loss.item(), trainer._metrics["train"]["clip_ratio/region_mean"][0]


def reference_table() -> dict[str, Any]:
    """The file's content: versions, the inputs, trl's advantages with / without std, and per (loss, beta) case
    trl's loss and metrics."""
    rewards = tensors()["rewards"]
    advantages = {scale: trl_advantages(rewards, scale) for scale in (True, False)}
    cases = []
    for loss_type, scale in LOSSES:
        for beta in BETAS:
            loss, metrics = trl_loss(loss_type, beta, advantages[scale])
            cases.append({"loss_type": loss_type, "scale_rewards": scale, "beta": beta, "loss": loss, **metrics})
    rloo = []
    for normalize in (False, True):
        for beta in BETAS:
            rloo_advantages = trl_rloo_advantages(rewards, normalize, beta)
            loss, clip_region = trl_rloo_loss(rloo_advantages)
            rloo.append(
                {
                    "normalize": normalize,
                    "beta": beta,
                    "advantages": rloo_advantages.tolist(),
                    "loss": loss,
                    "clip_region": clip_region,
                }
            )
    return {
        "generated_by": "python -m tests.data.make_trl_grpo_reference",
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "dtype": "float64",
        "num_generations": NUM_GENERATIONS,
        "max_completion_length": MAX_COMPLETION_LENGTH,
        "epsilon_low": EPSILON_LOW,
        "epsilon_high": EPSILON_HIGH,
        "inputs": INPUTS,
        "advantages": {"scaled": advantages[True].tolist(), "unscaled": advantages[False].tolist()},
        "cases": cases,
        "rloo": rloo,
    }


if __name__ == "__main__":
    OUTPUT.write_text(json.dumps(reference_table(), indent=1) + "\n")
    print(f"wrote {OUTPUT}")
