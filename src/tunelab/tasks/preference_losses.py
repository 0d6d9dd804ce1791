"""Pure loss functions for alignment: reward modelling (Bradley-Terry), DPO, the reference-free ORPO, SimPO and
CPO, KTO on unpaired feedback, and PPO.

Conventions: ``labels`` follow SFT (-100 on prompt and padding, ``logits[:, t]`` predicts ``labels[:, t + 1]``);
``mask`` tensors are 0/1 (or bool) over the same positions as the values they mask. Log-probs are natural logs.
"""

from __future__ import annotations

import math

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


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2`` (``log1p(-exp x)`` below it,
    ``log(-expm1 x)`` above: Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, *, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ORPO losses [B] and the rewards ``lam * log P`` (detached) of each reply (Hong et al. 2024,
    "ORPO: Monolithic Preference Optimization without Reference Model", eq. 6-7).

    With ``P = exp(mean_t log pi(y_t | x, y_<t))`` the length-averaged likelihood of a reply and
    ``odds(y) = P / (1 - P)``: ``L = -log P_c + lam * (-log sigmoid(log odds(y_c) - log odds(y_r)))``, where
    ``log odds(y) = log P - log(1 - P)`` (:func:`log1mexp`). The SFT term is the chosen reply's per-token NLL;
    trl's ``ORPOTrainer`` averages that NLL over the batch's prompt and reply tokens instead, and names ``lam``
    ``beta``; the odds-ratio term is trl's ``odds_ratio_loss``.
    """
    log_odds = (chosen_mean_logps - rejected_mean_logps) - (log1mexp(chosen_mean_logps) - log1mexp(rejected_mean_logps))
    losses = -chosen_mean_logps - lam * F.logsigmoid(log_odds)
    return losses, lam * chosen_mean_logps.detach(), lam * rejected_mean_logps.detach()


def simpo_loss(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, *, beta: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO losses [B] and the rewards ``beta * mean_t log pi`` (detached) of each reply (Meng et al.
    2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6).

    ``L = -log sigmoid(beta * (m_c - m_r) - gamma)`` with ``m`` the length-averaged reply log-prob and ``gamma``
    the target reward margin; no reference model. trl's ``CPOTrainer`` with ``loss_type="simpo"`` and
    ``cpo_alpha=0`` (its ``simpo_gamma`` is ``gamma``).
    """
    losses = -F.logsigmoid(beta * (chosen_mean_logps - rejected_mean_logps) - gamma)
    return losses, beta * chosen_mean_logps.detach(), beta * rejected_mean_logps.detach()


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    beta: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair CPO losses [B] and the rewards ``beta * log pi`` (detached) of each reply (Xu et al. 2024,
    "Contrastive Preference Optimization", eq. 3 plus the NLL term of its section 3).

    ``L = -log sigmoid(beta * (log pi(y_c|x) - log pi(y_r|x))) + alpha * NLL(y_c)``: DPO's sigmoid loss with the
    reference dropped (summed reply log-probs), plus ``alpha`` times the chosen reply's per-token negative
    log-likelihood ``chosen_nll``. trl's ``CPOTrainer`` (``loss_type="sigmoid"``, ``cpo_alpha=alpha``), which
    averages the NLL over the batch's chosen tokens rather than per pair.
    """
    losses = -F.logsigmoid(beta * (chosen_logps - rejected_logps)) + alpha * chosen_nll
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


def kto_reference_point(mismatched_logps: torch.Tensor, mismatched_ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0 = max(0, mean_i (log pi(y_j|x_i) - log ref(y_j|x_i)))`` (detached): the batch
    estimate of ``KL(pi || ref)`` from completions ``y_j`` scored after the prompts ``x_i`` of other examples,
    so that ``z0`` carries no gradient of the examples' own rewards (Ethayarajh et al. 2024, section 4.1; trl's
    ``KTOTrainer``)."""
    return (mismatched_logps - mismatched_ref_logps).mean().detach().clamp(min=0)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    z0: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO losses [N] and the implicit rewards ``r = beta * (log pi - log ref)`` (detached)
    (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 7-8).

    With ``h = log pi(y|x) - log ref(y|x)`` and the reference point ``z0`` (:func:`kto_reference_point`):
    ``L = w_d (1 - sigmoid(beta (h - z0)))`` for a desirable example (``desirable`` true, thumbs-up) and
    ``L = w_u (1 - sigmoid(beta (z0 - h)))`` for an undesirable one. The batch loss is the mean over its
    examples, as trl's ``KTOTrainer``; ``w_d n_d / (w_u n_u)`` in ``[1, 4/3]`` is the paper's advice for
    imbalanced feedback.
    """
    h = logps - ref_logps
    desirable = desirable.bool()
    value = torch.where(desirable, h - z0, z0 - h)
    weights = torch.where(desirable, h.new_tensor(desirable_weight), h.new_tensor(undesirable_weight))
    return weights * (1 - torch.sigmoid(beta * value)), beta * h.detach()


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
