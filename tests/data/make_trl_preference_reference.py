"""Write ``trl_preference_reference.json``: trl's KTO, ORPO, SimPO and CPO losses on fixed log-probs, the
reference that ``tests/test_preference_losses.py`` holds tunelab's ``kto_loss``, ``orpo_loss``, ``simpo_loss`` and
``cpo_loss`` to without importing trl.

Run from the repository root with the dev dependencies installed (the stored file was written with trl 1.16.0
and torch 2.13.0)::

    TRL_EXPERIMENTAL_SILENCE=1 .venv/bin/python -m tests.data.make_trl_preference_reference

Everything is float64 except ORPO's odds ratio, which trl computes in float32 (``odds_ratio_loss`` casts).

- ORPO, SimPO, CPO: each pair goes alone through ``ORPOTrainer`` / ``CPOTrainer.get_batch_loss_metrics``, called
  unbound on a namespace whose ``concatenated_forward`` returns the pair's log-probs (length-averaged for ORPO and
  SimPO, summed for CPO, as trl computes them) and the chosen reply's per-token NLL ``-sum / length``.
- KTO: each batch goes whole through ``KTOTrainer._compute_loss`` (its reference point is a batch mean) with
  precomputed reference log-probs and a stub model whose per-token log-probs sum to the given sequence
  log-probs, of the examples and of their mismatched (KL) completions.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import trl

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.kto_trainer import KTOTrainer

OUTPUT = Path(__file__).with_name("trl_preference_reference.json")

# Summed reply log-probs of 5 pairs and the reply lengths; the last pair's mean log-probs lie above -log 2 (the
# other branch of log(1 - exp x) in ORPO's odds).
PAIRS = {
    "chosen": [-12.5, -30.25, -7.0, -55.5, -0.5],
    "rejected": [-14.0, -28.0, -9.5, -50.0, -1.25],
    "chosen_lengths": [6, 20, 4, 31, 2],
    "rejected_lengths": [7, 18, 5, 25, 3],
}
# KTO batches: per example its label, log-probs under the policy and the reference, and the log-probs of the
# mismatched completion the example's prompt is paired with; the last batch's KL estimate is negative (z0 = 0).
KTO_BATCHES = (
    {
        "label": [True, False, True, False, True, True],
        "logps": [-12.5, -14.0, -7.0, -9.5, -30.25, -3.0],
        "ref_logps": [-13.0, -13.5, -8.0, -8.25, -29.0, -3.5],
        "kl_logps": [-15.0, -11.0, -9.0, -20.0, -31.0, -6.0],
        "kl_ref_logps": [-15.5, -12.0, -8.5, -21.5, -30.0, -7.0],
    },
    {
        "label": [False, False, True, False],
        "logps": [-5.0, -6.5, -4.0, -9.0],
        "ref_logps": [-5.5, -6.0, -4.5, -8.0],
        "kl_logps": [-8.0, -7.0, -9.0, -10.0],
        "kl_ref_logps": [-7.0, -6.5, -8.0, -9.5],
    },
)
KTO_WEIGHTS = ((1.0, 1.0), (1.0, 1.33))  # (desirable_weight, undesirable_weight)
BETAS = (0.1, 0.5, 2.0)
SIMPO_GAMMAS = (0.5, 1.4)
CPO_ALPHAS = (0.0, 1.0)

ACCELERATOR = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def pair_inputs(index: int) -> dict[str, torch.Tensor]:
    """Pair ``index``'s summed and length-averaged log-probs and its chosen reply's per-token NLL (float64)."""
    chosen, rejected = (torch.tensor([PAIRS[name][index]], dtype=torch.float64) for name in ("chosen", "rejected"))
    chosen_length, rejected_length = PAIRS["chosen_lengths"][index], PAIRS["rejected_lengths"][index]
    return {
        "chosen": chosen,
        "rejected": rejected,
        "chosen_mean": chosen / chosen_length,
        "rejected_mean": rejected / rejected_length,
        "chosen_nll": -chosen[0] / chosen_length,
    }


def forward_stub(chosen: torch.Tensor, rejected: torch.Tensor, nll: torch.Tensor) -> Any:
    """A ``concatenated_forward`` returning the given log-probs and NLL (and dummy logits)."""
    logits = torch.zeros(1, 1, 1, dtype=torch.float64)
    return lambda model, batch: (chosen, rejected, logits, logits, nll)


def trl_orpo(beta: float, index: int) -> float:
    """Pair ``index``'s loss by ``ORPOTrainer.get_batch_loss_metrics``: NLL minus ``beta`` log sigmoid(log odds)."""
    pair = pair_inputs(index)
    trainer = SimpleNamespace(beta=beta, accelerator=ACCELERATOR, aux_loss_enabled=False)
    trainer.odds_ratio_loss = partial(ORPOTrainer.odds_ratio_loss, trainer)
    trainer.concatenated_forward = forward_stub(pair["chosen_mean"], pair["rejected_mean"], pair["chosen_nll"])
    loss, _ = ORPOTrainer.get_batch_loss_metrics(trainer, None, {})
    return loss.item()


