"""Contrastive preference optimisation (task=cpo; Xu et al. 2024, "Contrastive Preference Optimization: Pushing
the Boundaries of LLM Performance in Machine Translation").

DPO's sigmoid loss with the reference dropped, plus an SFT term on the chosen reply, with no reference model
(:mod:`tunelab.tasks.reference_free`); per pair (:func:`tunelab.tasks.preference_losses.cpo_loss`)::

    L = -log sigmoid(beta * (log pi(y_c|x) - log pi(y_r|x))) - alpha * mean_t log pi(y_c,t | x, y_c,<t)

with summed reply log-probs in the first term. ``task.beta`` is the inverse temperature, ``task.alpha`` the SFT
term's weight (trl's ``cpo_alpha``). The implicit reward of a reply is ``beta * log pi(y|x)``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from tunelab.methods.spec import Method
from tunelab.tasks.objective import OBJECTIVES
from tunelab.tasks.preference_losses import cpo_loss
from tunelab.tasks.reference_free import (
    PairLosses,
    ReferenceFreeModule,
    Replies,
    check_number,
    reference_free_objective,
)


def check_cpo_config(cfg: DictConfig, method: Method) -> None:
    """``task.beta`` > 0 and an SFT weight ``task.alpha`` >= 0."""
    check_number(cfg.task, "beta", lambda v: v > 0, "> 0: the inverse temperature of beta * log pi (0.1 in trl)")
    check_number(cfg.task, "alpha", lambda v: v >= 0, ">= 0: the weight of the chosen reply's NLL (1.0 in trl)")


class CPOModule(ReferenceFreeModule):
    def pair_losses(self, replies: Replies) -> PairLosses:
        return cpo_loss(
            replies.chosen,
            replies.rejected,
            -replies.chosen_mean,
            beta=float(self.cfg.beta),
            alpha=float(self.cfg.alpha),
        )


OBJECTIVES.register(reference_free_objective("cpo", CPOModule, check_cpo_config))
