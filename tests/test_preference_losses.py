"""Alignment losses: DPO, KTO, ORPO, SimPO and CPO against values stored from trl's trainers (and those files
against the installed trl), hand-worked values for reward, DPO, KTO, ORPO, SimPO, CPO and PPO pieces."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.tokenization import IGNORE_INDEX
from tunelab.tasks.preference_losses import (
    bradley_terry_loss,
    clipped_policy_loss,
    clipped_value_loss,
    cpo_loss,
    dpo_loss,
    entropy_from_logits,
    gae,
    kl_shaped_rewards,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    per_token_kl,
    sequence_logps,
    simpo_loss,
    whiten,
)

REFERENCE_FILE = Path(__file__).parent / "data" / "trl_dpo_reference.json"
TRL_REFERENCE = json.loads(REFERENCE_FILE.read_text())
# Both sides compute in float64 from the same inputs: sigmoid, hinge and cDPO agree bit for bit, IPO (trl divides
# the log-ratios by the lengths, the test each log-prob) to 7e-15 on losses of ~25. float32 inputs would be off
# by up to 4e-6, so the check is float64's.
TOLERANCE = 1e-12
PREFERENCE_FILE = Path(__file__).parent / "data" / "trl_preference_reference.json"
TRL_PREFERENCE = json.loads(PREFERENCE_FILE.read_text())
ORPO_TOLERANCE = 2e-6  # trl computes ORPO's odds ratio in float32 (losses of ~2: float32's 2.4e-7 relative step)


def case_id(case: dict) -> str:
    return f"{case['loss_type']}-eps{case['label_smoothing']}-beta{case['beta']}"


def stored_pairs() -> dict[str, torch.Tensor]:
    """The reference file's sequence log-probs and reply lengths, as float64 tensors."""
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in TRL_REFERENCE["pairs"].items()}


def assert_matches(actual: torch.Tensor, expected: list[float], what: str) -> None:
    assert actual.tolist() == pytest.approx(expected, rel=0, abs=TOLERANCE), what


@pytest.mark.parametrize("case", TRL_REFERENCE["cases"], ids=case_id)
def test_dpo_loss_equals_stored_trl_values(case):
    """Per-pair losses and implicit rewards equal trl's (``tests/data/trl_dpo_reference.json``). IPO gets the
    per-token mean log-probs (trl divides by the reply lengths inside its IPO loss); trl's rewards are then still
    the summed ones, ours the per-token ones, so ours are scaled back by the lengths."""
    pairs = stored_pairs()
    lengths = (pairs["chosen_lengths"], pairs["rejected_lengths"], pairs["chosen_lengths"], pairs["rejected_lengths"])
    logps = (pairs["policy_chosen"], pairs["policy_rejected"], pairs["ref_chosen"], pairs["ref_rejected"])
    ipo = case["loss_type"] == "ipo"
    if ipo:
        logps = tuple(values / length for values, length in zip(logps, lengths, strict=True))
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        *logps, beta=case["beta"], loss_type=case["loss_type"], label_smoothing=case["label_smoothing"]
    )
    if ipo:
        chosen_rewards, rejected_rewards = chosen_rewards * lengths[0], rejected_rewards * lengths[1]
    assert_matches(losses, case["losses"], "losses")
    assert_matches(chosen_rewards, case["chosen_rewards"], "chosen rewards")
    assert_matches(rejected_rewards, case["rejected_rewards"], "rejected rewards")


def test_stored_trl_reference_is_what_the_installed_trl_gives():
    """The stored file against trl itself (a dev dependency: an import error fails here, it is not skipped), so a
    trl release that changes a loss is noticed; regenerate with ``python -m tests.data.make_trl_reference``."""
    from .data import make_trl_reference

    fresh = make_trl_reference.reference_table()
    versions = f"trl {fresh['trl_version']} now, the file has trl {TRL_REFERENCE['trl_version']}"
    assert fresh["pairs"] == TRL_REFERENCE["pairs"], "the generator's pairs differ from the file's: regenerate it"
    assert [case_id(case) for case in fresh["cases"]] == [case_id(case) for case in TRL_REFERENCE["cases"]]
    for now, stored in zip(fresh["cases"], TRL_REFERENCE["cases"], strict=True):
        for key in ("losses", "chosen_rewards", "rejected_rewards"):
            assert now[key] == pytest.approx(stored[key], rel=0, abs=TOLERANCE), f"{case_id(now)} {key}: {versions}"


