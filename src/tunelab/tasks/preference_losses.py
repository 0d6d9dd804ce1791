"""Pure loss functions for alignment: reward modelling (Bradley-Terry), DPO and PPO.

Conventions: ``labels`` follow SFT (-100 on prompt and padding, ``logits[:, t]`` predicts ``labels[:, t + 1]``);
``mask`` tensors are 0/1 (or bool) over the same positions as the values they mask. Log-probs are natural logs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.data.tokenization import IGNORE_INDEX

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(x * m) / max(sum(m), 1)`` over ``dim`` (over all elements when ``None``); 0 where nothing is valid."""
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log softmax(logits[:, t])[labels[:, t + 1]]`` ([B, T-1], 0 where the label is -100) and the
    mask ``labels[:, 1:] != -100``. Computed in float32 as ``logit[label] - logsumexp(logits)``."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    shifted = logits[:, :-1].float()
    picked = shifted.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(shifted, dim=-1)).masked_fill(~mask, 0.0), mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """``log p(response) = sum_t log p(labels[:, t + 1] | logits[:, t])`` over the supervised tokens ([B]);
    ``average=True`` divides by their count (the per-token mean that trl feeds to the IPO loss)."""
    logps, mask = token_logps(logits, labels)
    summed = logps.sum(-1)
    return summed / mask.sum(-1).clamp(min=1) if average else summed


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair reward-model losses ``-log sigmoid(r_chosen - r_rejected)``."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses [B] and the implicit rewards ``beta * (log pi - log pi_ref)`` (detached) of each reply.

    With ``h = (pi_c - ref_c) - (pi_r - ref_r)`` (sequence log-probs of chosen c / rejected r):

    - ``sigmoid`` (DPO; conservative DPO when ``eps = label_smoothing > 0``):
      ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``
    - ``ipo``: ``(h - 1 / (2 beta))^2``; trl passes per-token mean log-probs here
      (:func:`sequence_logps` with ``average=True``)
    - ``hinge`` (SLiC): ``relu(1 - beta h)``

    These are trl's definitions (``DPOTrainer``); label smoothing applies to ``sigmoid`` only.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {list(DPO_LOSS_TYPES)}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing={label_smoothing} applies to loss_type='sigmoid' only, not {loss_type!r}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 estimator of KL(pi || pi_ref) per sampled token: ``log pi(a_t) - log pi_ref(a_t)``."""
    return logprobs - ref_logprobs


def kl_shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token PPO rewards [B, T]: ``-kl_coef * kl_t`` on valid tokens, plus ``scores[b]`` (the sequence score)
    at the last valid token of row ``b``; 0 where masked (a row without valid tokens gets nothing)."""
    mask = mask.to(kl.dtype)
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
    at_last = F.one_hot(last, mask.shape[1]).to(kl.dtype) * mask
    return (-kl_coef * kl + scores.unsqueeze(1) * at_last) * mask


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over [B, T] (no gradient), bootstrapping with 0 after the last valid token.

    Backwards over t, with ``m`` the mask and ``V_T = A_T = 0``:
    ``delta_t = r_t + gamma m_{t+1} V_{t+1} - V_t``, ``A_t = m_t (delta_t + gamma lam m_{t+1} A_{t+1})``;
    returns ``R_t = m_t (A_t + V_t)``. Advantages and returns are 0 at masked positions.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_value = next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t], next_value = next_advantage, values[:, t]
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mu) / sqrt(var + eps)`` with the masked mean ``mu`` and (population) variance ``var``; 0 where masked."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip: ``masked_mean(max(-A rho, -A clamp(rho, 1 - clip, 1 + clip)))`` with ``rho = exp(logp - logp_old)``,
    and the clip fraction: the share of valid tokens where the clipped term is the larger (detached)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).to(loss.dtype), mask).detach()


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> torch.Tensor:
    """``0.5 masked_mean(max((V - R)^2, (V_clip - R)^2))`` with ``V_clip = V_old + clamp(V - V_old, -clip, clip)``."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dimension, ``H = -sum_v p_v log p_v`` (float32)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)
