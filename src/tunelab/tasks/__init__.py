"""The objective axis (``task=``): one LightningModule per objective, each registering an
:class:`~tunelab.tasks.objective.Objective` in :data:`OBJECTIVES` from its own file. The imports below are the
registration list of the built-in objectives (a plugin registers its own the same way)."""

from tunelab.tasks import classification, distill, dpo, ppo, reward, sft  # noqa: F401
from tunelab.tasks.objective import OBJECTIVES

__all__ = ["OBJECTIVES"]