def test_dpo_hand_values_and_detached_rewards():
    # h = (pi_c - ref_c) - (pi_r - ref_r) = (-1 + 2) - (-3 + 2) = 2; beta h = 1
    policy = torch.tensor([-1.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    ref = torch.tensor([-2.0]), torch.tensor([-2.0])
    softplus = {1: math.log1p(math.exp(-1.0)), -1: math.log1p(math.exp(1.0))}  # -log sigmoid(+-1)
    expected = {
        ("sigmoid", 0.0): softplus[1],
        ("sigmoid", 0.1): 0.9 * softplus[1] + 0.1 * softplus[-1],
        ("ipo", 0.0): (2 - 1 / (2 * 0.5)) ** 2,
        ("hinge", 0.0): 0.0,
    }
    for (loss_type, eps), value in expected.items():
        losses, chosen, rejected = dpo_loss(*policy, *ref, beta=0.5, loss_type=loss_type, label_smoothing=eps)
        assert losses.item() == pytest.approx(value, abs=1e-6)
        assert (chosen.item(), rejected.item()) == (0.5, -0.5)
        assert not chosen.requires_grad and not rejected.requires_grad and losses.requires_grad
    with pytest.raises(ValueError, match="loss_type='kto'"):
        dpo_loss(*policy, *ref, beta=0.5, loss_type="kto")
    with pytest.raises(ValueError, match="applies to loss_type='sigmoid' only"):
        dpo_loss(*policy, *ref, beta=0.5, loss_type="ipo", label_smoothing=0.1)


def test_bradley_terry_loss():
    losses = bradley_terry_loss(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 2.0, 3.0]))
    # -log sigmoid(1), -log sigmoid(-2), -log sigmoid(0)
    expected = [math.log1p(math.exp(-1)), math.log1p(math.exp(2)), math.log(2)]
    assert losses.tolist() == pytest.approx(expected)


def test_sequence_logps_match_a_manual_gather():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :3] = IGNORE_INDEX  # prompt
    labels[1, :1] = IGNORE_INDEX
    labels[1, 4:] = IGNORE_INDEX  # padding
    log_probs = F.log_softmax(logits, dim=-1)
    manual = torch.zeros(2)
    for row in range(2):
        for t in range(5):
            if labels[row, t + 1] != IGNORE_INDEX:
                manual[row] += log_probs[row, t, labels[row, t + 1]]
    torch.testing.assert_close(sequence_logps(logits, labels), manual)
    torch.testing.assert_close(sequence_logps(logits, labels, average=True), manual / torch.tensor([3.0, 3.0]))


def test_gae_worked_example_with_padding_and_a_masked_prompt():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.0, 2.0, 7.0], [5.0, 1.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 9.0], [3.0, 0.5, 0.5, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]])
    # row 0: delta_2 = 2 - 1.5 = 0.5             A_2 = 0.5
    #        delta_1 = 0 + 0.9 * 1.5 - 1 = 0.35  A_1 = 0.35 + 0.72 * 0.5 = 0.71
    #        delta_0 = 1 + 0.9 * 1 - 0.5 = 1.4   A_0 = 1.4 + 0.72 * 0.71 = 1.9112
    # row 1: delta_2 = 1 - 0.5 = 0.5             A_2 = 0.5
    #        delta_1 = 1 + 0.9 * 0.5 - 0.5 = 0.95 A_1 = 0.95 + 0.72 * 0.5 = 1.31; position 0 is prompt
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor([[1.9112, 0.71, 0.5, 0.0], [0.0, 1.31, 0.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[2.4112, 1.71, 2.0, 0.0], [0.0, 1.81, 1.0, 0.0]]))
    # lam = 1: returns are the discounted rewards-to-go whatever the values: 1 + 0.9 * (0 + 0.9 * 2) = 2.62
    _, monte_carlo = gae(rewards, values, mask, gamma, 1.0)
    torch.testing.assert_close(monte_carlo[0], torch.tensor([2.62, 1.8, 2.0, 0.0]))


def test_whiten_uses_only_valid_positions():
    whitened = whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]]))
    scale = math.sqrt(2 / 3)  # population std of 1, 2, 3
    torch.testing.assert_close(whitened, torch.tensor([[-1 / scale, 0.0, 1 / scale, 0.0]]))