def trl_cpo(loss_type: str, beta: float, alpha: float, gamma: float, index: int) -> float:
    """Pair ``index``'s loss by ``CPOTrainer.get_batch_loss_metrics`` (``loss_type`` sigmoid: CPO, simpo: SimPO
    with ``cpo_alpha=0``); SimPO's log-probs are length-averaged, as trl's ``concatenated_forward`` makes them."""
    pair = pair_inputs(index)
    trainer = SimpleNamespace(
        beta=beta,
        alpha=0.0,
        loss_type=loss_type,
        label_smoothing=0.0,
        simpo_gamma=gamma,
        cpo_alpha=alpha,
        accelerator=ACCELERATOR,
        aux_loss_enabled=False,
    )
    trainer.cpo_loss = partial(CPOTrainer.cpo_loss, trainer)
    averaged = loss_type == "simpo"
    logps = (pair["chosen_mean"], pair["rejected_mean"]) if averaged else (pair["chosen"], pair["rejected"])
    trainer.concatenated_forward = forward_stub(*logps, pair["chosen_nll"])
    loss, _ = CPOTrainer.get_batch_loss_metrics(trainer, None, {})
    return loss.item()


def kto_model(batch: dict[str, list], width: int) -> Any:
    """A stub model: per-token log-probs (first position the sequence log-prob, the rest 0) of the examples, or of
    their mismatched completions when called with the ``KL_input_ids`` tensor."""
    kl_input_ids = torch.zeros(len(batch["label"]), width, dtype=torch.long)

    def model(input_ids: torch.Tensor, **kwargs: Any) -> Any:
        values = batch["kl_logps"] if input_ids is kl_input_ids else batch["logps"]
        log_probs = torch.zeros(len(values), width - 1, dtype=torch.float64)
        log_probs[:, 0] = torch.tensor(values, dtype=torch.float64)
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs), mean_logits=log_probs)

    return model, kl_input_ids


def trl_kto(batch: dict[str, list], beta: float, desirable_weight: float, undesirable_weight: float) -> dict:
    """The batch's mean loss, its reference point and mean rewards by ``KTOTrainer._compute_loss``."""
    count, width = len(batch["label"]), 3
    model, kl_input_ids = kto_model(batch, width)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=ACCELERATOR,
        calculate_KL=True,
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    trainer._compute_kl_logps = partial(KTOTrainer._compute_kl_logps, trainer)
    ones = torch.ones(count, width, dtype=torch.long)
    inputs = {
        "input_ids": torch.zeros(count, width, dtype=torch.long),
        "attention_mask": ones,
        "completion_mask": ones,
        "KL_input_ids": kl_input_ids,
        "KL_attention_mask": ones,
        "KL_completion_mask": ones,
        "label": torch.tensor(batch["label"]),
        "ref_logps": torch.tensor(batch["ref_logps"], dtype=torch.float64),
        "ref_KL_logps": torch.tensor(batch["kl_ref_logps"], dtype=torch.float64),
    }
    loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    metrics = trainer._metrics["train"]
    return {
        "loss": loss.item(),
        "kl": metrics["kl"][0],
        "chosen_rewards": metrics["rewards/chosen"][0],
        "rejected_rewards": metrics["rewards/rejected"][0],
    }


def reference_table() -> dict[str, Any]:
    """The file's content: versions, the inputs, and per case trl's per-pair losses (KTO: per batch values)."""
    pairs = range(len(PAIRS["chosen"]))
    orpo = [{"beta": beta, "losses": [trl_orpo(beta, i) for i in pairs]} for beta in BETAS]
    simpo = [
        {"beta": beta, "gamma": gamma, "losses": [trl_cpo("simpo", beta, 0.0, gamma, i) for i in pairs]}
        for beta in BETAS
        for gamma in SIMPO_GAMMAS
    ]
    cpo = [
        {"beta": beta, "alpha": alpha, "losses": [trl_cpo("sigmoid", beta, alpha, 0.0, i) for i in pairs]}
        for beta in BETAS
        for alpha in CPO_ALPHAS
    ]
    kto = [
        {
            "batch": index,
            "beta": beta,
            "desirable_weight": w_d,
            "undesirable_weight": w_u,
            **trl_kto(batch, beta, w_d, w_u),
        }
        for index, batch in enumerate(KTO_BATCHES)
        for beta in BETAS
        for w_d, w_u in KTO_WEIGHTS
    ]
    return {
        "generated_by": "python -m tests.data.make_trl_preference_reference",
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "dtype": "float64 (orpo's odds ratio: float32, as trl computes it)",
        "pairs": PAIRS,
        "kto_batches": list(KTO_BATCHES),
        "orpo": orpo,
        "simpo": simpo,
        "cpo": cpo,
        "kto": kto,
    }


if __name__ == "__main__":
    OUTPUT.write_text(json.dumps(reference_table(), indent=1) + "\n")
    print(f"wrote {OUTPUT}")
