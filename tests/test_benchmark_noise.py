"""The agreement floor of ``benchmarks/run.py deploy-noise``: its float-rounding noise reaches every
activation quantizer's input and nothing else, is seeded, and is gone after the run."""

from __future__ import annotations

import torch

from conftest import benchmark_module, tiny_vit
from dopq import quantize
from dopq.config import get_preset


def _quantized():
    model, images = tiny_vit()
    return quantize(model, images, get_preset("recommended", w_bits=8, a_bits=8)), images


@torch.no_grad()
def test_noise_reaches_activation_quantizers_only_and_is_seeded():
    noisy = benchmark_module("deploy")._noisy_activation_inputs
    model, images = _quantized()
    reference = model(images)
    weight_inputs: list[torch.Tensor] = []
    weight_quantizers = [m.weight_quantizer for m in model.modules() if hasattr(m, "weight_quantizer")]
    for q in weight_quantizers:
        q.register_forward_pre_hook(lambda m, a: weight_inputs.append(a[0].clone()))
    model(images)
    clean_weights, weight_inputs[:] = list(weight_inputs), []
    with noisy(model, 0.0, seed=0):
        assert torch.equal(model(images), reference)  # zero noise: the same computation
    weight_inputs.clear()
    with noisy(model, 1e-3, seed=0):
        first = model(images)
    assert len(weight_inputs) == len(clean_weights) == len(weight_quantizers) > 0
    assert all(torch.equal(a, b) for a, b in zip(weight_inputs, clean_weights, strict=True))
    with noisy(model, 1e-3, seed=0):
        again = model(images)
    with noisy(model, 1e-3, seed=1):
        other = model(images)
    assert torch.equal(first, again)
    assert not torch.equal(first, reference) and not torch.equal(first, other)
    assert torch.equal(model(images), reference)  # the hooks are gone
