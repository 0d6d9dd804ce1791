"""Simple preference optimisation (task=simpo; Meng et al. 2024, "SimPO: Simple Preference Optimization with a
Reference-Free Reward").

The implicit reward of a reply is its length-normalised log-prob ``r(y|x) = beta * mean_t log pi(y_t | x, y_<t)``,
with no reference model (:mod:`tunelab.tasks.reference_free`); per pair
(:func:`tunelab.tasks.preference_losses.simpo_loss`)::

    L = -log sigmoid(r(y_c|x) - r(y_r|x) - gamma)

``task.beta`` scales the reward, ``task.gamma`` is the target reward margin (the paper's gamma; trl's
``simpo_gamma`` of ``CPOTrainer`` with ``loss_type=simpo``).
"""

from __future__ import annotations

from omegaconf import DictConfig

from tunelab.methods.spec import Method
from tunelab.tasks.objective import OBJECTIVES
from tunelab.tasks.preference_losses import simpo_loss
from tunelab.tasks.reference_free import (
    PairLosses,
    ReferenceFreeModule,
    Replies,
    check_number,
    reference_free_objective,
)


def check_simpo_config(cfg: DictConfig, method: Method) -> None:
    """``task.beta`` > 0 (the reward's scale) and a target margin ``task.gamma`` >= 0."""
    check_number(cfg.task, "beta", lambda v: v > 0, "> 0: the reward scale (2.0 to 2.5 in the paper)")
    check_number(cfg.task, "gamma", lambda v: v >= 0, ">= 0: the target reward margin (0.5 to 1.5 in the paper)")


class SimPOModule(ReferenceFreeModule):
    def pair_losses(self, replies: Replies) -> PairLosses:
        return simpo_loss(
            replies.chosen_mean,
            replies.rejected_mean,
            beta=float(self.cfg.beta),
            gamma=float(self.cfg.gamma),
        )


OBJECTIVES.register(reference_free_objective("simpo", SimPOModule, check_simpo_config))
