"""Direct prefixes initialised from text: at step 0 the adapted model equals the base model reading the text
first (same logits on the input positions), for ptuning_v2 and the prefix part of mam."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tunelab.errors import ConfigError
from tunelab.methods import apply_method
from tunelab.models.loading import load_model

from .conftest import CONFIGS

TEXT = "Answer briefly."


def tiny_llama(cache_dir):
    loaded = load_model(OmegaConf.load(CONFIGS / "model" / "tiny.yaml"), cache_dir)
    return loaded.model.eval(), loaded.tokenizer


def logits_after_prefix(cache_dir, length: int, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(adapted model's logits on the inputs, base model's logits on the inputs read after the text prefix)."""
    model, tokenizer = tiny_llama(cache_dir)
    text_ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    prefix_ids = (text_ids * length)[:length]
    inputs = torch.tensor([[11, 12, 13, 14, 15], [21, 22, 23, 24, 25]])
    with torch.no_grad():
        expected = model(input_ids=torch.cat([torch.tensor([prefix_ids] * 2), inputs], 1)).logits[:, length:]
    cfg = OmegaConf.load(CONFIGS / "method" / "ptuning_v2.yaml")
    cfg.num_virtual_tokens, cfg.prefix_init_text, cfg.prefix_init = length, TEXT, init
    adapted = apply_method(model, cfg, tokenizer).eval()
    with torch.no_grad():
        return adapted(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits, expected


@pytest.mark.parametrize("length", [4, 7])
def test_prefix_from_text_equals_base_model_reading_the_text(cache_dir, length):
    actual, expected = logits_after_prefix(cache_dir, length, "text")
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)  # fp32 rounding: measured 1.9e-7 (n 4), 0.0 (n 7)


def test_random_prefix_does_not_reproduce_the_text(cache_dir):
    actual, expected = logits_after_prefix(cache_dir, 4, "random")
    assert (actual - expected).abs().max().item() > 1e-2


def test_text_init_with_a_projection_is_refused(cache_dir):
    model, tokenizer = tiny_llama(cache_dir)
    cfg = OmegaConf.load(CONFIGS / "method" / "prefix.yaml")
    cfg.prefix_init = "text"
    with pytest.raises(ConfigError, match="prefix_projection=false"):
        apply_method(model, cfg, tokenizer)
