"""Calibration-stage statistics: empirical bias correction."""

from __future__ import annotations

import torch
from torch import nn

from conftest import tiny_vit
from dopq.calibrate import calibrate, correct_bias
from dopq.config import get_preset
from dopq.models import prepare_model
from dopq.modules import QuantLinear
from dopq.quantizers import PerChannel, PerTensor, UniformQuantizer, search_output_range


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


def test_output_objective_ranges_come_from_the_products_in_the_model() -> None:
    """Calibration hands each per-tensor activation quantizer the product it enters: a Linear's
    input its weight, attention's k its q. Per-channel (post-LayerNorm) ranges keep the squared
    error."""
    seen: dict[str, torch.Tensor] = {}
    models = {}
    for objective in ("mse", "output"):
        torch.manual_seed(0)
        model, images = tiny_vit()
        prepare_model(model, get_preset("dopq", w_bits=4, a_bits=3, act_range_objective=objective))
        attn = model.blocks[0].attn
        hooks = [
            attn.proj.register_forward_pre_hook(lambda m, a: seen.setdefault("proj", a[0].detach())),
            attn.matmul_qk.register_forward_pre_hook(
                lambda m, a: seen.setdefault("qk", (a[0].detach(), a[1].detach()))
            ),
        ]
        calibrate(model, images)
        for h in hooks:
            h.remove()
        models[objective] = (model, dict(seen))
        seen.clear()
    model, inputs = models["output"]
    attn = model.blocks[0].attn
    proj_q = attn.proj.input_quantizer
    scale, zero_point = search_output_range(
        inputs["proj"], 3, lambda e: e @ attn.proj.weight.detach().T, proj_q.percentiles
    )
    assert torch.allclose(proj_q.scale, scale) and torch.equal(proj_q.zero_point, zero_point)
    q, k = inputs["qk"]
    k_q = attn.matmul_qk.quantizer_b
    scale, _ = search_output_range(k, 3, lambda e: q @ e, k_q.percentiles)
    assert torch.allclose(k_q.scale, scale)
    plain = models["mse"][0].blocks[0]
    assert not torch.equal(plain.attn.proj.input_quantizer.scale, proj_q.scale)
    # the post-LayerNorm per-channel quantizers search their own squared error either way
    assert torch.equal(plain.attn.qkv.input_quantizer.scale, attn.qkv.input_quantizer.scale)
