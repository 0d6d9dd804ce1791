"""RLHF with PPO (task=ppo): the policy answers prompts, a reward function scores the answers, and the clipped
PPO objective (Schulman et al., 2017) with a KL penalty towards a frozen reference (Ziegler et al., 2019; trl's
``PPOTrainer``) raises the expected reward.

The policy is the sampling distribution ``pi(a | s) = softmax(logits(s) / T)`` with ``T = task.rollout.temperature``
(all of the vocabulary: ``top_k=0, top_p=1``); the reference ``pi_ref`` is scaled by the same ``T``. One training
step is one PPO iteration on a batch of B prompts (manual optimisation):

1. Rollout (eval mode, no gradient; :class:`tunelab.tasks.rollout.RolloutEngine`): sample up to
   ``task.rollout.max_new_tokens`` tokens per prompt. The response mask ``m_t`` keeps the tokens up to and including
   the first EOS.
2. Scores ``s_b = reward_fn(completions, records)`` of the decoded completions (as generated, special tokens left
   out) and the prompts' data records; minus ``task.missing_eos_penalty`` for a completion without EOS (``null``:
   no penalty).
3. Old log-probs ``log pi_old(a_t)``, values ``V(s_t)`` (a linear value head on the policy's last hidden state,
   sharing its backbone), reference log-probs ``log pi_ref(a_t)``; the per-token KL ``k_t = log pi_old - log pi_ref``;
   rewards ``r_t = -kl_coef * k_t`` plus ``s_b`` on the last response token; GAE(``gamma``, ``lam``) advantages
   ``A_t``, whitened over the batch's response tokens, and returns ``R_t = A_t + V_t`` (before whitening).
4. ``task.ppo_epochs`` passes over shuffled minibatches of ``task.minibatch_size`` rollouts, each one optimizer step
   on ``clipped_policy_loss(cliprange) + vf_coef * clipped_value_loss(cliprange_value)``, gradients clipped to the
   global norm ``task.max_grad_norm``.
5. One scheduler step: the schedule spans the run's rollout batches.

The reference (:class:`tunelab.tasks.reference.ReferenceModel`) is a frozen copy for methods that change the base
weights in place (``trains_base_in_place``), else the policy itself with its adapters switched off, so
parameter-efficient methods need no second model. Every ``nn.Dropout`` of the policy is switched off (as trl does):
the rollout's log-probs are exactly those of the policy being updated (the first ratio is 1).

Logged per iteration: ``train/reward_mean`` (reward_fn, before the EOS penalty), ``train/kl`` (mean over rollouts
of the summed per-token KL), ``train/response_length``, ``train/reward_zeroed`` (samples the reward scored 0 after an
error, ``task.reward.on_error=zero``), and the means over the iteration's minibatches of
``train/policy_loss``, ``train/value_loss``, ``train/clip_frac``, ``train/entropy`` (of ``pi`` per response token)
and ``train/approx_kl`` (``0.5 * mean (log pi - log pi_old)^2``). Validation / test: greedy completions of every
prompt; ``val/reward_mean``, ``val/kl`` (mean over prompts of ``sum_t log pi(a_t) - log pi_ref(a_t)`` over the
greedy tokens: a log-ratio of the greedy answer, not a KL estimate, so it can be negative) and
``val/response_length``.

Steps: Lightning counts every optimizer step of manual optimisation in ``trainer.global_step``, so
``trainer.max_steps`` (and checkpoints ``every_n_train_steps``) count ``ppo_epochs * ceil(B / minibatch_size)`` per
batch; the logger steps once per batch. Not supported: ``trainer.accumulate_grad_batches != 1`` and Lightning's
``trainer.gradient_clip_val`` (manual optimisation; clipping is ``task.max_grad_norm``), see
:func:`check_ppo_config`. Generation under FSDP / DeepSpeed ZeRO-3 sharding is untested.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.errors import ConfigError
from tunelab.tasks.answers import answer_metrics, answer_samples, update_answer_metrics
from tunelab.tasks.base import TaskModule
from tunelab.tasks.objective import OBJECTIVES, Objective
from tunelab.tasks.optim import build_optimizer
from tunelab.tasks.preference_losses import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    kl_shaped_rewards,
    masked_mean,
    per_token_kl,
    whiten,
)
from tunelab.tasks.reference import ReferenceModel
from tunelab.tasks.reward_sources import check_reward_config, rollout_builder
from tunelab.tasks.rollout import (
    Completions,
    RewardFn,
    RolloutEngine,
    check_manual_optimization,
    disable_dropout,
    rollout_batches,
)


def check_ppo_config(cfg: DictConfig) -> None:
    """task=ppo settings that cannot work, refused with a one-line reason before any weights load: task knobs, the
    reward source, and trainer settings manual optimisation cannot honour."""
    task = cfg.task
    check_reward_config(task.reward)
    if task.rollout.temperature <= 0 or task.ppo_epochs < 1 or task.minibatch_size < 1:
        raise ConfigError(
            f"task=ppo needs task.rollout.temperature > 0, task.ppo_epochs >= 1 and task.minibatch_size >= 1 (got "
            f"{task.rollout.temperature}, {task.ppo_epochs}, {task.minibatch_size})"
        )
    check_manual_optimization(cfg, "ppo_epochs x minibatches")


@dataclass
class Rollout:
    """What a PPO update needs of one batch of completions, per row (no gradient)."""

    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    labels: torch.Tensor  # [B, R + 1] see Completions.labels
    mask: torch.Tensor  # [B, R]
    old_logps: torch.Tensor  # [B, R] log pi_old(a_t)
    old_values: torch.Tensor  # [B, R] V_old(s_t)
    advantages: torch.Tensor  # [B, R] whitened GAE advantages
    returns: torch.Tensor  # [B, R] GAE returns

    def rows(self, index: torch.Tensor) -> Rollout:
        return Rollout(*(getattr(self, item.name)[index] for item in fields(self)))


def hidden_size(model: torch.nn.Module) -> int:
    return int(model.config.get_text_config().hidden_size)


class PPOModule(TaskModule):
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        task_cfg: DictConfig,
        trains_all_weights: bool,
        reward_fn: RewardFn,
        trains_base_in_place: bool,
    ) -> None:
        """``trains_base_in_place``: the method updates the base weights themselves, so the reference is a frozen
        copy of ``model`` taken now (else ``model`` with its adapters switched off)."""
        super().__init__(model, task_cfg, trains_all_weights)
        if trains_all_weights and not trains_base_in_place:
            raise ConfigError("task=ppo with method=full needs a frozen reference: pass trains_base_in_place=True")
        self.automatic_optimization = False
        self.engine = RolloutEngine(
            tokenizer,
            reward_fn,
            ReferenceModel(model, trains_base_in_place=trains_base_in_place),
            temperature=float(task_cfg.rollout.temperature),
            max_new_tokens=task_cfg.rollout.max_new_tokens,
        )
        self.value_head = torch.nn.Linear(hidden_size(model), 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        disable_dropout(model)
        self.stage_metrics = answer_metrics("kl", "response_length")
        self.test_samples: list[dict[str, Any]] = []

    def configure_optimizers(self) -> dict[str, Any]:
        """The base optimizer and schedule over the policy's trainable parameters and the value head."""
        return build_optimizer(self, self.cfg.optimizer, self.cfg.scheduler, self.total_training_steps(), self.lr_scale)

    def updates_per_batch(self, batch_size: int) -> int:
        return self.cfg.ppo_epochs * math.ceil(batch_size / self.cfg.minibatch_size)

    def total_training_steps(self) -> int:
        """Scheduler steps of the run = rollout batches: ``max_epochs`` epochs of batches, capped by the batches
        ``trainer.max_steps`` optimizer steps take (``ceil(max_steps / updates_per_batch)``)."""
        return rollout_batches(self.trainer, self.updates_per_batch(self.trainer.datamodule.cfg.batch_size))

    # --- rollout ---------------------------------------------------------------------------------------------

    def policy_outputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``log pi(a_t)`` [B, R] (0 off the response), values ``V(s_t)`` [B, R] and the scaled logits
        [B, R + 1, V] of the response positions (``labels``: see :attr:`Completions.labels`)."""
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        logps, logits = self.engine.response_logps(output.logits, labels)
        hidden = output.hidden_states[-1][:, -labels.shape[1] : -1]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logps, values, logits

    @torch.no_grad()
    def make_rollout(self, completions: Completions, scores: torch.Tensor) -> tuple[Rollout, torch.Tensor]:
        """Step 3 (module docstring): the rollout of the scored completions, and its per-token KL [B, R]."""
        args = (completions.input_ids, completions.attention_mask, completions.labels)
        old_logps, old_values, _ = self.policy_outputs(*args)
        mask = completions.mask
        reference_logps = self.engine.reference_logps(self.model, *args)
        kl = per_token_kl(old_logps, reference_logps)  # 0 off the response, as both log-probs
        if self.cfg.missing_eos_penalty is not None:
            scores = scores - self.cfg.missing_eos_penalty * (~completions.ended).to(scores.dtype)
        rewards = kl_shaped_rewards(scores, kl, mask, self.cfg.kl_coef)
        advantages, returns = gae(rewards, old_values, mask, self.cfg.gamma, self.cfg.lam)
        rollout = Rollout(*args, mask, old_logps, old_values, whiten(advantages, mask), returns)
        return rollout, kl

    # --- update ----------------------------------------------------------------------------------------------

    def update(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Step 4: ``ppo_epochs`` passes of one optimizer step per shuffled minibatch; the means over the minibatches
        of their losses and diagnostics."""
        optimizer = self.optimizers()
        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        for _ in range(self.cfg.ppo_epochs):
            for index in torch.randperm(rollout.mask.shape[0]).to(self.device).split(self.cfg.minibatch_size):
                for name, value in self.minibatch_step(rollout.rows(index), optimizer).items():
                    stats[name].append(value)
        return {name: torch.stack(values).mean() for name, values in stats.items()}

    def minibatch_step(self, part: Rollout, optimizer: Any) -> dict[str, torch.Tensor]:
        """One optimizer step on ``policy_loss + vf_coef * value_loss`` of the minibatch ``part``; its losses and
        diagnostics (detached)."""
        cfg = self.cfg
        logps, values, logits = self.policy_outputs(part.input_ids, part.attention_mask, part.labels)
        policy_loss, clip_frac = clipped_policy_loss(logps, part.old_logps, part.advantages, part.mask, cfg.cliprange)
        value_loss = clipped_value_loss(values, part.old_values, part.returns, part.mask, cfg.cliprange_value)
        self.manual_backward(policy_loss + cfg.vf_coef * value_loss)
        if cfg.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=cfg.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            return {
                "policy_loss": policy_loss.detach(),
                "value_loss": value_loss.detach(),
                "clip_frac": clip_frac,
                "entropy": masked_mean(entropy_from_logits(logits[:, :-1]), part.mask),
                "approx_kl": 0.5 * masked_mean((logps - part.old_logps) ** 2, part.mask),
            }

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        completions = self.engine.complete(self.model, batch, sample=True)
        scores = self.engine.score(completions, batch["records"])
        rollout, kl = self.make_rollout(completions, scores)
        stats = self.update(rollout)
        self.lr_schedulers().step()
        size = len(batch["records"])
        self.log("train/reward_mean", scores.mean(), prog_bar=True, batch_size=size)
        stats["kl"] = kl.sum(-1).mean()
        stats["response_length"] = completions.mask.sum(-1).float().mean()
        stats["reward_zeroed"] = torch.tensor(float(self.engine.zeroed))
        self.log_dict({f"train/{name}": value for name, value in stats.items()}, batch_size=size)

    # --- validation / test -----------------------------------------------------------------------------------

    def _eval_step(self, stage: str, batch: dict[str, Any], dataloader_idx: int = 0) -> None:
        completions = self.engine.complete(self.model, batch, sample=False)
        scores = self.engine.score(completions, batch["records"])
        args = (completions.input_ids, completions.attention_mask, completions.labels)
        logps, _, _ = self.policy_outputs(*args)
        kl = per_token_kl(logps, self.engine.reference_logps(self.model, *args))
        metrics = self.stage_metrics[stage]
        update_answer_metrics(metrics, scores, completions.texts, batch["records"])
        metrics["kl"].update(kl.sum(-1))
        metrics["response_length"].update(completions.mask.sum(-1).float())
        if stage == "test":
            self.test_samples += answer_samples(completions.texts, batch["records"], scores)

    def _eval_epoch_end(self, stage: str) -> None:
        self.log_and_reset(stage, self.stage_metrics[stage])


OBJECTIVES.register(
    Objective(
        name="ppo",
        build=rollout_builder(PPOModule),
        data_kind="prompts",
        data_hint="data=arith_prompts or data=prompts",
        check=lambda cfg, method: check_ppo_config(cfg),
    )
)
