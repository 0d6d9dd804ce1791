"""Direct preference optimisation (task=dpo).

With sequence log-probs of the reply tokens under the policy ``pi`` and a fixed reference ``ref``,
``h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))`` and the per-pair loss is
``task.loss_type``'s: ``sigmoid`` (DPO; conservative DPO with ``task.label_smoothing``), ``ipo`` or ``hinge``
(:func:`tunelab.tasks.preference_losses.dpo_loss`, trl's definitions). The implicit reward of a reply is
``beta (log pi - log ref)``; ``rewards/accuracy`` is the share of pairs where the chosen reply's is higher.
``logps/accuracy`` and ``ref_logps/accuracy`` are the same ranking by the policy's and the reference's own
log-probs (the reference's is the starting, e.g. SFT, model's: what DPO has to improve on).

The reference (``task.reference``: ``adapter_disabled``, ``copy`` or ``precomputed``) is
:class:`tunelab.tasks.reference_scored.ReferenceScoredModule`'s, over the chosen and rejected rows of each pair.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from tunelab.data.datamodule import PreferenceDataModule
from tunelab.errors import ConfigError
from tunelab.methods.spec import Method
from tunelab.tasks.objective import OBJECTIVES, BuildContext, Objective
from tunelab.tasks.pairwise import (
    LOGPS_STATISTICS,
    PREFERENCE_DATA,
    logps_statistics,
    pair_statistics,
    reply_logps,
    split_pairs,
)
from tunelab.tasks.preference_losses import DPO_LOSS_TYPES, dpo_loss
from tunelab.tasks.reference_scored import ReferenceScoredModule, check_reference_config, reference_identity


def check_dpo_loss(task_cfg: DictConfig) -> None:
    """The loss type, a positive ``beta`` (every loss scales by it, IPO's target is ``1 / (2 beta)``), and label
    smoothing only for sigmoid DPO."""
    beta = task_cfg.beta
    if not (isinstance(beta, int | float) and not isinstance(beta, bool) and beta > 0):
        raise ConfigError(
            f"task.beta={beta} must be > 0: the implicit reward is beta (log pi - log ref) and loss_type=ipo divides "
            "by beta; set task.beta=0.1 (the default) or another positive value"
        )
    if task_cfg.loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"task.loss_type={task_cfg.loss_type!r} is not one of {list(DPO_LOSS_TYPES)}")
    if task_cfg.label_smoothing and task_cfg.loss_type != "sigmoid":
        raise ConfigError(
            f"task.label_smoothing={task_cfg.label_smoothing} (conservative DPO) applies to loss_type=sigmoid only"
        )


def check_dpo_config(cfg: DictConfig, method: Method) -> None:
    """task=dpo settings that cannot work, refused with one sentence before any weights load (the module refuses
    them again): :func:`check_dpo_loss`, and the reference for the method."""
    check_dpo_loss(cfg.task)
    check_reference_config(cfg, method)


class DPOModule(ReferenceScoredModule):
    STATISTICS = (*LOGPS_STATISTICS, "ref_logps/accuracy")

    def averages(self, task_cfg: DictConfig) -> bool:
        """``task.average_logps``, or for ``null`` whether the loss is IPO (as trl); the loss settings are checked
        first (:func:`check_dpo_loss`)."""
        check_dpo_loss(task_cfg)
        average = task_cfg.average_logps
        return task_cfg.loss_type == "ipo" if average is None else bool(average)

    def pair_outputs(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        policy_chosen, policy_rejected = split_pairs(reply_logps(logits, batch, self.average))
        ref_chosen, ref_rejected = split_pairs(self.reference_logps(batch, stage))
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            beta=float(self.cfg.beta),
            loss_type=self.cfg.loss_type,
            label_smoothing=float(self.cfg.label_smoothing),
        )
        statistics = {
            **pair_statistics(chosen_rewards, rejected_rewards),
            **logps_statistics(policy_chosen, policy_rejected),
            "ref_logps/accuracy": (ref_chosen > ref_rejected).float().mean(),
        }
        return losses, statistics


def build_dpo(context: BuildContext) -> tuple[PreferenceDataModule, DPOModule]:
    """Preference pairs and the DPO module; the reference's cache identity is the model config (as JSON)."""
    cfg = context.cfg
    identity = reference_identity(cfg)
    datamodule = PreferenceDataModule(cfg.data, context.tokenizer, cfg.paths.cache_dir)
    method = context.method
    return datamodule, DPOModule(
        context.model, cfg.task, method.trains_all_weights, method.trains_base_in_place, identity
    )


OBJECTIVES.register(
    Objective(
        name="dpo",
        build=build_dpo,
        data_kind="preference",
        data_hint=PREFERENCE_DATA,
        check=check_dpo_config,
    )
)
