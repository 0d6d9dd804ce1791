"""Attention over a packed row one example at a time (``attn_implementation=tunelab_segment_sdpa``).

A packed row of examples with lengths ``n_1 .. n_k`` needs ``sum n_i^2`` attention scores, but transformers'
``sdpa`` path turns the restarting position ids into a dense block-diagonal mask over the whole row and computes all
``(sum n_i)^2`` of them (on CPU with the mask it also loses the causal kernel, which skips the upper triangle).
``flash_attention_2`` does it right (varlen kernels), but only on a GPU with flash-attn installed. This attention
function runs ``scaled_dot_product_attention(is_causal=True)`` on each example's slice of the row and concatenates
the outputs: mathematically the block-diagonal causal attention, with none of the cross-example work. Batches
without ``segment_lengths`` (padded training, validation, generation) go to transformers' own ``sdpa`` unchanged.

Written here because neither transformers nor torch offers varlen attention without flash-attn (torch's nested
tensors do not take GQA, dropout and ``is_causal`` together on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SEGMENT_SDPA = "tunelab_segment_sdpa"


def segment_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    segment_lengths: Sequence[int] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``query/key/value`` are ``(1, heads, sum n_i, head_dim)``, the
    output ``(1, sum n_i, heads, head_dim)``. With ``segment_lengths`` the (block-diagonal) ``attention_mask`` is
    ignored: each slice attends causally to itself only."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if segment_lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return _per_segment(module, query, key, value, tuple(segment_lengths), **kwargs)


@torch.compiler.disable
def _per_segment(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segment_lengths: tuple[int, ...],
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Left to eager under ``model.compile``: the segment lengths change every batch (a recompile each time)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[0] != 1 or sum(segment_lengths) != query.shape[2]:
        raise ValueError(
            f"segment_lengths {list(segment_lengths)} do not tile a packed row of shape {tuple(query.shape)}"
        )
    kwargs["is_causal"] = True
    outputs = [
        sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]
        for q, k, v in zip(
            query.split(segment_lengths, dim=2),
            key.split(segment_lengths, dim=2),
            value.split(segment_lengths, dim=2),
            strict=True,
        )
    ]
    return torch.cat(outputs, dim=1), None


def register_segment_attention() -> None:
    """Make ``SEGMENT_SDPA`` a valid ``attn_implementation``; its masks (for padded batches) are ``sdpa``'s."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_SDPA, sdpa_mask)


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def runs_segment_attention(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the model a peft wrapper holds) attends with ``SEGMENT_SDPA``."""
    config = getattr(_base_model(model), "config", None)
    return getattr(config, "_attn_implementation", None) == SEGMENT_SDPA


def use_segment_attention(model: torch.nn.Module) -> bool:
    """Switch a model from ``sdpa`` to ``SEGMENT_SDPA``; other implementations (``flash_attention_2`` handles packed
    rows itself, ``eager`` is kept as the exact reference) are left alone. Returns ``runs_segment_attention``."""
    from transformers import PreTrainedModel

    base = _base_model(model)
    if isinstance(base, PreTrainedModel) and base.config._attn_implementation == "sdpa":
        register_segment_attention()
        base.set_attn_implementation(SEGMENT_SDPA)
    return runs_segment_attention(model)
