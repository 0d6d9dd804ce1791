"""Rollouts of a policy on prompts, shared by the RL objectives (PPO today; GRPO-style objectives reuse it without
deriving from :class:`~tunelab.tasks.ppo.PPOModule`): completions of a batch of prompts, their scores by a reward
function, and the per-token log-probs of the completion tokens under the policy and under the reference.

The policy is the sampling distribution ``pi(a | s) = softmax(logits(s) / T)`` with ``T = temperature`` (all of
the vocabulary: ``top_k=0, top_p=1``); the reference ``pi_ref`` is scaled by the same ``T``. Completions are
generated without gradient by a :class:`GenerationEngine` (the interface a vLLM engine would implement; the
default, :class:`TransformersEngine`, is transformers' ``generate`` in eval mode); the response mask keeps each
row's tokens up to and including its first EOS. Scores are ``reward_fn(texts, records)`` of the decoded
completions (as generated, special tokens left out) and the prompts' data records.

Also shared by the RL objectives: :func:`disable_dropout` (so the rollout's log-probs are exactly those of the
policy being updated), :func:`rollout_batches` (the scheduler's length: one step per rollout batch) and
:func:`check_manual_optimization` (the trainer settings an objective that steps its own optimizer refuses).

Reward functions follow :data:`RewardFn`; one that holds a model may define ``to(device)``, called before each use
so that model sits beside the policy (:class:`tunelab.rewards.model.RewardModelScorer` does), and one that scores
failing samples 0 may define ``take_zeroed()``, their count since the last call
(:class:`tunelab.rewards.checked.CheckedReward`). The policy is passed
to each call (see :mod:`tunelab.tasks.reference`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from omegaconf import DictConfig

from tunelab.data.tokenization import IGNORE_INDEX
from tunelab.errors import ConfigError
from tunelab.generation import generate_tokens
from tunelab.tasks.preference_losses import token_logps
from tunelab.tasks.reference import ReferenceModel

RewardFn = Callable[[list[str], list[dict[str, Any]]], torch.Tensor]


def disable_dropout(model: torch.nn.Module) -> None:
    """Every ``nn.Dropout`` of ``model`` off (``p = 0``), as trl does for its RL trainers."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def rollout_batches(trainer: Any, updates_per_batch: int) -> int:
    """Scheduler steps of an RL run = rollout batches: ``max_epochs`` epochs of batches, capped by the batches
    ``trainer.max_steps`` optimizer steps take (``ceil(max_steps / updates_per_batch)``)."""
    batches = trainer.datamodule.num_train_batches()
    limits = [batches * trainer.max_epochs] if trainer.max_epochs is not None and trainer.max_epochs > 0 else []
    if trainer.max_steps > 0:
        limits.append(math.ceil(trainer.max_steps / updates_per_batch))
    return min(limits) if limits else batches


def check_manual_optimization(cfg: DictConfig, updates: str) -> None:
    """Trainer settings an objective that steps its optimizer itself (``updates`` optimizer steps per rollout batch,
    in words) cannot honour: gradient accumulation and Lightning's gradient clipping (``task.max_grad_norm`` clips)."""
    trainer, name = cfg.trainer, cfg.task.name
    if trainer.get("accumulate_grad_batches", 1) != 1:
        raise ConfigError(
            f"task={name} steps its optimizer itself ({updates} per rollout batch): set "
            f"trainer.accumulate_grad_batches=1, not {trainer.accumulate_grad_batches}; a larger rollout batch "
            "is data.batch_size"
        )
    if trainer.get("gradient_clip_val"):
        raise ConfigError(
            f"task={name} clips gradients itself: set trainer.gradient_clip_val=null (it is "
            f"{trainer.gradient_clip_val}) and use task.max_grad_norm"
        )


