"""The reference model ``pi_ref`` of an alignment objective: the fixed distribution the policy is held to (DPO's
log-ratios, the KL penalty of PPO and of the RL objectives to come).

Sources (``source``):

- ``adapter_disabled``: the policy itself with its adapters switched off (peft or in-house methods): no second
  model. A method that trains the base weights in place has no adapter to switch off.
- ``copy``: a frozen copy of the policy as it is when the reference is made (any method), held outside the task
  module's tree (:class:`~tunelab.models.frozen.FrozenModel`).
- ``precomputed``: the objective's reference outputs of every example of every split, computed once before the
  first update (adapters off, or the starting policy itself when it trains in place) and cached on disk as
  ``<cache_dir>/<split>-<key>.pt``; ``key`` is the first 20 hex digits of the SHA-256 of
  ``json([identity, *settings])`` followed by ``json(example)`` of each encoded example, so a sweep over
  settings outside the key (e.g. DPO's ``beta``) computes them once.

The policy is passed to each call rather than held: a module whose ``model`` is replaced (``evaluate.py`` loads
an adapter into it) is scored with the model it holds then. The reference never switches the policy between
train and eval mode: a caller that needs its dropout off wraps the call in :func:`tunelab.models.frozen.eval_mode`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import ConfigError
from tunelab.methods.inhouse import adapters_disabled
from tunelab.models.frozen import FrozenModel

log = logging.getLogger("tunelab.reference")

SOURCES = ("adapter_disabled", "copy", "precomputed")


def check_reference(source: str, trains_base_in_place: bool, trained_by: str = "the method") -> None:
    """Refuse a reference source that is unknown or cannot be built: ``adapter_disabled`` when the policy trains
    its base weights in place (the message names ``trained_by`` as what trains them)."""
    if source not in SOURCES:
        raise ConfigError(f"task.reference={source!r} is not one of {list(SOURCES)}")
    if source == "adapter_disabled" and trains_base_in_place:
        raise ConfigError(
            f"task.reference=adapter_disabled needs an adapter to switch off, but {trained_by} trains the model's "
            "own weights: use task.reference=copy or precomputed"
        )


class ReferenceModel:
    """``pi_ref`` of one policy, from one of :data:`SOURCES` (see the module docstring)."""

    def __init__(
        self,
        policy: torch.nn.Module,
        *,
        trains_base_in_place: bool,
        source: str | None = None,
        cache_dir: str | Path | None = None,
        identity: str = "",
    ) -> None:
        """``policy`` as training starts; ``trains_base_in_place``: its method updates the base weights themselves
        (no adapter to switch off). ``source`` ``None`` is the cheapest live reference: ``copy`` when the policy
        trains in place, else ``adapter_disabled``. ``precomputed`` caches its tables under ``cache_dir``, keyed
        by ``identity`` (what names the reference model, e.g. the model config as JSON)."""
        self.source = source if source is not None else ("copy" if trains_base_in_place else "adapter_disabled")
        check_reference(self.source, trains_base_in_place)
        if self.source == "precomputed" and cache_dir is None:
            raise ConfigError("task.reference=precomputed needs task.reference_cache_dir (where the tables are kept)")
        self.trains_base_in_place = trains_base_in_place
        self.frozen = FrozenModel(copy.deepcopy(policy)) if self.source == "copy" else None
        self.cache_dir, self.identity = cache_dir, identity
        self.tables: dict[str, torch.Tensor] = {}  # split -> the precomputed table of its examples

    @property
    def precomputed(self) -> bool:
        return self.source == "precomputed"

    @torch.no_grad()
    def logits(self, policy: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The reference's logits of the batch, computed now: the frozen copy's (float32, cut to the input
        positions: :meth:`FrozenModel.logits`), else ``policy``'s in its own dtype with its adapters switched off,
        or as it is when it trains in place (``precomputed`` only, before its first update)."""
        if self.frozen is not None:
            return self.frozen.logits(input_ids, attention_mask)
        if self.trains_base_in_place:
            return policy(input_ids=input_ids, attention_mask=attention_mask).logits
        with adapters_disabled(policy):
            return policy(input_ids=input_ids, attention_mask=attention_mask).logits

    def cache_path(self, split: str, settings: Sequence[Any], examples: Iterable[Any]) -> Path:
        """``<cache_dir>/<split>-<key>.pt`` of a table over the JSON-encodable ``examples`` (module docstring)."""
        digest = hashlib.sha256(json.dumps([self.identity, *settings]).encode())
        for example in examples:
            digest.update(json.dumps(example).encode())
        return Path(self.cache_dir) / f"{split}-{digest.hexdigest()[:20]}.pt"

    def load_or_compute(
        self,
        split: str,
        settings: Sequence[Any],
        examples: Iterable[Any],
        compute: Callable[[], torch.Tensor],
        *,
        updated: bool,
        rank: int,
    ) -> torch.Tensor:
        """The precomputed table of ``split`` (kept in :attr:`tables`): read from its cache file, else
        ``compute()``-d now and written (to a ``.<rank>.tmp`` file, then renamed into place). A missing file is
        refused once a policy that trains in place has been ``updated``: its starting weights are gone."""
        path = self.cache_path(split, settings, examples)
        if path.exists():
            self.tables[split] = torch.load(path)
            return self.tables[split]
        if self.trains_base_in_place and updated:
            raise ConfigError(
                f"task.reference=precomputed: {path} is missing and the method has already updated the model "
                "(a resumed run); restore the cache or start the run again"
            )
        table = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{rank}.tmp")
        torch.save(table, partial)
        partial.replace(path)
        log.info("Reference outputs of %d %s examples cached in %s", len(table), split, path)
        self.tables[split] = table
        return table
