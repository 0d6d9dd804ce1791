"""lm-eval's view of a loaded tunelab model: :class:`RunLM`, lm-eval's ``HFLM`` on the model and tokenizer objects."""

from __future__ import annotations

import torch
from lm_eval.models.huggingface import HFLM


class RunLM(HFLM):
    """``HFLM`` whose logits line up with its inputs for every method, soft prompts included.

    peft's prompt and P-tuning models prepend their virtual tokens to the input embeddings and return logits for
    them too, ``num_virtual_tokens`` positions more than the input; HFLM reads logits by input position, so it would
    score the wrong tokens. Only the last ``inps.shape[1]`` positions belong to the input; for every other model
    that is all of them."""

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return super()._model_call(inps, attn_mask, labels)[:, -inps.shape[1] :]
