"""Each workaround in ``tunelab.compat`` still works, and a test fails once the upstream behaviour it works around
is gone (then the workaround can go)."""

from __future__ import annotations

import pytest
import torch

from tunelab.compat.peft import expose_past_key_values

from .test_methods_encoder import batch, logits, tiny_bert

VIRTUAL_TOKENS = 4


def prefix_tuned(model: torch.nn.Module) -> torch.nn.Module:
    from peft import PrefixTuningConfig, get_peft_model

    return get_peft_model(model, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=VIRTUAL_TOKENS))


def test_peft_still_refuses_a_backbone_that_names_it_cache():
    """peft 0.21 + transformers >= 5.24: without the workaround, prefix tuning cannot run on a BERT classifier."""
    model = prefix_tuned(tiny_bert())
    with pytest.raises(ValueError, match="does not support past key values"):
        logits(model, batch())


def test_exposed_backbone_reads_the_prefixes_as_its_cache():
    """With the workaround, peft's logits equal the backbone run by hand with the prefixes as ``cache`` and the
    attention mask extended over them, then pooled and classified."""
    base = tiny_bert().eval()
    expose_past_key_values(base)
    model = prefix_tuned(base).eval()
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.add_(torch.randn_like(param))
        inputs = batch()
        cache = model.get_prompt(batch_size=inputs["input_ids"].shape[0])
        mask = torch.cat(
            [torch.ones(inputs["input_ids"].shape[0], VIRTUAL_TOKENS, dtype=torch.long), inputs["attention_mask"]], 1
        )
        pooled = base.bert.__class__.forward(
            base.bert, input_ids=inputs["input_ids"], attention_mask=mask, cache=cache
        )[1]
        expected = base.classifier(pooled)
        torch.testing.assert_close(logits(model, inputs), expected, atol=1e-6, rtol=0)
        assert not torch.allclose(expected, logits(tiny_bert().eval(), inputs), atol=1e-3)
