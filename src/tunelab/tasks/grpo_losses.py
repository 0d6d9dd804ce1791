"""Group-relative policy optimisation losses (GRPO, Shao et al., 2024) and the variants Dr. GRPO (Liu et al., 2025),
DAPO (Yu et al., 2025) and GSPO (Zheng et al., 2025), and RLOO's leave-one-out REINFORCE (Ahmadian et al., 2024),
as pure functions of fixed tensors.

Shapes: ``N`` prompts with ``G`` completions each, laid out group by group (rows ``g * G ... g * G + G - 1`` are
prompt ``g``'s), ``B = N * G`` rows of ``T`` completion tokens, ``mask`` [B, T] (1 on a completion's tokens).
``logps`` are the policy's per-token log-probs ``log pi(a_t)``, ``old_logps`` those of the policy that sampled
(``pi_old``), ``ref_logps`` the reference's; all three are 0 off the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "gspo")


def group_advantages(
    rewards: torch.Tensor, num_generations: int, *, scale: bool = True, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-completion advantages [B] and the zero-variance groups [N] (bool).

    ``A_i = r_i - mean_g(r)``, divided by ``std_g(r) + eps`` when ``scale`` (GRPO; Dr. GRPO: no division), with the
    group's sample standard deviation ``std_g = sqrt(sum_j (r_j - mean_g)^2 / (G - 1))`` (as trl). A group whose
    rewards are all equal (``max_g = min_g``) carries no signal: it is flagged and its advantages are exactly 0."""
    grouped = rewards.view(-1, num_generations)
    advantages = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(-1, keepdim=True) + eps)
    flat = grouped.amax(-1) == grouped.amin(-1)
    return advantages.masked_fill(flat.unsqueeze(-1), 0.0).reshape(-1), flat


