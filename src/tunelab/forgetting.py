"""Forgetting, measured: the model's loss on held-out general text before and after training.

- Sets (:data:`SETS`, ``forgetting.sets``): packaged text no tunelab data set trains on. ``verne``: "In the Year
  2889" (Jules and Michel Verne, public domain), 31 passages of English prose from the reasoning-gym package
  (:mod:`tunelab.assets.verne`).
- Score of a set (:func:`score_general`): the mean next-token negative log-likelihood, in nats per token, over its
  first ``forgetting.max_passages`` passages (null: all). Each passage is tokenized on its own (with the tokenizer's
  own special tokens) and cut to ``forgetting.max_length`` tokens; every token after the first is predicted; the
  sum over the set divided by the number of predicted tokens (token-weighted, as ``val/loss``). Plain text, no
  chat template: what the model knows of English, not how it answers.
- Metrics (:class:`Forgetting`): ``forgetting/<set>/before`` (the untrained model, where the run validates it
  first), ``forgetting/<set>/after`` (the weights the run ends with: the best checkpoint when it tests or loads
  it), ``forgetting/<set>/change`` = after - before (> 0: the run lost some of it). A resumed run, or one with
  ``validate_before_training=false``, has only ``after``.

Scoring puts the model in eval mode on the run's device (a CUDA GPU when the trainer uses one), under ``no_grad``,
and restores its mode and device after: it draws no random numbers, so a run scores the same with it on or off.
Sharded strategies (FSDP, ZeRO-3) and models that are not causal LMs are refused by :func:`check_forgetting`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.assets.verne import ensure_verne
from tunelab.errors import ConfigError
from tunelab.tasks import OBJECTIVES
from tunelab.trainer_config import shards_parameters, uses_gpu

SETS: dict[str, Callable[[str | Path], Path]] = {"verne": ensure_verne}
PREFIX = "forgetting"
IGNORE_INDEX = -100


def check_forgetting(cfg: DictConfig) -> None:
    """A :class:`ConfigError` for ``forgetting.*`` values that cannot work (nothing to check when ``sets`` is
    empty): an unknown set, a count below 1, a model that is not a causal LM, a sharded strategy."""
    settings = cfg.forgetting
    sets = list(settings.sets)
    if not sets:
        return
    unknown = [name for name in sets if name not in SETS]
    if unknown:
        raise ConfigError(f"forgetting.sets: unknown set(s) {unknown}; valid: {list(SETS)}")
    for key in ("max_length", "batch_size"):
        if not isinstance(settings[key], int) or settings[key] < 1:
            raise ConfigError(f"forgetting.{key}={settings[key]!r} must be a whole number >= 1")
    if settings.max_passages is not None and (not isinstance(settings.max_passages, int) or settings.max_passages < 1):
        raise ConfigError(f"forgetting.max_passages={settings.max_passages!r} must be null (all) or >= 1")
    head, _ = OBJECTIVES[cfg.task.name].head(cfg)
    if head != "causal_lm":
        raise ConfigError(f"forgetting.sets scores a causal language model; task={cfg.task.name} trains a {head} head")
    if shards_parameters(cfg.trainer):
        raise ConfigError("forgetting.sets needs each rank to hold the whole model; it cannot run under FSDP or ZeRO-3")


def passages(path: Path, limit: int | None) -> list[str]:
    """The ``text`` of the first ``limit`` (None: all) JSON lines of ``path``."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [json.loads(line)["text"] for line in lines[:limit]]


def mean_nll(model: torch.nn.Module, tokenizer: Any, texts: list[str], max_length: int, batch_size: int) -> float:
    """Mean next-token negative log-likelihood (nats per predicted token) of ``texts`` under ``model`` (see the
    module docstring), in right-padded batches of ``batch_size``, on the device of the model's parameters."""
    device = next(model.parameters()).device
    encoded = [tokenizer(text)["input_ids"][:max_length] for text in texts]
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(ids)
        attention_mask = (labels != IGNORE_INDEX).long()
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        logits = logits[:, -width:]  # soft prompts (prompt, ptuning) prepend logits for their virtual tokens
        targets = labels[:, 1:].to(device)
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((targets != IGNORE_INDEX).sum())
    return total / count


def score_general(model: torch.nn.Module, tokenizer: Any, cfg: DictConfig) -> dict[str, float]:
    """``{set: mean NLL}`` of ``model`` on each of ``cfg.forgetting.sets`` (``{}`` when empty; sets are built into
    ``cfg.paths.cache_dir`` on first use). The model's train / eval mode and device are as before afterwards."""
    settings = cfg.forgetting
    if not settings.sets:
        return {}
    device = torch.device("cuda", torch.cuda.current_device()) if uses_gpu(cfg.trainer) else torch.device("cpu")
    was_training, was_on = model.training, next(model.parameters()).device
    model.eval().to(device)
    try:
        with torch.no_grad():
            return {
                name: mean_nll(
                    model,
                    tokenizer,
                    passages(SETS[name](cfg.paths.cache_dir), settings.max_passages),
                    settings.max_length,
                    settings.batch_size,
                )
                for name in settings.sets
            }
    finally:
        model.to(was_on).train(was_training)


def forgetting_metrics(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """``forgetting/<set>/after`` for each set of ``after``; with its ``before``, also ``/before`` and
    ``/change`` = after - before."""
    metrics = {}
    for name, value in after.items():
        metrics[f"{PREFIX}/{name}/after"] = value
        if name in before:
            metrics[f"{PREFIX}/{name}/before"] = before[name]
            metrics[f"{PREFIX}/{name}/change"] = value - before[name]
    return metrics


class Forgetting:
    """The two measuring points of a training run: ``Forgetting(cfg)`` checks ``cfg.forgetting`` (before any weights
    load), :meth:`before` scores the untrained model, :meth:`after` the trained one and returns the metrics. Both do
    nothing when ``forgetting.sets`` is empty."""

    def __init__(self, cfg: DictConfig) -> None:
        check_forgetting(cfg)
        self.cfg = cfg
        self.untrained: dict[str, float] = {}

    def before(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """Score the untrained ``model``; :meth:`after` reports these as ``before``."""
        self.untrained = score_general(model, tokenizer, self.cfg)

    def after(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        """Score the trained ``model``: ``forgetting/<set>/after`` (+ ``/before``, ``/change`` where measured)."""
        return forgetting_metrics(self.untrained, score_general(model, tokenizer, self.cfg))
