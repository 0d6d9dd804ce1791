"""Direct preference optimisation (task=dpo).

With sequence log-probs of the reply tokens under the policy ``pi`` and a fixed reference ``ref``,
``h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))`` and the per-pair loss is
``task.loss_type``'s: ``sigmoid`` (DPO; conservative DPO with ``task.label_smoothing``), ``ipo`` or ``hinge``
(:func:`tunelab.tasks.preference_losses.dpo_loss`, trl's definitions). The implicit reward of a reply is
``beta (log pi - log ref)``; ``rewards/accuracy`` is the share of pairs where the chosen reply's is higher.
``logps/accuracy`` and ``ref_logps/accuracy`` are the same ranking by the policy's and the reference's own
log-probs (the reference's is the starting, e.g. SFT, model's: what DPO has to improve on).

The reference (``task.reference``):

- ``adapter_disabled``: the policy itself with its adapter switched off (peft or in-house methods): no copy.
- ``copy``: a frozen copy of the policy as it starts (any method, also ``full``).
- ``precomputed``: reference log-probs of every pair of every split, computed once before the first update
  (adapter disabled, or the starting model for ``full`` / ``bitfit``) and cached on disk under
  ``task.reference_cache_dir``, keyed by the model config and the encoded pairs: a ``beta`` sweep computes them once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from tunelab.errors import ConfigError
from tunelab.methods import IN_PLACE_METHODS
from tunelab.methods.inhouse import adapters_disabled
from tunelab.tasks.frozen import FrozenModel, eval_mode
from tunelab.tasks.pairwise import PairwiseModule, pair_statistics, split_pairs
from tunelab.tasks.preference_losses import DPO_LOSS_TYPES, dpo_loss, sequence_logps

log = logging.getLogger("tunelab.dpo")

REFERENCES = ("adapter_disabled", "copy", "precomputed")
STAGE_SPLITS = {"train": "train", "val": "val", "test": "test"}


def reply_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], average: bool) -> torch.Tensor:
    """``log p(reply | prompt)`` of every row [2B] (summed over reply tokens, or their mean if ``average``)."""
    input_ids = batch["input_ids"]
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits[:, -input_ids.shape[1] :], batch["labels"], average=average)


def check_dpo_config(task_cfg: DictConfig, method: str) -> None:
    """task=dpo settings that cannot work, refused with one sentence (before any weights load, and again by the
    module): the loss type, label smoothing outside sigmoid DPO, and the reference for the method."""
    if task_cfg.loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"task.loss_type={task_cfg.loss_type!r} is not one of {list(DPO_LOSS_TYPES)}")
    if task_cfg.label_smoothing and task_cfg.loss_type != "sigmoid":
        raise ConfigError(
            f"task.label_smoothing={task_cfg.label_smoothing} (conservative DPO) applies to loss_type=sigmoid only"
        )
    reference = task_cfg.reference
    if reference not in REFERENCES:
        raise ConfigError(f"task.reference={reference!r} is not one of {list(REFERENCES)}")
    if reference == "adapter_disabled" and method in IN_PLACE_METHODS:
        raise ConfigError(
            f"task.reference=adapter_disabled needs an adapter to switch off, but method={method} trains the model's "
            "own weights: use task.reference=copy or precomputed"
        )


class DPOModule(PairwiseModule):
    def __init__(self, model: torch.nn.Module, task_cfg: DictConfig, method: str, identity: str) -> None:
        """``method`` is the method's name; ``identity`` names the reference model for the on-disk cache (e.g. the
        model config as JSON)."""
        trains_all_weights = method == "full"
        super().__init__(
            model,
            task_cfg,
            trains_all_weights,
            extra_statistics=("logps/chosen", "logps/rejected", "logps/accuracy", "ref_logps/accuracy"),
        )
        check_dpo_config(task_cfg, method)
        self.in_place = method in IN_PLACE_METHODS
        average = task_cfg.average_logps
        self.average = task_cfg.loss_type == "ipo" if average is None else bool(average)
        self.frozen_copy = FrozenModel(copy.deepcopy(model)) if task_cfg.reference == "copy" else None
        self.identity = identity
        self.cached: dict[str, torch.Tensor] = {}  # split -> [N, 2] reference log-probs (chosen, rejected)

    @torch.no_grad()
    def live_reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Reference log-probs [2B] computed now: the frozen copy, or the policy in eval mode with adapters off
        (``full`` / ``bitfit`` with ``precomputed``: the policy as it is, only right before the first update)."""
        if self.frozen_copy is not None:
            return reply_logps(self.frozen_copy.on(self.device), batch, self.average)
        with eval_mode(self.model):
            if self.in_place:
                return reply_logps(self.model, batch, self.average)
            with adapters_disabled(self.model):
                return reply_logps(self.model, batch, self.average)

    def reference_logps(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        if self.cfg.reference != "precomputed":
            return self.live_reference_logps(batch)
        split = STAGE_SPLITS[stage]
        if split not in self.cached:
            self.cached.update(self.precompute_all())
        table = self.cached[split][batch["index"].cpu()].to(self.device)
        return torch.cat([table[:, 0], table[:, 1]])

    def cache_path(self, split: str, pairs: list[dict[str, Any]]) -> Path:
        """``<reference_cache_dir>/<split>-<key>.pt``; the key hashes the model identity and the encoded pairs."""
        digest = hashlib.sha256(json.dumps([self.identity, self.average]).encode())
        for pair in pairs:
            for reply in (pair["chosen"], pair["rejected"]):
                digest.update(json.dumps([reply.input_ids, reply.labels]).encode())
        return Path(self.cfg.reference_cache_dir) / f"{split}-{digest.hexdigest()[:20]}.pt"

    def precompute_all(self) -> dict[str, torch.Tensor]:
        """Reference log-probs of every split, from the disk cache or computed (and written) now."""
        datamodule = self.trainer.datamodule
        tables = {}
        for split, pairs in datamodule.splits.items():
            path = self.cache_path(split, pairs)
            if path.exists():
                tables[split] = torch.load(path)
                continue
            if self.in_place and self.trainer.global_step > 0:
                raise ConfigError(
                    f"task.reference=precomputed: {path} is missing and the method has already updated the model "
                    "(a resumed run); restore the cache or start the run again"
                )
            tables[split] = self._compute_table(pairs, datamodule.collator())
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{self.global_rank}.tmp")
            torch.save(tables[split], partial)
            partial.replace(path)
            log.info("Reference log-probs of %d %s pairs cached in %s", len(pairs), split, path)
        return tables

    def _compute_table(self, pairs: list[dict[str, Any]], collate: Any) -> torch.Tensor:
        table = torch.zeros(len(pairs), 2)
        batch_size = self.trainer.datamodule.cfg.eval_batch_size
        for batch in DataLoader(pairs, batch_size=batch_size, collate_fn=collate):
            moved = {k: v.to(self.device) for k, v in batch.items()}
            chosen, rejected = split_pairs(self.live_reference_logps(moved).cpu())
            table[batch["index"]] = torch.stack([chosen, rejected], dim=1)
        return table

    def pair_outputs(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy_chosen, policy_rejected = split_pairs(reply_logps(self.model, batch, self.average))
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
        statistics = pair_statistics(chosen_rewards, rejected_rewards)
        statistics.update(
            {
                "logps/chosen": policy_chosen.detach().mean(),
                "logps/rejected": policy_rejected.detach().mean(),
                "logps/accuracy": (policy_chosen > policy_rejected).float().mean(),
                "ref_logps/accuracy": (ref_chosen > ref_rejected).float().mean(),
            }
        )
        return losses, statistics
