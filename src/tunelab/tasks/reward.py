"""Reward model (task=reward): the backbone with a scalar head, trained on preference pairs.

``r(x, y)`` is the head's score of prompt + reply (a decoder scores its last non-pad token, an encoder its
[CLS]); ``loss = mean_i -log sigmoid(r(x_i, y_c) - r(x_i, y_r))`` (Bradley-Terry). Validation / test: the
loss, preference accuracy ``mean(r_c > r_r)``, mean margin and mean reward of chosen / rejected replies.
"""

from __future__ import annotations

import torch

from tunelab.tasks.pairwise import PairwiseModule, pair_statistics, split_pairs
from tunelab.tasks.preference_losses import bradley_terry_loss


class RewardModule(PairwiseModule):
    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar reward of every row [2B]."""
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()

    def pair_outputs(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = split_pairs(self.scores(batch))
        return bradley_terry_loss(chosen, rejected), pair_statistics(chosen.detach(), rejected.detach())
