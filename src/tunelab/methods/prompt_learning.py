"""Soft-prompt methods through peft: the backbone is frozen and only virtual-token parameters train.

- ``prompt`` (Lester et al., 2021): P in R^{n x d} is prepended to the input embeddings; only P trains.
  Init: ``random``, ``vocab`` (embeddings of n sampled vocabulary tokens) or ``text`` (embeddings of the
  tokenized ``init_text``, repeated or cut to n tokens).
- ``ptuning`` (Liu et al., 2021, GPT Understands, Too): the n prompt embeddings are the output of a small
  prompt encoder (MLP or LSTM) over trainable inputs, which reparameterises and stabilises them.
- ``prefix`` (Li & Liang, 2021): trainable key/value prefixes of length n at every attention layer, produced
  through an MLP reparameterisation (``prefix_projection``) during training.
- ``ptuning_v2`` (Liu et al., 2022): the same deep per-layer prefixes without reparameterisation.

Direct (non-projected) prefixes start, with ``prefix_init: text``, as the keys and values the frozen model
itself computes for ``prefix_init_text`` (tokens repeated or cut to n): at step 0 the adapted model then
behaves exactly as the base model reading that text before every input, instead of attending to random
N(0, 1) keys and values, which wrecks a pretrained decoder (SmolLM2: validation loss 3.16 -> 10.4). Li & Liang
report the same: prefixes initialised from real words' activations train far better. This needs a causal LM
(its KV cache); other models (BERT-like encoders) start random.

Prompt and P-tuning lengthen the sequence by n positions in front; callers keep the last ``seq_len`` logits.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.compat.peft import expose_past_key_values
from tunelab.errors import ConfigError
from tunelab.methods.peft_task import peft_task_type
from tunelab.methods.spec import METHODS, Method
from tunelab.models.loading import ENCODER_MODEL_TYPES, declared_model_type

PROMPT_INITS = ("random", "vocab", "text")
PREFIX_INITS = ("random", "text")
ENCODERS = ("MLP", "LSTM")


def _wrap(model: torch.nn.Module, config: Any) -> torch.nn.Module:
    from peft import get_peft_model

    if getattr(model, "is_activation_checkpointing", False):
        raise ConfigError(
            f"method={config.peft_type.value.lower()} cannot run with model.gradient_checkpointing=true: "
            "virtual tokens are fed through past key values / input embeddings that checkpointing drops"
        )
    expose_past_key_values(model)
    return get_peft_model(model, config)


def _check_length(method_cfg: DictConfig) -> int:
    if method_cfg.num_virtual_tokens < 1:
        raise ConfigError(f"method.num_virtual_tokens must be >= 1, got {method_cfg.num_virtual_tokens}")
    return int(method_cfg.num_virtual_tokens)


def adapt_prompt(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Prompt tuning; ``text`` init copies the embeddings of ``method.init_text``'s tokens."""
    from peft import PromptTuningConfig, PromptTuningInit

    length = _check_length(method_cfg)
    if method_cfg.init not in PROMPT_INITS:
        raise ConfigError(f"method.init={method_cfg.init!r} is not one of {list(PROMPT_INITS)}")
    if method_cfg.init == "text" and not method_cfg.get("init_text"):
        raise ConfigError("method.init=text needs method.init_text (the words whose embeddings start the prompt)")
    init = PromptTuningInit.SAMPLE_VOCAB if method_cfg.init == "vocab" else PromptTuningInit.RANDOM
    peft_model = _wrap(
        model, PromptTuningConfig(task_type=peft_task_type(model), num_virtual_tokens=length, prompt_tuning_init=init)
    )
    if method_cfg.init == "text":
        if tokenizer is None:
            raise ConfigError("method.init=text needs the model's tokenizer")
        ids = _repeat_to(tokenizer(method_cfg.init_text, add_special_tokens=False)["input_ids"], length)
        embedding = peft_model.get_input_embeddings()
        with torch.no_grad():
            prompt = peft_model.prompt_encoder["default"].embedding.weight
            prompt.copy_(embedding(torch.tensor(ids, device=embedding.weight.device)).to(prompt.dtype))
    return peft_model


