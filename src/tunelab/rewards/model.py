"""A trained reward model as a PPO reward: ``reward = r(prompt, completion)``, one scalar per completion.

The reward model is a transformers ``*ForSequenceClassification`` with one output (``num_labels=1``), e.g. the
export of a task=reward run; its score of a conversation is ``model(input_ids, attention_mask).logits[:, 0]``.
Each completion is rendered as ``template(prompt turns + [assistant: completion])`` with the reward model's own
tokenizer and chat template (the way its preference pairs were rendered in training, without truncation), right
padded, and scored in eval mode under ``no_grad``. The prompt turns come from the record
(:func:`tunelab.data.prompts.prompt_turns` of its ``prompt`` field), so the reward function keeps the
``(completions, records) -> rewards`` protocol of every reward.

The scorer is a frozen model held outside the policy's module tree (no checkpoint, optimizer or ``.train()``
reaches it); :meth:`RewardModelScorer.to` moves it beside the policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from tunelab.data.prompts import prompt_turns
from tunelab.errors import ConfigError


class RewardModelScorer:
    """``(completions, records) -> rewards [B]`` (float32, on the CPU) from a one-output sequence classifier."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        outputs = getattr(model.config, "num_labels", None)
        if outputs != 1:
            raise ConfigError(f"a reward model scores with one output (num_labels=1); this one has {outputs}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def to(self, device: torch.device) -> RewardModelScorer:
        self.model.to(device)
        return self

    def conversation_ids(self, completion: str, record: Mapping[str, Any]) -> list[int]:
        """Token ids of ``template(prompt turns + [assistant: completion])``."""
        conversation = [*prompt_turns(record), {"role": "assistant", "content": completion}]
        return list(self.tokenizer.apply_chat_template(conversation, return_dict=False))

    @torch.no_grad()
    def __call__(self, completions: Sequence[str], records: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        rows = [
            torch.tensor(self.conversation_ids(completion, record), dtype=torch.long)
            for completion, record in zip(completions, records, strict=True)
        ]
        input_ids = pad_sequence(rows, batch_first=True, padding_value=self.pad_token_id)
        attention_mask = pad_sequence([torch.ones_like(row) for row in rows], batch_first=True, padding_value=0)
        logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        return logits[:, 0].float().cpu()
