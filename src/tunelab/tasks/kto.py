"""Kahneman-Tversky optimisation (task=kto; Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization") on unpaired feedback: one reply per prompt with a thumbs-up or a thumbs-down
(:mod:`tunelab.data.feedback`; preference pairs give one of each).

With ``h = log pi(y|x) - log ref(y|x)`` (summed reply log-probs, as trl) and the reference point
``z0 = max(0, mean over the batch of log pi(y'|x) - log ref(y'|x))``, ``y'`` a completion of another prompt of the
split (no gradient), per example (:func:`tunelab.tasks.preference_losses.kto_loss`)::

    L = desirable_weight   * (1 - sigmoid(beta (h - z0)))     thumbs-up
    L = undesirable_weight * (1 - sigmoid(beta (z0 - h)))     thumbs-down

averaged over the batch's examples. The reference (``task.reference``: ``adapter_disabled``, ``copy`` or
``precomputed``) is DPO's (:class:`tunelab.tasks.reference_scored.ReferenceScoredModule`), over each example's
completion and mismatched rows.

Logged per stage: ``loss``, ``kl`` (``z0``), ``rewards/chosen`` / ``rewards/rejected`` (mean implicit reward
``beta h`` of the batch's thumbs-up / thumbs-down examples, 0 for a batch without any), ``rewards/margin`` (their
difference) and ``rewards/accuracy``: the share of examples on the feedback's side of the reference point,
``beta h > beta z0`` for a thumbs-up and ``<`` for a thumbs-down (a tie counts as wrong, so 0 at the start).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from tunelab.data.datamodule import FeedbackDataModule
from tunelab.errors import ConfigError
from tunelab.methods.spec import Method
from tunelab.tasks.objective import OBJECTIVES, BuildContext, Objective
from tunelab.tasks.pairwise import PAIR_STATISTICS, reply_logps, split_pairs
from tunelab.tasks.preference_losses import kto_loss, kto_reference_point, masked_mean
from tunelab.tasks.reference_free import check_number
from tunelab.tasks.reference_scored import ReferenceScoredModule, check_reference_config, reference_identity

FEEDBACK_DATA = "data=arith_feedback, data=feedback, or a preference data config (data=arith_prefs)"


def check_kto_config(cfg: DictConfig, method: Method) -> None:
    """``task.beta`` and both weights > 0, ``data.desirable_share`` null or in (0, 1), and the reference."""
    check_number(cfg.task, "beta", lambda v: v > 0, "> 0: the inverse temperature of beta (log pi - log ref)")
    for key in ("desirable_weight", "undesirable_weight"):
        check_number(cfg.task, key, lambda v: v > 0, "> 0: the weight of its examples' losses")
    share = cfg.data.get("desirable_share")
    if share is not None and not (isinstance(share, float) and 0 < share < 1):
        raise ConfigError(f"data.desirable_share={share} must be null (as read) or a share in (0, 1), e.g. 0.8")
    check_reference_config(cfg, method)


def feedback_statistics(rewards: torch.Tensor, desirable: torch.Tensor, point: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean reward of the thumbs-up and of the thumbs-down examples, the share on the feedback's side of the
    reference ``point`` (``beta z0``), and the margin (see the module docstring)."""
    chosen, rejected = masked_mean(rewards, desirable), masked_mean(rewards, ~desirable)
    agrees = torch.where(desirable, rewards > point, rewards < point).float().mean()
    return dict(zip(PAIR_STATISTICS, (chosen, rejected, agrees, chosen - rejected), strict=True))


class KTOModule(ReferenceScoredModule):
    STATISTICS = ("kl",)

    def pair_outputs(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-example losses [N] of the batch's N examples (rows ``:N``; rows ``N:`` are their mismatched rows)."""
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, mismatched_logps = split_pairs(reply_logps(logits, batch, average=False))
        ref_logps, mismatched_ref_logps = split_pairs(self.reference_logps(batch, stage))
        z0 = kto_reference_point(mismatched_logps, mismatched_ref_logps)
        losses, rewards = kto_loss(
            logps,
            ref_logps,
            batch["desirable"],
            z0,
            beta=float(self.cfg.beta),
            desirable_weight=float(self.cfg.desirable_weight),
            undesirable_weight=float(self.cfg.undesirable_weight),
        )
        statistics = feedback_statistics(rewards, batch["desirable"], float(self.cfg.beta) * z0)
        return losses, {**statistics, "kl": z0}


def build_kto(context: BuildContext) -> tuple[FeedbackDataModule, KTOModule]:
    """Feedback examples and the KTO module; the reference's cache identity is the model config (as JSON)."""
    cfg = context.cfg
    datamodule = FeedbackDataModule(cfg.data, context.tokenizer, cfg.paths.cache_dir)
    method = context.method
    module = KTOModule(
        context.model, cfg.task, method.trains_all_weights, method.trains_base_in_place, reference_identity(cfg)
    )
    return datamodule, module


OBJECTIVES.register(
    Objective(
        name="kto",
        build=build_kto,
        data_kind=("feedback", "preference"),
        data_hint=FEEDBACK_DATA,
        check=check_kto_config,
    )
)