def adapt_ptuning(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """P-tuning: prompt embeddings produced by a trainable MLP/LSTM prompt encoder."""
    from peft import PromptEncoderConfig

    if method_cfg.encoder not in ENCODERS:
        raise ConfigError(f"method.encoder={method_cfg.encoder!r} is not one of {list(ENCODERS)}")
    config = PromptEncoderConfig(
        task_type=peft_task_type(model),
        num_virtual_tokens=_check_length(method_cfg),
        encoder_reparameterization_type=method_cfg.encoder,
        encoder_hidden_size=method_cfg.encoder_hidden_size,
        encoder_num_layers=method_cfg.encoder_num_layers,
        encoder_dropout=method_cfg.encoder_dropout,
    )
    return _wrap(model, config)


def _repeat_to(ids: list[int], length: int) -> list[int]:
    return (ids * (length // max(len(ids), 1) + 1))[:length]


def init_prefix_from_text(peft_model: torch.nn.Module, tokenizer: Any, text: str) -> None:
    """Set direct prefixes to the frozen model's keys / values for ``text`` (see module docstring).

    peft reads row t of the prefix table as ``[K_0[t], V_0[t], K_1[t], V_1[t], ...]``, each the flattened
    (kv heads x head dim) key or value of layer l at position t: the layout of the model's own KV cache.
    """
    table = peft_model.prompt_encoder["default"].embedding.weight
    ids = _repeat_to(tokenizer(text, add_special_tokens=False)["input_ids"], table.shape[0])
    with torch.no_grad(), peft_model.disable_adapter():
        cache = peft_model.base_model(
            input_ids=torch.tensor([ids], device=table.device), use_cache=True
        ).past_key_values
        rows = [
            torch.cat([layer.keys[0].transpose(0, 1).flatten(1), layer.values[0].transpose(0, 1).flatten(1)], -1)
            for layer in cache.layers
        ]
        table.copy_(torch.cat(rows, -1).to(table.dtype))


def adapt_prefix(model: torch.nn.Module, method_cfg: DictConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Prefix tuning (MLP reparameterisation) or, with ``prefix_projection: false``, P-tuning v2."""
    from peft import PrefixTuningConfig

    init = method_cfg.get("prefix_init", "random")
    if init not in PREFIX_INITS:
        raise ConfigError(f"method.prefix_init={init!r} is not one of {list(PREFIX_INITS)}")
    if init == "text" and method_cfg.prefix_projection:
        raise ConfigError("method.prefix_init=text sets the prefixes directly: it needs method.prefix_projection=false")
    task_type = peft_task_type(model)
    config = PrefixTuningConfig(
        task_type=task_type,
        num_virtual_tokens=_check_length(method_cfg),
        prefix_projection=method_cfg.prefix_projection,
        encoder_hidden_size=method_cfg.get("encoder_hidden_size") or model.config.hidden_size,
    )
    peft_model = _wrap(model, config)
    if init == "text" and task_type == "CAUSAL_LM":
        if tokenizer is None:
            raise ConfigError("method.prefix_init=text needs the model's tokenizer")
        init_prefix_from_text(peft_model, tokenizer, method_cfg.prefix_init_text)
    return peft_model


def check_inputs_reach_the_head(cfg: DictConfig, head: str) -> None:
    """Prompt tuning and P-tuning prepend virtual tokens to the inputs; a decoder's sequence-classification head
    scores the last non-pad token, which peft's virtual-token inputs hide."""
    model_type = declared_model_type(cfg.model)
    if head == "sequence_classification" and model_type not in ENCODER_MODEL_TYPES:
        raise ConfigError(
            f"method={cfg.method.name} cannot feed task={cfg.task.name} on the decoder model={cfg.model.name}: its "
            "head scores the last non-pad token, which peft's virtual-token inputs hide; use an encoder "
            "(model=minilm_l6) or method=prefix / ptuning_v2 / lora"
        )


for entry in (
    Method(name="prompt", adapt=adapt_prompt, virtual_tokens=True, check=check_inputs_reach_the_head),
    Method(name="ptuning", adapt=adapt_ptuning, virtual_tokens=True, check=check_inputs_reach_the_head),
    Method(name="prefix", adapt=adapt_prefix, virtual_tokens=True),
    Method(name="ptuning_v2", adapt=adapt_prefix, virtual_tokens=True),
):
    METHODS.register(entry)
