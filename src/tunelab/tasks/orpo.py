"""Odds ratio preference optimisation (task=orpo; Hong et al. 2024, "ORPO: Monolithic Preference Optimization
without Reference Model").

SFT and preference in one loss, with no reference model (:mod:`tunelab.tasks.reference_free`). With
``P(y|x) = exp(mean_t log pi(y_t | x, y_<t))`` the length-averaged likelihood of a reply and
``odds(y|x) = P / (1 - P)``, per pair (:func:`tunelab.tasks.preference_losses.orpo_loss`)::

    L = -mean_t log pi(y_c) - lambda * log sigmoid(log odds(y_c|x) - log odds(y_r|x))

``task.lam`` is lambda (trl's ``beta``). The implicit reward of a reply is ``lambda * mean_t log pi``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from tunelab.methods.spec import Method
from tunelab.tasks.objective import OBJECTIVES
from tunelab.tasks.preference_losses import orpo_loss
from tunelab.tasks.reference_free import (
    PairLosses,
    ReferenceFreeModule,
    Replies,
    check_number,
    reference_free_objective,
)


def check_orpo_config(cfg: DictConfig, method: Method) -> None:
    """``task.lam`` (the odds-ratio term's weight) is a number > 0."""
    check_number(cfg.task, "lam", lambda v: v > 0, "> 0: the weight of the odds-ratio term (0.1 in the paper)")


class ORPOModule(ReferenceFreeModule):
    def pair_losses(self, replies: Replies) -> PairLosses:
        return orpo_loss(replies.chosen_mean, replies.rejected_mean, lam=float(self.cfg.lam))


OBJECTIVES.register(reference_free_objective("orpo", ORPOModule, check_orpo_config))