def test_clipped_policy_loss_inside_and_outside_the_clip_range():
    ratios = torch.tensor([[1.1, 1.5, 0.5, 1.5, 1.0]])
    advantages = torch.tensor([[2.0, 1.0, -1.0, -1.0, 2.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    old = torch.full_like(ratios, -2.0)
    logprobs = (old + ratios.log()).requires_grad_()
    loss, clip_fraction = clipped_policy_loss(logprobs, old, advantages, mask, clip=0.2)
    # per token max(-A r, -A clamp(r, 0.8, 1.2)):
    #   r=1.1 A=2: -2.2 (inside the range)      r=1.5 A=1: max(-1.5, -1.2) = -1.2 (clipped)
    #   r=0.5 A=-1: max(0.5, 0.8) = 0.8 (clipped) r=1.5 A=-1: max(1.5, 1.2) = 1.5 (outside, unclipped kept)
    assert loss.item() == pytest.approx((-2.2 - 1.2 + 0.8 + 1.5) / 4)
    assert clip_fraction.item() == pytest.approx(2 / 4)
    loss.backward()  # d(-A r)/dlogp = -A r on unclipped tokens, 0 where the clipped term wins or masked
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-2.2, 0.0, 0.0, 1.5, 0.0]]) / 4)


def test_clipped_value_loss():
    old = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    values = torch.tensor([[1.5, 0.9, 1.5, 5.0]])
    returns = torch.tensor([[2.0, 0.0, 0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # V_clip = [1.2, 0.9, 1.2]; max of squared errors: max(0.25, 0.64), max(0.81, 0.81), max(1.0, 0.49)
    loss = clipped_value_loss(values, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 1.0) / 3)


def test_per_token_kl_and_shaped_rewards():
    kl = per_token_kl(torch.tensor([[-1.0, -2.0, -0.5, -3.0]]), torch.tensor([[-1.5, -1.0, -0.5, -0.1]]))
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, -2.9]]))
    kl = torch.cat([kl, torch.ones(2, 4)])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    rewards = kl_shaped_rewards(torch.tensor([2.0, -1.0, 3.0]), kl, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, 0.1, 2.0, 0.0], [0.0, -0.1 - 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_entropy_from_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 3.0]])
    entropy = entropy_from_logits(logits)
    torch.testing.assert_close(entropy[:2], torch.tensor([math.log(4), 0.0]))
    torch.testing.assert_close(entropy, torch.distributions.Categorical(logits=logits).entropy())


def stored_replies() -> dict[str, torch.Tensor]:
    """The preference file's summed reply log-probs, their length-averaged means and the chosen reply's per-token
    NLL ``-sum / length`` (float64)."""
    pairs = {name: torch.tensor(values, dtype=torch.float64) for name, values in TRL_PREFERENCE["pairs"].items()}
    return {
        "chosen": pairs["chosen"],
        "rejected": pairs["rejected"],
        "chosen_mean": pairs["chosen"] / pairs["chosen_lengths"],
        "rejected_mean": pairs["rejected"] / pairs["rejected_lengths"],
        "chosen_nll": -pairs["chosen"] / pairs["chosen_lengths"],
    }


@pytest.mark.parametrize("case", TRL_PREFERENCE["orpo"], ids=lambda case: f"beta{case['beta']}")
def test_orpo_loss_equals_stored_trl_values(case):
    replies = stored_replies()
    losses, chosen, _ = orpo_loss(replies["chosen_mean"], replies["rejected_mean"], lam=case["beta"])
    assert losses.tolist() == pytest.approx(case["losses"], rel=0, abs=ORPO_TOLERANCE)
    assert chosen.tolist() == pytest.approx((case["beta"] * replies["chosen_mean"]).tolist(), rel=0, abs=TOLERANCE)


@pytest.mark.parametrize("case", TRL_PREFERENCE["simpo"], ids=lambda case: f"beta{case['beta']}-gamma{case['gamma']}")
def test_simpo_loss_equals_stored_trl_values(case):
    replies = stored_replies()
    losses, _, _ = simpo_loss(replies["chosen_mean"], replies["rejected_mean"], beta=case["beta"], gamma=case["gamma"])
    assert_matches(losses, case["losses"], "simpo losses")


@pytest.mark.parametrize("case", TRL_PREFERENCE["cpo"], ids=lambda case: f"beta{case['beta']}-alpha{case['alpha']}")
def test_cpo_loss_equals_stored_trl_values(case):
    replies = stored_replies()
    losses, _, _ = cpo_loss(
        replies["chosen"], replies["rejected"], replies["chosen_nll"], beta=case["beta"], alpha=case["alpha"]
    )
    assert_matches(losses, case["losses"], "cpo losses")


def kto_case_id(case: dict) -> str:
    return f"batch{case['batch']}-beta{case['beta']}-w{case['desirable_weight']}-{case['undesirable_weight']}"


