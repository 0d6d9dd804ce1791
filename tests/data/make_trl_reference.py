"""Write ``trl_dpo_reference.json``: trl's DPO losses and implicit rewards on fixed sequence log-probs, the
reference that ``tests/test_preference_losses.py`` holds tunelab's ``dpo_loss`` to without importing trl.

Run from the repository root with the dev dependencies installed (the stored file was written with trl 1.16.0
and torch 2.13.0; trl >= 1.16 is needed, it reads ``outputs.log_probs``)::

    .venv/bin/python -m tests.data.make_trl_reference

Each pair goes alone through trl's ``DPOTrainer._compute_loss``, called unbound on a namespace with the
attributes it reads: precomputed reference log-probs and a stub model whose per-token log-probs sum to the pair's
policy log-probs, with ``completion_mask`` carrying the reply lengths (IPO divides by them). Everything is
float64. Label smoothing is checked against trl's ``aot`` loss: trl 1.x's ``sigmoid`` ignores label_smoothing, and
``aot`` applies the conservative-DPO form to sorted log-ratio margins, which for a single pair is exactly cDPO.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import trl
from trl.trainer.dpo_trainer import DPOTrainer

OUTPUT = Path(__file__).with_name("trl_dpo_reference.json")

# Sequence log-probs of 5 pairs (policy chosen / rejected, reference chosen / rejected) and the reply lengths.
PAIRS = {
    "policy_chosen": [-12.5, -30.25, -7.0, -55.5, -3.125],
    "policy_rejected": [-14.0, -28.0, -9.5, -50.0, -3.0],
    "ref_chosen": [-13.0, -29.0, -8.0, -54.0, -3.5],
    "ref_rejected": [-13.5, -29.5, -8.25, -52.0, -2.75],
    "chosen_lengths": [6, 20, 4, 31, 2],
    "rejected_lengths": [7, 18, 5, 25, 3],
}

# (tunelab loss_type, label_smoothing, trl loss type) at each beta.
LOSSES = (("sigmoid", 0.0, "sigmoid"), ("hinge", 0.0, "hinge"), ("ipo", 0.0, "ipo"), ("sigmoid", 0.2, "aot"))
BETAS = (0.1, 0.5)


def trl_pair(trl_loss_type: str, beta: float, label_smoothing: float, index: int) -> tuple[float, float, float]:
    """(loss, chosen reward, rejected reward) of pair ``index`` by trl's ``DPOTrainer._compute_loss``."""
    pairs = {name: torch.tensor(values, dtype=torch.float64) for name, values in PAIRS.items()}
    lengths = torch.tensor([PAIRS["chosen_lengths"][index], PAIRS["rejected_lengths"][index]])
    width = int(lengths.max()) + 2
    completion_mask = ((torch.arange(width) >= 1) & (torch.arange(width) <= lengths[:, None])).long()
    log_probs = torch.zeros(2, width - 1, dtype=torch.float64)
    log_probs[:, 0] = torch.stack([pairs["policy_chosen"][index], pairs["policy_rejected"][index]])  # rest: 0
    outputs = SimpleNamespace(
        log_probs=log_probs,
        entropy=torch.zeros_like(log_probs),
        mean_logits=torch.zeros_like(log_probs),
        is_top1=torch.zeros_like(log_probs, dtype=torch.bool),
    )
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[trl_loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2, width, dtype=torch.long),
        "attention_mask": torch.ones(2, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": pairs["ref_chosen"][index : index + 1],
        "ref_rejected_logps": pairs["ref_rejected"][index : index + 1],
    }
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    metrics = trainer._metrics["train"]
    return loss.item(), metrics["rewards/chosen"][0], metrics["rewards/rejected"][0]


def reference_table() -> dict[str, Any]:
    """The file's content: versions, the pairs, and per (loss, beta) case trl's per-pair losses and rewards."""
    cases = []
    for loss_type, label_smoothing, trl_loss_type in LOSSES:
        for beta in BETAS:
            per_pair = [trl_pair(trl_loss_type, beta, label_smoothing, i) for i in range(len(PAIRS["policy_chosen"]))]
            losses, chosen_rewards, rejected_rewards = (list(column) for column in zip(*per_pair, strict=True))
            cases.append(
                {
                    "loss_type": loss_type,
                    "label_smoothing": label_smoothing,
                    "beta": beta,
                    "trl_loss_type": trl_loss_type,
                    "losses": losses,
                    "chosen_rewards": chosen_rewards,
                    "rejected_rewards": rejected_rewards,
                }
            )
    return {
        "generated_by": "python -m tests.data.make_trl_reference",
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "dtype": "float64",
        "pairs": PAIRS,
        "cases": cases,
    }


if __name__ == "__main__":
    OUTPUT.write_text(json.dumps(reference_table(), indent=1) + "\n")
    print(f"wrote {OUTPUT}")
