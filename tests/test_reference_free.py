"""task=orpo, task=simpo and task=cpo on a tiny Llama: each module's per-pair losses equal its loss function fed
with reply log-probs gathered by hand, none holds a reference model (DPO with ``reference=copy`` holds a second
set of weights), each learns a preference in a few steps, and bad settings are refused at config time."""

from __future__ import annotations

import pytest
import torch

from tunelab.build import build_components
from tunelab.errors import ConfigError
from tunelab.models.frozen import FrozenModel
from tunelab.tasks.pairwise import split_pairs
from tunelab.tasks.preference_losses import cpo_loss, orpo_loss, simpo_loss
from tunelab.tasks.reference import ReferenceModel
from tunelab.train import train

from .test_alignment import alignment_overrides, hand_reply_logps, one_batch, perturb_adapter, reply_positions


def expected_losses(task: str, chosen, rejected, chosen_lengths, rejected_lengths) -> torch.Tensor:
    """Each objective's loss function on summed reply log-probs and reply lengths, at the settings of the test."""
    if task == "orpo":
        return orpo_loss(chosen / chosen_lengths, rejected / rejected_lengths, lam=0.5)[0]
    if task == "simpo":
        return simpo_loss(chosen / chosen_lengths, rejected / rejected_lengths, beta=2.0, gamma=0.5)[0]
    return cpo_loss(chosen, rejected, -chosen / chosen_lengths, beta=0.5, alpha=1.0)[0]


SETTINGS = {"orpo": ["task.lam=0.5"], "simpo": ["task.beta=2.0", "task.gamma=0.5"], "cpo": ["task.beta=0.5"]}


@pytest.mark.parametrize("task", list(SETTINGS))
def test_module_losses_are_the_loss_on_hand_gathered_logps(task, preference_file, compose_cfg, tmp_path):
    """Per-pair losses of the module's batch equal the loss function on reply log-probs summed by hand over the
    reply positions (found from the token ids) and their lengths; the statistics rank pairs by the same log-probs."""
    cfg = compose_cfg([*alignment_overrides(task, preference_file, tmp_path), *SETTINGS[task]])
    components = build_components(cfg)
    model, module = components["model"], components["module"]
    batch = one_batch(components)
    replies = reply_positions(components["tokenizer"], batch)
    lengths = torch.tensor([len(reply) for reply in replies], dtype=torch.float64)
    with torch.no_grad():
        perturb_adapter(model)
        logps = hand_reply_logps(model.eval(), batch, replies)
        losses, statistics = module.pair_outputs(batch, "val")
    chosen, rejected = split_pairs(logps)
    expected = expected_losses(task, chosen, rejected, *split_pairs(lengths))
    assert torch.allclose(losses.double(), expected, atol=1e-5), f"{losses} != {expected}"
    accuracy = (chosen > rejected).double().mean().item()
    assert statistics["logps/accuracy"].item() == pytest.approx(accuracy)
    assert statistics["logps/chosen"].item() == pytest.approx(chosen.mean().item(), abs=1e-4)


def held_models(module: torch.nn.Module) -> list[object]:
    """The reference models and frozen copies a task module holds as attributes (outside its module tree)."""
    held = [value for value in vars(module).values() if isinstance(value, ReferenceModel | FrozenModel)]
    return held + [value.frozen for value in held if isinstance(value, ReferenceModel) and value.frozen is not None]


def held_parameters(module: torch.nn.Module) -> int:
    """Parameters of the module's tree plus those of the frozen copies it holds."""
    frozen = sum(
        p.numel() for copy in held_models(module) if isinstance(copy, FrozenModel) for p in copy.model.parameters()
    )
    return sum(p.numel() for p in module.parameters()) + frozen


def test_reference_free_objectives_build_no_reference_model(preference_file, compose_cfg, tmp_path):
    """No ``ReferenceModel`` nor frozen copy is held by ORPO, SimPO or CPO: the parameters held are the policy's
    alone, while DPO with ``task.reference=copy`` holds the model twice over."""
    dpo_cfg = compose_cfg([*alignment_overrides("dpo", preference_file, tmp_path), "task.reference=copy"])
    dpo = build_components(dpo_cfg)["module"]
    policy = sum(p.numel() for p in dpo.model.parameters())
    assert held_parameters(dpo) > 1.9 * policy and held_models(dpo)
    for task in SETTINGS:
        module = build_components(compose_cfg(alignment_overrides(task, preference_file, tmp_path)))["module"]
        assert held_models(module) == [], task
        assert held_parameters(module) == sum(p.numel() for p in module.model.parameters()) == policy, task


@pytest.mark.parametrize("task", list(SETTINGS))
def test_reference_free_objective_learns_the_preference(task, preference_file, compose_cfg, tmp_path):
    overrides = [
        *alignment_overrides(task, preference_file, tmp_path),
        "task.optimizer.lr=3e-3",
        "trainer.max_epochs=1",
    ]
    metrics, _ = train(compose_cfg(overrides))
    assert metrics["val/loss"] < metrics["untrained/val/loss"] - 0.05
    assert metrics["val/rewards/accuracy"] > 0.9 and metrics["val/rewards/margin"] > 0
    assert metrics["test/logps/accuracy"] > 0.9


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["task=orpo", "task.lam=0"], "task.lam=0 must be > 0"),
        (["task=simpo", "task.beta=-1"], "task.beta=-1 must be > 0"),
        (["task=simpo", "task.gamma=-0.5"], "task.gamma=-0.5 must be >= 0"),
        (["task=cpo", "task.alpha=-1"], "task.alpha=-1 must be >= 0"),
        (["task=cpo", "data=hpo_qa"], "task=cpo reads preference records"),
    ],
)
def test_bad_settings_fail_at_config_time(overrides, words, compose_cfg):
    from tunelab.config_checks import check_config

    with pytest.raises(ConfigError, match=words):
        check_config(compose_cfg(overrides))
