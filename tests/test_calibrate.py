"""Calibration-stage statistics: empirical bias correction."""

from __future__ import annotations

import torch
from torch import nn

from dopq.calibrate import calibrate, correct_bias
from dopq.modules import QuantLinear
from dopq.quantizers import PerChannel, PerTensor, UniformQuantizer


def _quant_mlp() -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    for i in (0, 2):
        net[i] = QuantLinear(net[i], UniformQuantizer(3, PerTensor()), UniformQuantizer(3, PerChannel(0)))
    x = torch.randn(64, 10, 16) + 0.5  # inputs with a non-zero mean, so weight errors bias the outputs
    calibrate(net, x)
    return net, x


def _mean_layer_errors(net: nn.Sequential, x: torch.Tensor, biases: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per quantized Linear, on its inputs in the quantized net: mean of output - float output,
    the float output using the original ``biases``."""
    errors = []
    with torch.no_grad():
        h = x
        for layer in net:
            out = layer(h)
            if isinstance(layer, QuantLinear):
                ref = nn.functional.linear(h, layer.weight, biases[len(errors)])
                errors.append((out - ref).reshape(-1, out.shape[-1]).mean(0))
            h = out
    return errors


def test_bias_correction_removes_the_mean_output_error():
    net, x = _quant_mlp()
    biases = [net[0].bias.detach().clone(), net[2].bias.detach().clone()]
    before = _mean_layer_errors(net, x, biases)
    assert max(float(e.abs().max()) for e in before) > 1e-2
    corrections = correct_bias(net, x, max_images=len(x))
    assert set(corrections) == {"0", "2"}
    after = _mean_layer_errors(net, x, biases)
    assert max(float(e.abs().max()) for e in after) < 1e-4
    # layer 0 sees the same inputs as before, so its correction is exactly its mean error
    assert torch.allclose(net[0].bias - biases[0], -before[0], atol=1e-5)