def response_mask(response: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """True on each row's tokens up to and including its first ``eos_token_id`` (on all of them without one)."""
    is_eos = response == eos_token_id
    return (is_eos.cumsum(-1) - is_eos.long()) == 0


@dataclass
class Completions:
    """Prompts followed by the policy's generated tokens (no gradient)."""

    input_ids: torch.Tensor  # [B, P + R] left-padded prompts, then R generated tokens
    attention_mask: torch.Tensor  # [B, P + R] 0 on the prompts' padding
    mask: torch.Tensor  # [B, R] bool: response tokens up to and including the first EOS
    ended: torch.Tensor  # [B] bool: the completion has an EOS
    texts: list[str]  # decoded response tokens (special tokens left out; not stripped)

    @property
    def labels(self) -> torch.Tensor:
        """[B, R + 1] token_logps labels of the response: ``logits[:, -(R + 1) + t]`` predicts response token ``t``;
        -100 on the first column and after each row's first EOS."""
        tail = self.input_ids[:, -(self.mask.shape[1] + 1) :]
        keep = torch.nn.functional.pad(self.mask, (1, 0), value=False)
        return tail.masked_fill(~keep, IGNORE_INDEX)


def concat_completions(parts: Sequence[Completions], pad_token_id: int) -> Completions:
    """The rows of several :class:`Completions` as one: each part's prompts padded on the left and its responses on
    the right to the longest (``pad_token_id``, attention 0, outside the response mask), so every row keeps its
    tokens, response mask and :attr:`Completions.labels` (up to the padding)."""
    prompt = max(part.input_ids.shape[1] - part.mask.shape[1] for part in parts)
    response = max(part.mask.shape[1] for part in parts)

    def pad(part: Completions, tensor: torch.Tensor, value: int | bool) -> torch.Tensor:
        left = prompt - (part.input_ids.shape[1] - part.mask.shape[1])
        return torch.nn.functional.pad(tensor, (left, response - part.mask.shape[1]), value=value)

    return Completions(
        input_ids=torch.cat([pad(part, part.input_ids, pad_token_id) for part in parts]),
        attention_mask=torch.cat([pad(part, part.attention_mask, 0) for part in parts]),
        mask=torch.cat([torch.nn.functional.pad(part.mask, (0, response - part.mask.shape[1])) for part in parts]),
        ended=torch.cat([part.ended for part in parts]),
        texts=[text for part in parts for text in part.texts],
    )


Prompts = Mapping[str, torch.Tensor]  # input_ids [B, P] left-padded, attention_mask [B, P] (0 on the padding)


class GenerationEngine(Protocol):
    """What samples the completions of a rollout; the objectives see only :class:`RolloutEngine`, so another
    engine (vLLM on a GPU machine, serving the policy's weights) is a class with this one method."""

    def generate(self, policy: torch.nn.Module, prompts: Prompts, temperature: float | None) -> torch.Tensor:
        """[B, P + R]: the prompts' ``input_ids`` followed by up to ``R`` tokens (the engine's own cap) of ``policy``
        as its weights are now, sampled from ``softmax(logits / temperature)`` over the full vocabulary, or greedy
        for ``temperature=None``; a row that ends before ``R`` is filled after its EOS (with EOS or padding). No
        gradient."""
        ...


class TransformersEngine:
    """:class:`GenerationEngine` of transformers' ``generate`` on the policy itself, in eval mode, up to
    ``max_new_tokens`` tokens (:func:`tunelab.generation.generate_tokens`)."""

    def __init__(self, tokenizer: Any, max_new_tokens: int) -> None:
        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens

    @torch.no_grad()
    def generate(self, policy: torch.nn.Module, prompts: Prompts, temperature: float | None) -> torch.Tensor:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {}
        input_ids, attention_mask = prompts["input_ids"], prompts["attention_mask"]
        return generate_tokens(policy, self.tokenizer, input_ids, attention_mask, self.max_new_tokens, **sampling)


class RolloutEngine:
    """Completions of prompts, their rewards, and their log-probs under the policy and the reference (module
    docstring); ``reference`` ``None``: an objective without one (GRPO at ``beta = 0``); ``generator`` the
    :class:`GenerationEngine` that samples (default: :class:`TransformersEngine` up to ``max_new_tokens``)."""

    def __init__(
        self,
        tokenizer: Any,
        reward_fn: RewardFn,
        reference: ReferenceModel | None,
        *,
        temperature: float,
        max_new_tokens: int,
        generator: GenerationEngine | None = None,
    ) -> None:
        self.tokenizer, self.reward_fn, self.reference = tokenizer, reward_fn, reference
        self.generator = generator if generator is not None else TransformersEngine(tokenizer, max_new_tokens)
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.zeroed = 0  # samples of the last score() call scored 0 after an error

    @torch.no_grad()
    def complete(self, policy: torch.nn.Module, batch: Mapping[str, Any], *, sample: bool) -> Completions:
        """Completions of the batch's prompts (``input_ids`` / ``attention_mask``, left-padded) in eval mode:
        sampled from ``pi`` or greedy."""
        temperature = self.temperature if sample else None
        output = self.generator.generate(policy, batch, temperature)
        response = output[:, batch["input_ids"].shape[1] :]
        mask = response_mask(response, self.tokenizer.eos_token_id)
        tokens = [row[keep].tolist() for row, keep in zip(response, mask, strict=True)]
        return Completions(
            input_ids=output,
            attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(response)], dim=1),
            mask=mask,
            ended=(response == self.tokenizer.eos_token_id).any(-1),
            texts=self.tokenizer.batch_decode(tokens, skip_special_tokens=True),
        )

    def score(self, completions: Completions, records: Sequence[dict[str, Any]]) -> torch.Tensor:
        """``reward_fn`` of the completions, float32 [B] on the completions' device; :attr:`zeroed` becomes the count
        of its samples scored 0 after an error (``on_error: zero``, ``take_zeroed()`` of the reward; 0 for a reward
        that does not count them)."""
        device = completions.input_ids.device
        place = getattr(self.reward_fn, "to", None)
        if callable(place):
            place(device)
        rewards = self.reward_fn(completions.texts, list(records)).to(device, torch.float32)
        take = getattr(self.reward_fn, "take_zeroed", None)
        self.zeroed = int(take()) if callable(take) else 0
        return rewards

    def response_logps(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From the logits of a forward over a completion: ``log pi(a_t)`` [B, R] (0 off the response) and the
        response positions' logits divided by ``T`` [B, R + 1, V] (``labels``: :attr:`Completions.labels`; the
        positions are counted from the end, as soft-prompt methods prepend virtual ones)."""
        scaled = logits[:, -labels.shape[1] :] / self.temperature
        return token_logps(scaled, labels)[0], scaled

    @torch.no_grad()
    def reference_logps(
        self, policy: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """``log pi_ref(a_t)`` [B, R] of the response tokens (0 off the response)."""
        if self.reference is None:
            raise RuntimeError("this rollout engine was built without a reference model")
        return self.response_logps(self.reference.logits(policy, input_ids, attention_mask), labels)[0]
