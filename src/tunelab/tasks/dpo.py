"""Direct preference optimisation (task=dpo).

With sequence log-probs of the reply tokens under the policy ``pi`` and a fixed reference ``ref``,
``h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))`` and the per-pair loss is
``task.loss_type``'s: ``sigmoid`` (DPO; conservative DPO with ``task.label_smoothing``), ``ipo`` or ``hinge``
(:func:`tunelab.tasks.preference_losses.dpo_loss`, trl's definitions). The implicit reward of a reply is
``beta (log pi - log ref)``; ``rewards/accuracy`` is the share of pairs where the chosen reply's is higher.
``logps/accuracy`` and ``ref_logps/accuracy`` are the same ranking by the policy's and the reference's own
log-probs (the reference's is the starting, e.g. SFT, model's: what DPO has to improve on).

The reference (``task.reference``, :class:`tunelab.tasks.reference.ReferenceModel`), scored in eval mode:

- ``adapter_disabled``: the policy itself with its adapter switched off (peft or in-house methods): no copy.
- ``copy``: a frozen copy of the policy as it starts (any method, also ``full``).
- ``precomputed``: reference log-probs [N, 2] (chosen, rejected) of every pair of every split, computed once before
  the first update (adapter disabled, or the starting model for ``full`` / ``bitfit``) and cached on disk under
  ``task.reference_cache_dir``, keyed by the model config, the starting weights, quantization, precision,
  ``average`` and the encoded pairs: a ``beta`` sweep computes them once, its jobs sharing the file safely; a run
  whose weights were trained in place (resumed, or given to ``evaluate.py``) reads it but never computes it.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from tunelab.data.datamodule import PreferenceDataModule
from tunelab.errors import ConfigError
from tunelab.methods.spec import Method
from tunelab.models.frozen import eval_mode
from tunelab.tasks.objective import OBJECTIVES, BuildContext, Objective
from tunelab.tasks.pairwise import PREFERENCE_DATA, PairwiseModule, pair_statistics, split_pairs
from tunelab.tasks.preference_losses import DPO_LOSS_TYPES, dpo_loss, sequence_logps
from tunelab.tasks.reference import ReferenceModel, check_reference

STAGE_SPLITS = {"train": "train", "val": "val", "test": "test"}


def reply_logps(logits: torch.Tensor, batch: dict[str, torch.Tensor], average: bool) -> torch.Tensor:
    """``log p(reply | prompt)`` of every row [2B] from the ``logits`` of a forward over the batch (summed over
    reply tokens, or their mean if ``average``; positions a soft prompt prepends are cut off)."""
    return sequence_logps(logits[:, -batch["input_ids"].shape[1] :], batch["labels"], average=average)


def check_dpo_loss(task_cfg: DictConfig) -> None:
    """The loss type, a positive ``beta`` (every loss scales by it, IPO's target is ``1 / (2 beta)``), and label
    smoothing only for sigmoid DPO."""
    beta = task_cfg.beta
    if not (isinstance(beta, int | float) and not isinstance(beta, bool) and beta > 0):
        raise ConfigError(
            f"task.beta={beta} must be > 0: the implicit reward is beta (log pi - log ref) and loss_type=ipo divides "
            "by beta; set task.beta=0.1 (the default) or another positive value"
        )
    if task_cfg.loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"task.loss_type={task_cfg.loss_type!r} is not one of {list(DPO_LOSS_TYPES)}")
    if task_cfg.label_smoothing and task_cfg.loss_type != "sigmoid":
        raise ConfigError(
            f"task.label_smoothing={task_cfg.label_smoothing} (conservative DPO) applies to loss_type=sigmoid only"
        )


def check_dpo_config(cfg: DictConfig, method: Method) -> None:
    """task=dpo settings that cannot work, refused with one sentence before any weights load (the module refuses
    them again): :func:`check_dpo_loss`, and the reference for the method."""
    check_dpo_loss(cfg.task)
    check_reference(cfg.task.reference, method.trains_base_in_place, f"method={method.name}")


class DPOModule(PairwiseModule):
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
        super().__init__(
            model,
            task_cfg,
            trains_all_weights,
            extra_statistics=("logps/chosen", "logps/rejected", "logps/accuracy", "ref_logps/accuracy"),
        )
        check_dpo_loss(task_cfg)
        average = task_cfg.average_logps
        self.average = task_cfg.loss_type == "ipo" if average is None else bool(average)
        self.reference = ReferenceModel(
            model,
            trains_base_in_place=trains_base_in_place,
            source=task_cfg.reference,
            cache_dir=task_cfg.reference_cache_dir,
            identity=identity,
        )

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
        covers the reference's weights, quantization and precision, ``average`` and each reply's encoded
        ``input_ids`` and ``labels`` (:mod:`tunelab.tasks.reference`)."""
        for split, pairs in self.trainer.datamodule.splits.items():
            self.reference.load_or_compute(
                split,
                (self.average,),
                ([reply.input_ids, reply.labels] for pair in pairs for reply in (pair["chosen"], pair["rejected"])),
                partial(self._compute_table, pairs),
                policy=self.model,
                shape=(len(pairs), 2),
                updated=self.trainer.global_step > 0,
            )

    def _compute_table(self, pairs: list[dict[str, Any]]) -> torch.Tensor:
        """[N, 2] live reference log-probs (chosen, rejected) of the pairs, row ``i`` for the pair of index ``i``."""
        datamodule = self.trainer.datamodule
        table = torch.zeros(len(pairs), 2, dtype=torch.float32)  # not bf16-true's default dtype
        for batch in DataLoader(pairs, batch_size=datamodule.cfg.eval_batch_size, collate_fn=datamodule.collator()):
            moved = {k: v.to(self.device) for k, v in batch.items()}
            chosen, rejected = split_pairs(self.live_reference_logps(moved).cpu())
            table[batch["index"]] = torch.stack([chosen, rejected], dim=1)
        return table

    def pair_outputs(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        policy_chosen, policy_rejected = split_pairs(reply_logps(logits, batch, self.average))
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


def build_dpo(context: BuildContext) -> tuple[PreferenceDataModule, DPOModule]:
    """Preference pairs and the DPO module; the reference's cache identity is the model config (as JSON)."""
    cfg = context.cfg
    identity = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True)
    datamodule = PreferenceDataModule(cfg.data, context.tokenizer, cfg.paths.cache_dir)
    method = context.method
    return datamodule, DPOModule(
        context.model, cfg.task, method.trains_all_weights, method.trains_base_in_place, identity
    )


OBJECTIVES.register(
    Objective(
        name="dpo",
        build=build_dpo,
        data_kind="preference",
        data_hint=PREFERENCE_DATA,
        check=check_dpo_config,
    )
)
