"""The objective axis (``task=``): what each objective declares, and :data:`OBJECTIVES`, their registry.

An objective is one LightningModule plus an :class:`Objective` entry registered in the module's own file. The
composition root (:mod:`tunelab.build`) asks the entry for the model head it needs, checks the data kind and
its config, then calls ``build`` with a :class:`BuildContext`; nothing else knows the objective's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.errors import ConfigError
from tunelab.methods.spec import Method
from tunelab.registry import Registry

Head = tuple[str, "list[str] | None"]  # (model head: causal_lm | sequence_classification, its label set)
# a finished run's export folder -> (model, tokenizer, the run's config): tunelab.runs.load_export
LoadRun = Callable[[str], tuple[torch.nn.Module, Any, DictConfig]]


@dataclass(frozen=True)
class BuildContext:
    """What an objective's ``build`` receives: the run config, the adapted model and its tokenizer, the method's
    entry, and ``load_run(export_dir)`` -> ``(model, tokenizer, run config)`` of a finished run (a distillation
    teacher, a reward model)."""

    cfg: DictConfig
    model: torch.nn.Module
    tokenizer: Any
    method: Method
    load_run: LoadRun


def no_check(cfg: DictConfig, method: Method) -> None:
    """The default config check: nothing beyond the shared ones."""


def causal_lm_head(cfg: DictConfig) -> Head:
    return "causal_lm", None


def labeled_head(cfg: DictConfig) -> Head:
    """A sequence-classification head over the data config's label set (``data.labels``)."""
    if not cfg.data.get("labels"):
        raise ConfigError(f"task={cfg.task.name} needs data.labels (the label set); data={cfg.data.name} has none")
    return "sequence_classification", list(cfg.data.labels)


@dataclass(frozen=True)
class Objective:
    """One ``task=`` option.

    - ``build(context) -> (datamodule, module)``
    - ``head(cfg) -> (head, labels)``: the model head it trains (default: the causal LM head)
    - ``data_kind``: the ``kind`` of data config it reads (``preference``, ``prompts``; ``None``: instruction or
      labeled records, data configs without a ``kind``), or a tuple of the kinds it reads, and ``data_hint``
      naming such a config for the refusal
    - ``packs``: reads packed SFT batches when ``data.packing=true``
    - ``check(cfg, method)``: its own config check (raise :class:`ConfigError`)
    """

    name: str
    build: Callable[[BuildContext], tuple[Any, Any]]
    head: Callable[[DictConfig], Head] = causal_lm_head
    data_kind: str | tuple[str, ...] | None = None
    data_hint: str = ""
    packs: bool = False
    check: Callable[[DictConfig, Method], None] = field(default=no_check)


OBJECTIVES: Registry[Objective] = Registry("task")


def check_data_kind(cfg: DictConfig, objective: Objective) -> None:
    """The data config holds the record kind the objective reads."""
    kind = cfg.data.get("kind")
    kinds = objective.data_kind if isinstance(objective.data_kind, tuple) else (objective.data_kind,)
    if kind not in kinds:
        reads = " or ".join(k or "instruction / labeled" for k in kinds)
        hint = f"; use {objective.data_hint}" if objective.data_hint else ""
        raise ConfigError(
            f"task={objective.name} reads {reads} records, but data={cfg.data.name} holds "
            f"{kind or 'instruction / labeled'} records{hint}"
        )
