"""The in-house branch math (tunelab.methods.inhouse, adapter, unipelt) against hand-written formulas."""

from __future__ import annotations

import torch

from tunelab.methods.inhouse import Bottleneck, LowRank, adapters_disabled, attach
from tunelab.methods.unipelt import PrefixGate, _gate_prefix


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module


def test_sequential_adapter_reads_the_sublayer_output():
    torch.manual_seed(0)
    linear, x = torch.nn.Linear(6, 6), torch.randn(3, 6)
    adapter = perturbed(Bottleneck(6, 2, activation="relu", scale=2.0))
    expected = linear(x) + 2.0 * adapter.up(torch.relu(adapter.down(linear(x))))
    attach(linear, "adapter", adapter)
    torch.testing.assert_close(linear(x), expected)


def test_parallel_adapter_reads_the_sublayer_input():
    torch.manual_seed(0)
    linear, x = torch.nn.Linear(6, 6), torch.randn(3, 6)
    adapter = perturbed(Bottleneck(6, 2, activation="tanh", scale=4.0, placement="parallel"))
    expected = linear(x) + 4.0 * adapter.up(torch.tanh(adapter.down(x)))
    attach(linear, "adapter", adapter)
    torch.testing.assert_close(linear(x), expected)


def test_gated_lora_scales_the_update_by_a_per_token_sigmoid_gate():
    torch.manual_seed(0)
    linear, x = torch.nn.Linear(8, 4), torch.randn(2, 5, 8)
    lora = perturbed(LowRank(8, 4, 2, alpha=6.0, gated=True))
    gate = torch.sigmoid(x @ lora.gate.weight.T + lora.gate.bias)
    expected = linear(x) + gate * (6.0 / 2) * (x @ lora.lora_A.weight.T @ lora.lora_B.weight.T)
    attach(linear, "lora", lora)
    torch.testing.assert_close(linear(x), expected)
    with adapters_disabled(linear):
        torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias))


def test_houlsby_init_is_near_identity_and_lora_init_is_exact_identity():
    x = torch.randn(4, 32)
    assert Bottleneck(32, 8)(x).abs().max() < 1e-2
    assert torch.equal(LowRank(32, 16, 4, alpha=8.0)(x), torch.zeros(4, 16))


def test_prefix_gate_scales_only_the_value_prefixes():
    layers, token_dim = 3, 4
    encoder = torch.nn.Identity()
    encoder.add_module("gate", PrefixGate(layers))
    with torch.no_grad():
        encoder.gate.logits.copy_(torch.tensor([0.0, 2.0, -1.0]))
    prefixes = torch.randn(2, 5, layers * 2 * token_dim)
    gated = _gate_prefix(encoder, (prefixes,), prefixes).unflatten(-1, (layers, 2, token_dim))
    original = prefixes.unflatten(-1, (layers, 2, token_dim))
    torch.testing.assert_close(gated[..., 0, :], original[..., 0, :])
    for layer, logit in enumerate([0.0, 2.0, -1.0]):
        expected = torch.sigmoid(torch.tensor(logit)) * original[:, :, layer, 1]
        torch.testing.assert_close(gated[:, :, layer, 1], expected)
