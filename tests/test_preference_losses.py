"""Alignment losses: DPO against trl's DPOTrainer, hand-worked values for reward, DPO and PPO pieces."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.tokenization import IGNORE_INDEX
from tunelab.tasks.preference_losses import (
    bradley_terry_loss,
    clipped_policy_loss,
    clipped_value_loss,
    dpo_loss,
    entropy_from_logits,
    gae,
    kl_shaped_rewards,
    per_token_kl,
    sequence_logps,
    whiten,
)

# Sequence log-probs of 5 pairs (policy chosen / rejected, reference chosen / rejected) and reply lengths.
PI_C = torch.tensor([-12.5, -30.25, -7.0, -55.5, -3.125], dtype=torch.float64)
PI_R = torch.tensor([-14.0, -28.0, -9.5, -50.0, -3.0], dtype=torch.float64)
REF_C = torch.tensor([-13.0, -29.0, -8.0, -54.0, -3.5], dtype=torch.float64)
REF_R = torch.tensor([-13.5, -29.5, -8.25, -52.0, -2.75], dtype=torch.float64)
LEN_C = torch.tensor([6, 20, 4, 31, 2])
LEN_R = torch.tensor([7, 18, 5, 25, 3])


def trl_dpo(loss_type: str, beta: float, label_smoothing: float, index: int) -> tuple[float, float, float]:
    """(loss, chosen reward, rejected reward) of pair ``index`` by trl's ``DPOTrainer._compute_loss``.

    Called unbound on a namespace with the attributes it reads: precomputed reference log-probs and a stub model
    whose per-token log-probs sum to the pair's policy log-probs; ``completion_mask`` carries the reply lengths
    (IPO divides by them). trl >= 1.16 reads ``outputs.log_probs`` (its fused LM head), not logits.
    """
    trainer_module = pytest.importorskip("trl.trainer.dpo_trainer")
    lengths = torch.stack([LEN_C[index], LEN_R[index]])
    width = int(lengths.max()) + 2
    completion_mask = ((torch.arange(width) >= 1) & (torch.arange(width) <= lengths[:, None])).long()
    log_probs = torch.zeros(2, width - 1, dtype=torch.float64)
    log_probs[:, 0] = torch.stack([PI_C[index], PI_R[index]])  # the rest of each reply: log-prob 0
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
        loss_types=[loss_type],
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
        "ref_chosen_logps": REF_C[index : index + 1],
        "ref_rejected_logps": REF_R[index : index + 1],
    }
    loss = trainer_module.DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    metrics = trainer._metrics["train"]
    return loss.item(), metrics["rewards/chosen"][0], metrics["rewards/rejected"][0]


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_and_hinge_equal_trl(loss_type, beta):
    pytest.importorskip("trl", minversion="1.16")
    losses, chosen_rewards, rejected_rewards = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=beta, loss_type=loss_type)
    for index in range(len(PI_C)):
        expected = trl_dpo(loss_type, beta, 0.0, index)
        ours = (losses[index].item(), chosen_rewards[index].item(), rejected_rewards[index].item())
        assert ours == pytest.approx(expected, abs=1e-6)


def test_dpo_ipo_equals_trl_on_per_token_mean_logps():
    pytest.importorskip("trl", minversion="1.16")
    beta = 0.5
    losses, _, _ = dpo_loss(PI_C / LEN_C, PI_R / LEN_R, REF_C / LEN_C, REF_R / LEN_R, beta=beta, loss_type="ipo")
    for index in range(len(PI_C)):
        assert losses[index].item() == pytest.approx(trl_dpo("ipo", beta, 0.0, index)[0], abs=1e-6)


def test_dpo_label_smoothing_equals_trl_conservative_form():
    """trl 1.x's ``sigmoid`` ignores label_smoothing; its ``aot`` loss applies the same conservative-DPO form
    to sorted log-ratio margins, which for a single pair (nothing to sort) is exactly cDPO."""
    pytest.importorskip("trl", minversion="1.16")
    beta, eps = 0.5, 0.2
    losses, _, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=beta, label_smoothing=eps)
    for index in range(len(PI_C)):
        assert losses[index].item() == pytest.approx(trl_dpo("aot", beta, eps, index)[0], abs=1e-6)


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