@pytest.mark.parametrize("case", TRL_PREFERENCE["kto"], ids=kto_case_id)
def test_kto_loss_equals_stored_trl_values(case):
    """The batch mean loss, the reference point ``z0`` (trl's ``kl`` metric) and the mean rewards of each label."""
    batch = {k: torch.tensor(v, dtype=torch.float64) for k, v in TRL_PREFERENCE["kto_batches"][case["batch"]].items()}
    desirable = batch["label"].bool()
    z0 = kto_reference_point(batch["kl_logps"], batch["kl_ref_logps"])
    losses, rewards = kto_loss(
        batch["logps"],
        batch["ref_logps"],
        desirable,
        z0,
        beta=case["beta"],
        desirable_weight=case["desirable_weight"],
        undesirable_weight=case["undesirable_weight"],
    )
    assert z0.item() == pytest.approx(case["kl"], rel=0, abs=TOLERANCE)
    assert losses.mean().item() == pytest.approx(case["loss"], rel=0, abs=TOLERANCE)
    assert rewards[desirable].mean().item() == pytest.approx(case["chosen_rewards"], rel=0, abs=TOLERANCE)
    assert rewards[~desirable].mean().item() == pytest.approx(case["rejected_rewards"], rel=0, abs=TOLERANCE)


def test_stored_trl_preference_reference_is_what_the_installed_trl_gives():
    """The stored KTO / ORPO / SimPO / CPO file against trl itself (a dev dependency: not skipped); regenerate with
    ``python -m tests.data.make_trl_preference_reference``."""
    from .data import make_trl_preference_reference

    fresh = make_trl_preference_reference.reference_table()
    assert (fresh["pairs"], fresh["kto_batches"]) == (TRL_PREFERENCE["pairs"], TRL_PREFERENCE["kto_batches"])
    for loss in ("orpo", "simpo", "cpo", "kto"):
        assert len(fresh[loss]) == len(TRL_PREFERENCE[loss]), loss
        for now, stored in zip(fresh[loss], TRL_PREFERENCE[loss], strict=True):
            assert now.keys() == stored.keys(), loss
            for key, value in now.items():
                assert value == pytest.approx(stored[key], rel=0, abs=TOLERANCE), (
                    f"{loss} {key}: {fresh['trl_version']}"
                )


def test_orpo_simpo_cpo_hand_values():
    # ORPO: P_c = 0.5 (odds 1), P_r = 0.25 (odds 1/3): log odds ratio log 3, -log sigmoid(log 3) = log(4/3)
    chosen, rejected = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    losses, chosen_reward, _ = orpo_loss(chosen, rejected, lam=0.5)
    assert losses.item() == pytest.approx(math.log(2) + 0.5 * math.log(4 / 3), abs=1e-6)
    assert chosen_reward.item() == pytest.approx(0.5 * math.log(0.5))
    # SimPO: beta (m_c - m_r) - gamma = 2 * 1 - 1 = 1
    losses, _, _ = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma=1.0)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    # CPO: beta (l_c - l_r) = 0.5 * 2 = 1, plus alpha * NLL = 2 * 1.5
    losses, _, rejected_reward = cpo_loss(
        torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([1.5]), beta=0.5, alpha=2.0
    )
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.0)) + 3.0, abs=1e-6)
    assert rejected_reward.item() == -2.5


def test_kto_reference_point_on_a_hand_made_batch():
    """``z0`` is the mean log-ratio of the mismatched pairs, clamped at 0 and detached."""
    mismatched = torch.tensor([-4.0, -7.0, -2.5], requires_grad=True)
    z0 = kto_reference_point(mismatched, torch.tensor([-4.5, -8.0, -4.0]))  # log-ratios 0.5, 1, 1.5
    assert z0.item() == pytest.approx(1.0) and not z0.requires_grad
    assert kto_reference_point(torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -1.5])).item() == 0.0  # mean -0.25


def test_kto_hand_values():
    # h = [1, -1]; z0 = 1, beta = 0.5: desirable 1 - sigmoid(0) = 0.5, undesirable w_u (1 - sigmoid(0.5 * 2))
    logps = torch.tensor([-2.0, -4.0], requires_grad=True)
    losses, rewards = kto_loss(
        logps,
        torch.tensor([-3.0, -3.0]),
        torch.tensor([True, False]),
        torch.tensor(1.0),
        beta=0.5,
        undesirable_weight=2.0,
    )
    sigmoid_1 = 1 / (1 + math.exp(-1.0))
    assert losses.tolist() == pytest.approx([0.5, 2 * (1 - sigmoid_1)], abs=1e-6)
    assert rewards.tolist() == [0.5, -0.5] and not rewards.requires_grad and losses.requires_grad
