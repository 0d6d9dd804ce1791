"""What the objectives scored against a fixed reference share (DPO, KTO): a batch of two rows per item (the
``ROWS`` of its collator: a pair's chosen and rejected replies, or an example's completion and its mismatched row),
the policy's and the reference's log-probs of each row, and the reference (``task.reference``,
:class:`tunelab.tasks.reference.ReferenceModel`), scored in eval mode:

- ``adapter_disabled``: the policy itself with its adapter switched off (peft or in-house methods): no copy.
- ``copy``: a frozen copy of the policy as it starts (any method, also ``full``).
- ``precomputed``: reference log-probs [N, 2] (the two rows) of every item of every split, computed once before
  the first update (adapter disabled, or the starting model for ``full`` / ``bitfit``) and cached on disk under
  ``task.reference_cache_dir``, keyed by the model config, the starting weights, quantization, precision,
  ``average`` and the encoded rows: a ``beta`` sweep computes them once, its jobs sharing the file safely; a run
  whose weights were trained in place (resumed, or given to ``evaluate.py``) reads it but never computes it.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from tunelab.methods.spec import Method
from tunelab.models.frozen import eval_mode
from tunelab.tasks.pairwise import PairwiseModule, reply_logps, split_pairs
from tunelab.tasks.reference import ReferenceModel, check_reference

STAGE_SPLITS = {"train": "train", "val": "val", "test": "test"}


def check_reference_config(cfg: DictConfig, method: Method) -> None:
    """``task.reference`` is a source that the method can build (:func:`tunelab.tasks.reference.check_reference`)."""
    check_reference(cfg.task.reference, method.trains_base_in_place, f"method={method.name}")


def reference_identity(cfg: DictConfig) -> str:
    """What names the reference model in the on-disk cache: the run's model config as JSON."""
    return json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True)


class ReferenceScoredModule(PairwiseModule):
    """A pairwise module with a reference model; subclasses define :meth:`pair_outputs`, name the statistics it
    adds to the pair statistics in ``STATISTICS`` and may score rows by their mean log-prob (:meth:`averages`)."""

    STATISTICS: tuple[str, ...] = ()

    def __init__(
        self,
        model: torch.nn.Module,
        task_cfg: DictConfig,
        trains_all_weights: bool,
        trains_base_in_place: bool,
        identity: str,
    ) -> None:
        """``trains_base_in_place``: the method updates the base weights themselves (no adapter to switch off);
        ``identity`` names the reference model for the on-disk cache (e.g. the model config as JSON)."""
        super().__init__(model, task_cfg, trains_all_weights, extra_statistics=self.STATISTICS)
        self.average = self.averages(task_cfg)
        self.reference = ReferenceModel(
            model,
            trains_base_in_place=trains_base_in_place,
            source=task_cfg.reference,
            cache_dir=task_cfg.reference_cache_dir,
            identity=identity,
        )

    def averages(self, task_cfg: DictConfig) -> bool:
        """Whether rows are scored by their per-token mean log-prob instead of the sum (default: the sum)."""
        return False

    @torch.no_grad()
    def live_reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Reference log-probs [2B] computed now, with the policy in eval mode (``full`` / ``bitfit`` with
        ``precomputed``: the policy as it is, only right before the first update)."""
        with eval_mode(self.model):
            logits = self.reference.logits(self.model, batch["input_ids"], batch["attention_mask"])
        return reply_logps(logits, batch, self.average)

    def reference_logps(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        if not self.reference.precomputed:
            return self.live_reference_logps(batch)
        split = STAGE_SPLITS[stage]
        if split not in self.reference.tables:
            self.precompute_all()
        table = self.reference.tables[split][batch["index"].cpu()].to(self.device)
        return torch.cat([table[:, 0], table[:, 1]])

    def setup(self, stage: str) -> None:
        """Before each trainer stage: the reference notes whether the model still holds its starting weights
        (:meth:`ReferenceModel.check_start`; ``evaluate.py`` has loaded the trained ones by now)."""
        self.reference.check_start(self.model)

    def precompute_all(self) -> None:
        """Reference log-probs of every split, from the disk cache or computed (and written) now; the cache key
        covers the reference's weights, quantization and precision, ``average`` and each row's encoded
        ``input_ids`` and ``labels`` (:mod:`tunelab.tasks.reference`)."""
        rows = self.trainer.datamodule.collator().ROWS
        for split, items in self.trainer.datamodule.splits.items():
            self.reference.load_or_compute(
                split,
                (self.average,),
                ([item[row].input_ids, item[row].labels] for item in items for row in rows),
                partial(self._compute_table, items),
                policy=self.model,
                shape=(len(items), 2),
                updated=self.trainer.global_step > 0,
            )

    def _compute_table(self, items: list[dict[str, Any]]) -> torch.Tensor:
        """[N, 2] live reference log-probs of the items' two rows, row ``i`` for the item of index ``i``."""
        datamodule = self.trainer.datamodule
        table = torch.zeros(len(items), 2, dtype=torch.float32)  # not bf16-true's default dtype
        for batch in DataLoader(items, batch_size=datamodule.cfg.eval_batch_size, collate_fn=datamodule.collator()):
            moved = {k: v.to(self.device) for k, v in batch.items()}
            first, second = split_pairs(self.live_reference_logps(moved).cpu())
            table[batch["index"]] = torch.stack([first, second], dim=1)
        return table