def leave_one_out_advantages(
    rewards: torch.Tensor, num_generations: int, *, normalize: bool = False, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO's advantages [B] and the zero-variance groups [N]: ``A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j``
    (the mean of the group's other completions as the baseline, which equals ``G / (G - 1) (r_i - mean_g r)``),
    then, when ``normalize``, whitened over the batch, ``(A - mean A) / (std A + eps)`` (sample std, as trl). A group
    whose rewards are all equal is flagged; its advantages are 0 before whitening."""
    grouped = rewards.view(-1, num_generations)
    baselines = (grouped.sum(-1, keepdim=True) - grouped) / (num_generations - 1)
    flat = grouped.amax(-1) == grouped.amin(-1)
    advantages = (grouped - baselines).masked_fill(flat.unsqueeze(-1), 0.0).reshape(-1)
    if normalize:
        advantages = whiten(advantages, moments(advantages), eps)
    return advantages, flat


def moments(values: torch.Tensor) -> torch.Tensor:
    """``[n, sum x, sum x^2]`` of ``values`` (float64): what :func:`whiten` needs, summable over ranks."""
    values = values.detach().double()
    return torch.stack([torch.tensor(float(values.numel()), dtype=torch.float64), values.sum(), (values**2).sum()])


def whiten(values: torch.Tensor, population: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x - mean) / (std + eps)`` with the mean and sample std of the population whose :func:`moments` are
    ``population`` (a batch spread over ranks: their moments summed)."""
    mean, std = mean_and_std(*population)
    return ((values - mean) / (std + eps)).to(values.dtype)


def mean_and_std(count: torch.Tensor, total: torch.Tensor, squares: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sample standard deviation (``n - 1``) from ``n``, ``sum x`` and ``sum x^2`` (0 below 2 values)."""
    mean = total / count
    return mean, ((squares - count * mean**2) / (count - 1).clamp(min=1)).clamp(min=0).sqrt()


def leave_groups_out(groups: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Row mask [B] (bool) of the completions whose group is not flagged in ``groups`` [N] (DAPO's dynamic
    sampling, skip variant: the zero-variance groups' rows are dropped from the loss)."""
    return ~groups.repeat_interleave(num_generations)


def truncation_mask(mask: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
    """``mask`` with the rows of completions cut at the length cap (no EOS, ``ended`` false) zeroed: DAPO's overlong
    filtering, so a truncated answer neither earns nor loses anything."""
    return mask * ended.unsqueeze(-1).to(mask.dtype)


def soft_overlong_penalty(lengths: torch.Tensor, max_length: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Eq. 13), added to the rewards: with ``L = lengths`` (completion tokens),
    ``L_max = max_length`` and ``L_c = cache``:

    ``0`` if ``L <= L_max - L_c``; ``((L_max - L_c) - L) / L_c`` if ``L_max - L_c < L <= L_max``; ``-1`` if
    ``L > L_max``."""
    start = max_length - cache
    ramp = (start - lengths.float()) / cache
    return torch.where(lengths <= start, torch.zeros_like(ramp), torch.where(lengths <= max_length, ramp, -1.0))


def sequence_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RLOO's KL estimate per completion [B] (trl's ``RLOOTrainer``, after Ahmadian et al., 2024): the first-order
    log ratio summed over the completion's tokens, ``KL_i = sum_t m_t (log pi_old(a_t) - log pi_ref(a_t))`` (can be
    negative, unlike k3); the reward penalty is ``r_i - beta KL_i``."""
    return ((logps - ref_logps) * mask).sum(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per sampled token (Schulman, 2020): ``exp(d) - d - 1`` with
    ``d = log pi_ref(a_t) - log pi(a_t)``; non-negative, 0 where the two agree."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def log_importance_weights(
    logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, *, sequence_level: bool
) -> torch.Tensor:
    """``log rho``: per token ``log pi(a_t) - log pi_old(a_t)`` [B, T]; at sequence level (GSPO) the log of the
    geometric mean of the token ratios, ``log s_i = sum_t m_t (log pi - log pi_old) / max(sum_t m_t, 1)`` [B, 1]."""
    log_ratio = logps - old_logps
    if not sequence_level:
        return log_ratio
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)


def clipped_surrogate(
    log_weights: torch.Tensor, advantages: torch.Tensor, *, epsilon_low: float, epsilon_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped policy-gradient surrogate, per token [B, T] (or per sequence [B, 1]), and where it is clipped.

    ``l = -min(rho A, clamp(rho, 1 - eps_low, 1 + eps_high) A)`` with ``rho = exp(log_weights)`` and the
    sequence's advantage ``A`` [B]; asymmetric bounds are DAPO's clip-higher. Clipped (no gradient through ``rho``):
    ``rho < 1 - eps_low`` with ``A < 0``, or ``rho > 1 + eps_high`` with ``A > 0``."""
    advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(log_weights)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    clipped = ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    return loss, clipped


@dataclass
class PolicyLoss:
    """The loss and its diagnostics (detached): clipped share of the tokens (of the sequences for GSPO), mean
    per-token k3 KL (0 without a reference)."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    kl: torch.Tensor


def sequence_ratio_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
) -> PolicyLoss:
    """RLOO's REINFORCE loss with a clipped sequence ratio (trl's ``RLOOTrainer``): ``rho_i = pi(y_i) / pi_old(y_i) =
    exp(sum_t m_t (log pi - log pi_old))`` (the product of the token ratios, not GSPO's geometric mean),
    ``loss = (1 / B) sum_i -min(rho_i A_i, clamp(rho_i, 1 - eps_low, 1 + eps_high) A_i)``; its gradient at
    ``rho = 1`` is REINFORCE's ``-A_i grad log pi(y_i)``. Clip fraction over the sequences; no KL term."""
    log_ratio = ((logps - old_logps) * mask).sum(-1, keepdim=True)
    per_sequence, clipped = clipped_surrogate(log_ratio, advantages, epsilon_low=epsilon_low, epsilon_high=epsilon_high)
    zero = torch.zeros((), device=logps.device)
    return PolicyLoss(per_sequence.mean(), clipped.float().mean().detach(), zero)


def aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_length: int) -> torch.Tensor:
    """The scalar loss of ``per_token_loss`` [B, T] over the ``mask``-ed tokens, ``B`` rows:

    - ``grpo``, ``gspo``: ``(1 / B) sum_i sum_t m_it l_it / max(sum_t m_it, 1)`` (token mean per sequence, then
      mean over sequences);
    - ``dr_grpo``: ``sum_it m_it l_it / (B L_max)``, ``L_max = max_length`` (a constant: no length bias);
    - ``dapo``: ``sum_it m_it l_it / max(sum_it m_it, 1)`` (token mean over the whole batch)."""
    masked = per_token_loss * mask
    if loss_type in ("grpo", "gspo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "dr_grpo":
        return masked.sum() / (mask.shape[0] * max_length)
    if loss_type == "dapo":
        return masked.sum() / mask.sum().clamp(min=1)
    raise ValueError(f"loss_type={loss_type!r} is not one of {list(LOSS_TYPES)}")


def chunk_share(chunk_mask: torch.Tensor, batch_mask: torch.Tensor, loss_type: str) -> float:
    """Weight ``w`` of a chunk of the batch's rows such that ``sum over chunks of w * aggregate(chunk)`` equals
    ``aggregate(batch)`` exactly (gradient accumulation over chunks): ``rows(chunk) / rows(batch)`` for the
    per-sequence aggregations (``grpo``, ``gspo``, ``dr_grpo``), ``tokens(chunk) / max(tokens(batch), 1)`` for
    ``dapo``'s token mean."""
    if loss_type == "dapo":
        return float(chunk_mask.sum() / batch_mask.sum().clamp(min=1))
    return chunk_mask.shape[0] / batch_mask.shape[0]


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    max_length: int,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> PolicyLoss:
    """``aggregate(l + beta * k3_kl(logps, ref_logps))`` with ``l`` the :func:`clipped_surrogate` of the token
    importance weights, or of GSPO's sequence weights (``loss_type=gspo``, broadcast over the tokens); the KL term is
    left out when ``beta = 0``."""
    sequence_level = loss_type == "gspo"
    log_weights = log_importance_weights(logps, old_logps, mask, sequence_level=sequence_level)
    per_token, clipped = clipped_surrogate(log_weights, advantages, epsilon_low=epsilon_low, epsilon_high=epsilon_high)
    kl = torch.zeros((), device=logps.device)
    if beta != 0.0:
        token_kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * token_kl
        kl = (token_kl * mask).sum().detach() / mask.sum().clamp(min=1)
    per_token = per_token.expand_as(mask) if sequence_level else per_token
    loss = aggregate(per_token, mask, loss_type, max_length)
    # per sequence for GSPO (one weight each), else per completion token
    clipped_share = clipped.float().mean() if sequence_level else (clipped * mask).sum() / mask.sum().clamp(min=1)
    return PolicyLoss(loss, clipped_share.detach(), kl)
