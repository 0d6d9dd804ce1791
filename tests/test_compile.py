"""model.compile=true: each transformer block is compiled in place; outputs, gradients and state-dict names match
the eager model (tiny Llama + LoRA, fp32 CPU)."""

from __future__ import annotations

import torch

from tunelab.methods import apply_method
from tunelab.models.loading import load_model


def adapted(compose_cfg, cache_dir, compile_blocks: bool):
    cfg = compose_cfg(["model=tiny", "method=lora", "method.dropout=0", f"model.compile={str(compile_blocks).lower()}"])
    loaded = load_model(cfg.model, cache_dir)
    torch.manual_seed(0)  # the same random LoRA A matrices in both models
    return apply_method(loaded.model, cfg.method, loaded.tokenizer)


def test_compiled_blocks_match_the_eager_model(compose_cfg, cache_dir):
    eager, compiled = adapted(compose_cfg, cache_dir, False), adapted(compose_cfg, cache_dir, True)
    blocks = [m for m in compiled.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        logits = model(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        outputs[name] = (logits.detach(), grads)
    # README: within 1e-5 (measured: logits 3.0e-7, LoRA gradients 1.0e-9)
    torch.testing.assert_close(outputs["compiled"][0], outputs["eager"][0], atol=1e-5, rtol=0)
    for name, grad in outputs["eager"][1].items():
        torch.testing.assert_close(outputs["compiled"][1][name], grad, atol=1e-5, rtol=0, msg=name)


def test_compiled_blocks_run_segment_attention_on_packed_rows(compose_cfg, cache_dir):
    """Packed rows through compiled blocks: the per-example attention stays eager (its lengths change every batch)
    and the logits equal the eager model's."""
    from tunelab.models.segment_attention import use_segment_attention

    models = {"eager": adapted(compose_cfg, cache_dir, False), "compiled": adapted(compose_cfg, cache_dir, True)}
    lengths = [7, 12, 5]
    ids = torch.randint(0, 1000, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    logits = {}
    for name, model in models.items():
        assert use_segment_attention(model)
        packed = {"position_ids": positions, "segment_lengths": lengths, "use_cache": False}
        logits[name] = model(input_ids=ids, **packed).logits.detach()
    torch.testing.assert_close(logits["compiled"], logits["eager"], atol=1e-5, rtol=0)  # measured: 2.4e-7
