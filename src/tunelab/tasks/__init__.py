"""The objective axis (``task=``): one LightningModule per objective, each registering an
:class:`~tunelab.tasks.objective.Objective` in :data:`OBJECTIVES` from its own file. Every module of this package
is imported here, so a new objective is its file and its YAML (a plugin registers its own entries the same way
from its own package)."""

from tunelab.registry import import_submodules
from tunelab.tasks.objective import OBJECTIVES

import_submodules(__name__, __path__)

__all__ = ["OBJECTIVES"]
