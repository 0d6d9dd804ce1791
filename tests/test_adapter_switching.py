"""Multi-adapter: two LoRA adapters trained on two tasks, switched on one loaded base model."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tunelab.errors import ConfigError
from tunelab.export import export_adapter, load_adapter_set, load_exported
from tunelab.methods import apply_method
from tunelab.models.loading import load_model

from .conftest import CONFIGS
from .method_helpers import aligned_logits, batch_for, sft_loss


def base(cache_dir):
    return load_model(OmegaConf.load(CONFIGS / "model" / "tiny.yaml"), cache_dir)


def train_lora(cache_dir, batch, directory, steps: int = 5):
    loaded = base(cache_dir)
    method = OmegaConf.load(CONFIGS / "method" / "lora.yaml")
    model = apply_method(loaded.model, method, loaded.tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        sft_loss(batch)(model).backward()
        optimizer.step()
        optimizer.zero_grad()
    export_adapter(model.eval(), loaded.tokenizer, directory)


def two_task_batches(tokenizer):
    """Task a: the synthetic pairs; task b: the same prompts with the answers reversed."""
    task_a = batch_for(tokenizer)
    task_b = {key: value.clone() for key, value in task_a.items()}
    supervised = task_b["labels"] != -100
    task_b["labels"][supervised] = task_a["labels"][supervised].flip(0)
    return task_a, task_b


def test_two_adapters_switch_on_one_base_model(cache_dir, tmp_path):
    tokenizer = base(cache_dir).tokenizer
    task_a, task_b = two_task_batches(tokenizer)
    train_lora(cache_dir, task_a, tmp_path / "a")
    train_lora(cache_dir, task_b, tmp_path / "b")
    model = load_adapter_set(base(cache_dir).model, {"a": tmp_path / "a", "b": tmp_path / "b"}).eval()
    base_weights = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        alone = {
            name: aligned_logits(load_exported(base(cache_dir).model, tmp_path / name).eval(), task_a) for name in "ab"
        }
        assert not torch.allclose(alone["a"], alone["b"], atol=1e-3)
        for name in ["a", "b", "a"]:
            model.set_adapter(name)
            assert torch.equal(aligned_logits(model, task_a), alone[name]), name
    assert all(p is base_weights[n] for n, p in model.named_parameters() if "lora_" not in n)  # one base, no copy


def test_adapter_set_refuses_adapters_peft_cannot_switch(cache_dir, tmp_path):
    loaded = base(cache_dir)
    method = OmegaConf.load(CONFIGS / "method" / "adapter.yaml")
    export_adapter(apply_method(loaded.model, method, loaded.tokenizer), loaded.tokenizer, tmp_path / "houlsby")
    with pytest.raises(ConfigError, match="only peft lora / qlora / ia3 adapters switch"):
        load_adapter_set(base(cache_dir).model, {"houlsby": tmp_path / "houlsby"})
