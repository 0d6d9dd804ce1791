"""Group-relative policy optimisation (task=grpo; Shao et al., 2024, DeepSeekMath) with the Dr. GRPO, DAPO and GSPO
loss variants (:mod:`tunelab.tasks.grpo_losses`): no value head, no critic; the baseline of a completion is the mean
reward of the other samples of its prompt.

The policy is the sampling distribution ``pi(a | s) = softmax(logits(s) / T)`` (``T = task.rollout.temperature``,
full vocabulary), built from the shared :class:`~tunelab.tasks.rollout.RolloutEngine`. One training step is one
batch of ``N = data.batch_size`` prompts (manual optimisation):

1. Rollout: each prompt repeated ``G = task.num_generations`` times (rows ``g G ... g G + G - 1`` are prompt
   ``g``'s group) and sampled once, up to ``task.rollout.max_new_tokens`` tokens; the completion mask keeps the
   tokens up to and including the first EOS.
2. Rewards ``r_i = reward_fn(completions, records)`` (``task.reward``: the verifiable scorer, a reward model, a
   user's ``module:function`` or a weighted sum of these, :mod:`tunelab.tasks.reward_sources`), plus DAPO's soft
   overlong penalty when ``task.overlong_cache`` is set (``L_max = max_new_tokens``, ``L_c = overlong_cache``).
3. Group advantages ``A_i = (r_i - mean_g r) / (std_g r + task.scale_eps)``, without the division when
   ``task.scale_rewards`` is false (``null``: false for ``dr_grpo``, true otherwise). Groups whose rewards are all
   equal carry no signal (counted in ``train/zero_variance_share``); DAPO's dynamic sampling,
   ``task.dynamic_sampling``: ``skip`` leaves their rows out of the update (a batch of such groups only takes its
   scheduler step); ``resample`` also draws further batches of prompts (steps 1-3 on each, from a second pass over
   this rank's training loader) until ``N`` groups with signal are in hand or ``task.max_resample_batches`` more
   were drawn (counted in ``train/resampled_batches``), and updates on the first ``N`` of them; ``off`` keeps
   every group (their advantages are 0). ``task.mask_truncated_completions``: completions without EOS get an
   all-zero loss mask.
4. ``log pi_old(a_t)`` of the sampling policy, computed once without gradient (every ``nn.Dropout`` is off, so they
   are exactly the log-probs of the policy before its first update: the first pass's ratios are 1), and, when
   ``task.beta > 0``, the reference's ``log pi_ref(a_t)``.
5. ``task.num_iterations`` passes, each one optimizer step on
   :func:`~tunelab.tasks.grpo_losses.policy_loss` (``task.loss_type``, clipped to
   ``[1 - epsilon_low, 1 + epsilon_high]``, ``+ beta * k3 KL``) of the whole batch, accumulated over chunks of
   ``task.chunk_size`` rows each weighted by :func:`~tunelab.tasks.grpo_losses.chunk_share` (so the step is the
   batch's loss exactly); gradients clipped to the global norm ``task.max_grad_norm``.
6. One scheduler step (the schedule spans the run's rollout batches).

``task.beta = 0`` (the default, as DAPO) builds no reference at all: no frozen copy for a method that trains its
base weights, no adapter-off forward. The reference, when built, is
:class:`~tunelab.tasks.reference.ReferenceModel`'s cheapest live one (adapters off, or a frozen copy).

Logged per batch: ``train/reward_mean`` and ``train/reward_std`` (of ``reward_fn`` over all completions drawn,
resampled ones included, before the overlong penalty), ``train/completion_length``, ``train/zero_variance_share``
(share of the groups drawn with equal rewards), ``train/resampled_batches``, ``train/reward_zeroed`` (samples the
reward scored 0 after an error, ``on_error: zero``), and means over the passes of ``train/policy_loss``,
``train/clip_fraction`` and ``train/kl`` (mean per-token k3 KL, only when ``beta > 0``). Validation / test: one
greedy completion per prompt, ``val/reward_mean`` and ``val/completion_length``.

Steps: ``trainer.max_steps`` counts optimizer steps, ``num_iterations`` per batch (none for a batch whose groups
all have zero variance, on every rank). Under DDP each rank draws its own prompts (the distributed sampler) and
samples their full groups itself, so a group is never split across ranks and its advantages need no gathering
(``tests/test_grpo_ddp.py``); ``dapo``'s token mean is then per rank (the gradient is the mean over ranks). Ranks
whose updates hold different numbers of chunks (``dynamic_sampling``) add backward passes of weight 0, so every
rank meets the others in each gradient all-reduce (:meth:`GRPOModule.update_chunks`). Not supported, as for PPO:
``trainer.accumulate_grad_batches != 1`` and ``trainer.gradient_clip_val``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import move_data_to_device
from omegaconf import DictConfig

from tunelab.errors import ConfigError
from tunelab.methods.spec import Method
from tunelab.tasks.answers import answer_metrics, answer_samples, update_answer_metrics
from tunelab.tasks.base import TaskModule
from tunelab.tasks.grpo_losses import (
    LOSS_TYPES,
    PolicyLoss,
    chunk_share,
    group_advantages,
    leave_groups_out,
    policy_loss,
    soft_overlong_penalty,
    truncation_mask,
)
from tunelab.tasks.objective import OBJECTIVES, Objective
from tunelab.tasks.reference import ReferenceModel
from tunelab.tasks.reward_sources import check_reward_config, rollout_builder
from tunelab.tasks.rollout import (
    Completions,
    RewardFn,
    RolloutEngine,
    check_manual_optimization,
    concat_completions,
    disable_dropout,
    rollout_batches,
)

DYNAMIC_SAMPLING = ("skip", "resample", "off")  # task.dynamic_sampling (module docstring, step 3)


@dataclass
class ScoredGroups:
    """Steps 1-3 on one batch of ``N`` prompts: their ``N G`` completions, ``reward_fn``'s rewards [N G], the
    advantages [N G] of the shaped rewards, the zero-variance groups [N] and the samples the reward zeroed."""

    completions: Completions
    rewards: torch.Tensor
    advantages: torch.Tensor
    flat: torch.Tensor
    zeroed: int


def check_group_config(cfg: DictConfig) -> None:
    """The settings task=grpo and task=rloo share that cannot work, refused with a one-line reason before any
    weights load."""
    task, name = cfg.task, cfg.task.name
    check_reward_config(task.reward)
    if task.num_generations < 2:
        raise ConfigError(
            f"task.num_generations={task.num_generations}: a group needs at least 2 completions for its mean to be "
            "a baseline (and 2 for a standard deviation)"
        )
    if task.num_iterations < 1 or task.chunk_size < 1:
        raise ConfigError(
            f"task={name} needs task.num_iterations >= 1 and task.chunk_size >= 1 (got {task.num_iterations}, "
            f"{task.chunk_size})"
        )
    if not 0 <= task.epsilon_low < 1 or task.epsilon_high < 0:
        raise ConfigError(
            f"task={name} clips the ratio to [1 - epsilon_low, 1 + epsilon_high]: needs 0 <= epsilon_low < 1 and "
            f"epsilon_high >= 0 (got {task.epsilon_low}, {task.epsilon_high})"
        )
    if task.beta < 0:
        raise ConfigError(f"task={name} needs task.beta >= 0 (got {task.beta})")
    if task.rollout.temperature <= 0 or task.scale_eps <= 0:
        raise ConfigError(
            f"task={name} needs task.rollout.temperature > 0 and task.scale_eps > 0 (got {task.rollout.temperature}, "
            f"{task.scale_eps})"
        )
    if task.dynamic_sampling not in DYNAMIC_SAMPLING or task.max_resample_batches < 0:
        raise ConfigError(
            f"task={name} needs task.dynamic_sampling in {list(DYNAMIC_SAMPLING)} and task.max_resample_batches >= 0 "
            f"(got {task.dynamic_sampling!r}, {task.max_resample_batches})"
        )
    cache = task.overlong_cache
    if cache is not None and not 0 < cache <= task.rollout.max_new_tokens:
        raise ConfigError(
            f"task.overlong_cache={cache} must be in (0, task.rollout.max_new_tokens={task.rollout.max_new_tokens}] "
            "(null: no overlong penalty)"
        )
    check_manual_optimization(cfg, "num_iterations")


def check_grpo_config(cfg: DictConfig, method: Method) -> None:
    """task=grpo settings that cannot work (``method``: the objective check's signature; every method works)."""
    task = cfg.task
    check_group_config(cfg)
    if task.loss_type not in LOSS_TYPES:
        raise ConfigError(f"task.loss_type={task.loss_type!r} is not one of {list(LOSS_TYPES)}")
    if task.loss_type == "dr_grpo" and task.scale_rewards:
        raise ConfigError("task.loss_type=dr_grpo divides by no standard deviation: set task.scale_rewards=false")


class GRPOModule(TaskModule):
    """The GRPO objective (module docstring); :meth:`advantages`, :meth:`loss`, :attr:`loss_type`,
    :meth:`reference_weight` and :meth:`reward_penalty` are what another group objective (task=rloo) replaces."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        task_cfg: DictConfig,
        trains_all_weights: bool,
        reward_fn: RewardFn,
        trains_base_in_place: bool,
    ) -> None:
        """``trains_base_in_place``: the method updates the base weights themselves, so a reference (``beta > 0``
        only) is a frozen copy of ``model`` taken now, else ``model`` with its adapters switched off."""
        super().__init__(model, task_cfg, trains_all_weights)
        self.automatic_optimization = False
        self.beta = self.reference_weight(task_cfg)
        self.engine = RolloutEngine(
            tokenizer,
            reward_fn,
            ReferenceModel(model, trains_base_in_place=trains_base_in_place) if task_cfg.beta > 0 else None,
            temperature=float(task_cfg.rollout.temperature),
            max_new_tokens=task_cfg.rollout.max_new_tokens,
        )
        disable_dropout(model)
        self.refill: Iterator[dict[str, Any]] | None = None  # task.dynamic_sampling=resample's own loader pass
        self.stage_metrics = answer_metrics("completion_length")
        self.test_samples: list[dict[str, Any]] = []

    @staticmethod
    def reference_weight(task_cfg: DictConfig) -> float:
        """The weight of the loss's KL term: ``beta`` (a reference is built when ``task.beta > 0``)."""
        return float(task_cfg.beta)

    def reward_penalty(self, completions: Completions) -> torch.Tensor:
        """Subtracted from each completion's reward before its advantage [B]: 0 (GRPO's KL is in its loss)."""
        return torch.zeros(len(completions.texts), device=completions.input_ids.device)

    @property
    def loss_type(self) -> str:
        return str(self.cfg.loss_type)

    def advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 3: the group advantages [B] and the zero-variance groups [N]; the std division per
        ``task.scale_rewards`` (``null``: off for ``dr_grpo`` only)."""
        scale = self.cfg.scale_rewards
        scale = self.loss_type != "dr_grpo" if scale is None else bool(scale)
        return group_advantages(rewards, self.cfg.num_generations, scale=scale, eps=self.cfg.scale_eps)

    def batch_advantages(self, advantages: torch.Tensor) -> torch.Tensor:
        """Step 3b, once per training step over the rows of every draw: GRPO's advantages are final per group."""
        return advantages

    def loss(
        self,
        logps: torch.Tensor,
        old_logps: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        reference_logps: torch.Tensor | None,
    ) -> PolicyLoss:
        """Step 5: :func:`~tunelab.tasks.grpo_losses.policy_loss` of one chunk."""
        cfg = self.cfg
        return policy_loss(
            logps,
            old_logps,
            advantages,
            mask,
            loss_type=self.loss_type,
            epsilon_low=cfg.epsilon_low,
            epsilon_high=cfg.epsilon_high,
            max_length=cfg.rollout.max_new_tokens,
            beta=self.beta,
            ref_logps=reference_logps,
        )

    def total_training_steps(self) -> int:
        """Scheduler steps of the run = rollout batches (:func:`~tunelab.tasks.rollout.rollout_batches`)."""
        return rollout_batches(self.trainer, self.cfg.num_iterations)

    # --- rollout ---------------------------------------------------------------------------------------------

    def sample_groups(self, batch: dict[str, Any]) -> tuple[Completions, list[dict[str, Any]]]:
        """Step 1: ``G`` sampled completions of each prompt, group by group, and the records row by row."""
        generations = self.cfg.num_generations
        repeated = {key: batch[key].repeat_interleave(generations, dim=0) for key in ("input_ids", "attention_mask")}
        records = [record for record in batch["records"] for _ in range(generations)]
        return self.engine.complete(self.model, repeated, sample=True), records

    def completion_logps(self, completions: Completions, rows: torch.Tensor) -> torch.Tensor:
        """``log pi(a_t)`` [len(rows), R] of the completions' ``rows`` under the policy as it is now."""
        input_ids, attention_mask = completions.input_ids[rows], completions.attention_mask[rows]
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return self.engine.response_logps(logits, completions.labels[rows])[0]

    # --- update ----------------------------------------------------------------------------------------------

    def update_chunks(self, rows: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """The update's chunks of ``rows`` (``task.chunk_size`` each) and how many backward passes of weight 0 to add
        so that every rank runs as many as the rank with the most chunks: DDP all-reduces the gradients in each
        backward pass, so ranks whose groups kept different numbers of rows (``dynamic_sampling``), or none, still
        meet in every one (and take the same optimizer steps, on the averaged gradients). 0 on one process."""
        chunks = list(rows.split(self.cfg.chunk_size)) if len(rows) else []  # split gives one empty chunk of none
        most = self.trainer.strategy.reduce(torch.tensor(len(chunks), device=rows.device), reduce_op="max")
        return chunks, int(most) - len(chunks)

    def update(
        self, completions: Completions, advantages: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Steps 4-5 on the completions' ``rows``: old (and reference) log-probs once, then ``num_iterations``
        optimizer steps; the means over the passes of the loss and its diagnostics ({} without a step)."""
        cfg, optimizer = self.cfg, self.optimizers()
        chunks, padding = self.update_chunks(rows)
        if not chunks and not padding:
            return {}
        with torch.no_grad():
            old_logps = [self.completion_logps(completions, chunk) for chunk in chunks]
            args = (completions.input_ids, completions.attention_mask, completions.labels)
            reference_logps = (
                [self.engine.reference_logps(self.model, *(arg[chunk] for arg in args)) for chunk in chunks]
                if self.beta > 0
                else [None] * len(chunks)
            )
        batch_mask = mask[rows]
        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        for _ in range(cfg.num_iterations):
            totals: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=mask.device))
            for chunk, old, reference in zip(chunks, old_logps, reference_logps, strict=True):
                share = chunk_share(mask[chunk], batch_mask, self.loss_type)
                result = self.loss(
                    self.completion_logps(completions, chunk), old, advantages[chunk], mask[chunk], reference
                )
                self.manual_backward(result.loss * share)
                totals["policy_loss"] += result.loss.detach() * share
                totals["clip_fraction"] += result.clip_fraction * len(chunk) / len(rows)
                if self.beta > 0:
                    totals["kl"] += result.kl * len(chunk) / len(rows)
            for _ in range(padding):  # a gradient of 0 through every weight a chunk's backward reaches
                self.manual_backward(self.completion_logps(completions, rows.new_zeros(1)).sum() * 0.0)
            if cfg.max_grad_norm is not None:
                self.clip_gradients(optimizer, gradient_clip_val=cfg.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
            optimizer.zero_grad()
            for name, value in totals.items():
                stats[name].append(value)
        return {name: torch.stack(values).mean() for name, values in stats.items()}

    def score_groups(self, batch: dict[str, Any]) -> ScoredGroups:
        """Steps 1-3 on one batch of prompts."""
        cfg = self.cfg
        completions, records = self.sample_groups(batch)
        rewards = self.engine.score(completions, records)
        zeroed = self.engine.zeroed
        shaped = rewards - self.reward_penalty(completions)
        if cfg.overlong_cache is not None:
            lengths = completions.mask.sum(-1)
            shaped = shaped + soft_overlong_penalty(lengths, cfg.rollout.max_new_tokens, cfg.overlong_cache)
        advantages, flat = self.advantages(shaped)
        return ScoredGroups(completions, rewards, advantages, flat, zeroed)

    def next_prompts(self) -> dict[str, Any]:
        """Another batch of training prompts for ``resample``: from this module's own pass over the trainer's
        training loader (under DDP its distributed sampler's share of this rank), restarted when it ends."""
        if self.refill is not None:
            batch = next(self.refill, None)
            if batch is not None:
                return move_data_to_device(batch, self.device)
        self.refill = iter(self.trainer.train_dataloader)
        return move_data_to_device(next(self.refill), self.device)

    def draw_groups(self, batch: dict[str, Any]) -> list[ScoredGroups]:
        """The batch's scored groups, then, for ``resample``, further batches until ``N`` groups have signal or
        ``max_resample_batches`` more were drawn."""
        cfg, wanted = self.cfg, len(batch["records"])
        parts = [self.score_groups(batch)]
        while cfg.dynamic_sampling == "resample" and len(parts) <= cfg.max_resample_batches:
            if sum(int((~part.flat).sum()) for part in parts) >= wanted:
                break
            parts.append(self.score_groups(self.next_prompts()))
        return parts

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        cfg, generations = self.cfg, self.cfg.num_generations
        parts = self.draw_groups(batch)
        completions = concat_completions([part.completions for part in parts], self.engine.tokenizer.eos_token_id)
        rewards, advantages, flat = (
            torch.cat([getattr(part, key) for part in parts]) for key in ("rewards", "advantages", "flat")
        )
        mask = completions.mask.float()
        if cfg.mask_truncated_completions:
            mask = truncation_mask(mask, completions.ended)
        advantages = self.batch_advantages(advantages)
        rows = torch.arange(len(rewards), device=rewards.device)
        if cfg.dynamic_sampling != "off":
            rows = rows[leave_groups_out(flat, generations)][: len(batch["records"]) * generations]
        stats = self.update(completions, advantages, mask, rows)
        self.lr_schedulers().step()
        size = len(batch["records"])
        self.log("train/reward_mean", rewards.mean(), prog_bar=True, batch_size=size)
        stats["reward_std"] = rewards.std()
        stats["completion_length"] = completions.mask.sum(-1).float().mean()
        stats["zero_variance_share"] = flat.float().mean()
        stats["reward_zeroed"] = torch.tensor(float(sum(part.zeroed for part in parts)))
        stats["resampled_batches"] = torch.tensor(float(len(parts) - 1))
        self.log_dict({f"train/{name}": value for name, value in stats.items()}, batch_size=size)

    # --- validation / test -----------------------------------------------------------------------------------

    def _eval_step(self, stage: str, batch: dict[str, Any], dataloader_idx: int = 0) -> None:
        completions = self.engine.complete(self.model, batch, sample=False)
        rewards = self.engine.score(completions, batch["records"])
        metrics = self.stage_metrics[stage]
        update_answer_metrics(metrics, rewards, completions.texts, batch["records"])
        metrics["completion_length"].update(completions.mask.sum(-1).float())
        if stage == "test":
            self.test_samples += answer_samples(completions.texts, batch["records"], rewards)

    def _eval_epoch_end(self, stage: str) -> None:
        self.log_and_reset(stage, self.stage_metrics[stage])


OBJECTIVES.register(
    Objective(
        name="grpo",
        build=rollout_builder(GRPOModule),
        data_kind="prompts",
        data_hint="data=arith_prompts or data=prompts",
        check=check_grpo_config,
    )
)
