"""Post-LayerNorm re-parameterization: exact FP preservation, the per-channel grid, MOSF rules."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from dopq.calibrate import calibrate
from dopq.config import get_preset
from dopq.models import prepare_model
from dopq.modules import quantizers_of, set_quantization
from dopq.quantizers import PerTensor
from dopq.reparam import fold_layernorm, reparameterize, target_scale
from dopq.stress import rescale_layernorm_channels


def _tiny_vit():
    return timm.create_model("test_vit", num_classes=10).eval()


def test_fold_preserves_the_float_function_exactly():
    model = _tiny_vit()
    block = model.blocks[0]
    x = torch.randn(4, 17, block.norm1.normalized_shape[0])
    ref = block.attn.qkv(block.norm1(x))
    d = torch.rand(x.shape[-1]) * 3 + 0.01
    z = torch.randint(0, 16, (x.shape[-1],)).float()
    fold_layernorm(block.norm1, [block.attn.qkv], d, z, d.median(), torch.tensor(7.0))
    assert torch.allclose(block.attn.qkv(block.norm1(x)), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", ["bias", "input"])
@pytest.mark.parametrize("rule", ["mean", "median", "mad", "search"])
def test_model_function_preserved_and_reported(rule, shift):
    model = _tiny_vit()
    images = torch.randn(8, 3, 160, 160)
    with torch.no_grad():
        ref = model(images)
    plan = prepare_model(model, get_preset("repq", ln_scale=rule))
    from dopq.calibrate import capture_inputs

    with capture_inputs(model, plan.paired_linears) as captured:
        calibrate(model, images)
    report = reparameterize(model, plan, rule=rule, shift=shift, check_images=images, captured=captured)
    assert report.max_logit_change < 1e-4
    set_quantization(model, False, False)
    with torch.no_grad():
        assert torch.allclose(model(images), ref, atol=1e-4)
    assert len(report.targets) == len(plan.pairs)


def test_integer_target_keeps_every_channel_grid():
    """With an integer z*, the per-tensor quantizer after folding reproduces per-channel quantization."""
    model = _tiny_vit()
    images = torch.randn(6, 3, 160, 160)
    plan = prepare_model(model, get_preset("dopq"))
    calibrate(model, images)
    lin = model.blocks[0].attn.qkv
    x = torch.randn(3, 5, lin.in_features) * 2
    norm = model.blocks[0].norm1
    before = lin.input_quantizer(norm(x)) @ lin.weight.T + lin.bias
    for rule in ("mean", "median"):
        m = copy.deepcopy(model)
        reparameterize(m, plan, rule=rule, integer_zero_point=True)
        lq = m.blocks[0].attn.qkv
        after = lq.input_quantizer(m.blocks[0].norm1(x)) @ lq.weight.T + lq.bias
        assert torch.allclose(after, before, atol=2e-4, rtol=1e-4), rule


def test_rules_on_known_scales():
    d = torch.tensor([1.0, 1.1, 0.9, 1.2, 0.8, 40.0])  # one outlier channel
    z = torch.tensor([3.0, 4.0, 5.0, 6.0, 7.0, 0.0])
    assert torch.isclose(target_scale("mean", d, z)[0], d.mean())
    med_d, med_z = target_scale("median", d, z)
    assert med_d in d and med_z == z[d == med_d]
    mad_d, _ = target_scale("mad", d, z)
    assert torch.isclose(mad_d, d[:5].mean())  # the outlier is excluded
    with pytest.raises(ValueError, match="unknown ln_scale"):
        target_scale("max", d, z)


def test_shared_layernorm_output_is_not_paired_and_a_forced_fold_is_refused():
    """A post-norm block also adds the LayerNorm output to the residual: folding would change it."""

    class PostNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(8)
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            h = self.norm(x)
            return h + self.fc(h)

    from dopq.models.adapters import get_adapter
    from dopq.models.prepare import QuantPlan
    from dopq.models.structure import find_layernorm_pairs

    net = PostNorm()
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 2)
    # the discovery sees the second reader and does not pair them ...
    assert find_layernorm_pairs(net, torch.zeros(2, 3, 8)) == []
    # ... and were such a pair forced, the float check after folding catches it
    from dopq.models.structure import LayerNormPair
    from dopq.modules import QuantLinear

    pairs = [LayerNormPair("norm", ["fc"])]
    from dopq.quantizers import PerChannel, UniformQuantizer

    net.fc = QuantLinear(net.fc, UniformQuantizer(4, PerChannel(-1)), UniformQuantizer(4, PerChannel(0)))
    x = torch.randn(4, 3, 8) * torch.linspace(0.1, 5, 8)
    calibrate(net, x)
    plan = QuantPlan(get_adapter(_tiny_vit()), pairs)
    with pytest.raises(RuntimeError, match="changed the float logits"):
        reparameterize(net, plan, check_images=x)


def test_outlier_rescale_is_function_preserving():
    model = _tiny_vit()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        ref = model(x)
    info = rescale_layernorm_channels(model, n_channels=3, factor_range=(10.0, 40.0), seed=0)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-4)
    assert info and all(10.0 <= f <= 40.0 for r in info.values() for f in r["factors"])


def _quantized_logits(rule: str, integer_zero_point: bool, images: torch.Tensor) -> torch.Tensor:
    import dopq

    torch.manual_seed(0)
    model = _tiny_vit()
    rescale_layernorm_channels(model, n_channels=3, factor_range=(10.0, 40.0), seed=0)  # outlier channels
    cfg = dopq.get_preset("repq", ln_scale=rule, integer_zero_point=integer_zero_point)
    q = dopq.quantize(model, images, cfg, progress=False)
    with torch.no_grad():
        return q(images)


def _norm_fc_inputs(seed: int, gamma_range: tuple[float, float]):
    """A LayerNorm with uneven channel gains, the Linear it feeds, and inputs for both."""
    torch.manual_seed(seed)
    norm, fc = torch.nn.LayerNorm(16), torch.nn.Linear(16, 8)
    with torch.no_grad():
        norm.weight.uniform_(*gamma_range)
        norm.bias.uniform_(-1, 1)
    return norm, fc, torch.randn(64, 16)


def test_target_scale_has_no_effect_but_target_zero_point_does():
    """method.md's invariance, measured with weight quantization on: with an integer z*, the target
    scale d* changes nothing; the target zero point z* does, because the folded bias uses the float
    weights while the layer multiplies by the quantized ones: a shift of z* by 1 adds (Q(W') - W') d."""
    from dopq.modules import QuantLinear
    from dopq.quantizers import PerChannel, UniformQuantizer

    norm, fc, x = _norm_fc_inputs(seed=0, gamma_range=(0.5, 3))

    def output(d_t: float, z_t: float, shift: str = "bias") -> torch.Tensor:
        n, f = copy.deepcopy(norm), copy.deepcopy(fc)
        lin = QuantLinear(f, UniformQuantizer(3, PerChannel(-1)), UniformQuantizer(3, PerChannel(0)))
        calibrate(lin, n(x))
        d, z = lin.input_quantizer.scale.clone(), lin.input_quantizer.zero_point.clone()
        fold_layernorm(n, [lin], d, z, torch.tensor(d_t), torch.tensor(z_t), shift)
        lin.input_quantizer.set_qparams(torch.tensor([d_t]), torch.tensor([z_t]), PerTensor())
        lin.weight_quantizer.initialize(lin.weight.detach(), None)
        with torch.no_grad():
            return lin(n(x))

    base = output(0.5, 3.0)
    assert torch.allclose(output(0.05, 3.0), base, atol=1e-4)  # d* 10x smaller: same outputs
    assert torch.allclose(output(2.0, 3.0), base, atol=1e-4)
    assert not torch.allclose(output(0.5, 4.0), base, atol=1e-3)  # z* moved by one code

    # with the shift as an input offset the quantized weights multiply it: z* stops mattering too
    exact = output(0.5, 3.0, "input")
    for d_t, z_t in ((0.05, 3.0), (0.5, 4.0), (2.0, 0.0)):
        assert torch.allclose(output(d_t, z_t, "input"), exact, atol=1e-4), (d_t, z_t)


def test_input_shift_is_exact_per_channel_quantization():
    """ln_shift='input' with an integer z*: the re-parameterized per-tensor layer computes exactly
    per-channel asymmetric input quantization followed by the (column-scaled) quantized weights."""
    from dopq.modules import QuantLinear
    from dopq.quantizers import PerChannel, UniformQuantizer

    norm, fc, x = _norm_fc_inputs(seed=1, gamma_range=(0.2, 4))
    with torch.no_grad():
        float_ref = fc(norm(x))
    lin = QuantLinear(fc, UniformQuantizer(3, PerChannel(-1)), UniformQuantizer(3, PerChannel(0)))
    calibrate(lin, norm(x))
    with torch.no_grad():
        per_channel_x = lin.input_quantizer(norm(x))
    d, z = lin.input_quantizer.scale.clone(), lin.input_quantizer.zero_point.clone()
    d_t, z_t = target_scale("median", d, z)
    fold_layernorm(norm, [lin], d, z, d_t, z_t.round(), "input")
    lin.input_quantizer.set_qparams(d_t.reshape(1), z_t.round().reshape(1), PerTensor())
    lin.weight_quantizer.initialize(lin.weight.detach(), None)
    r = d / d_t
    with torch.no_grad():
        expected = (per_channel_x / r) @ lin.quantized_weight().T + lin.bias
        assert torch.allclose(lin(norm(x)), expected, atol=1e-4)
        set_quantization(lin, False, False)
        assert torch.allclose(lin(norm(x)), float_ref, atol=1e-5)


def test_a_pair_whose_channels_do_not_cross_zero_gets_a_zero_point_in_the_codes(tmp_path):
    """A block whose first LayerNorm shifts every channel positive: per-channel ranges that hold no 0
    put each channel's zero point far below the codes, and z* went with them; the export then refused
    ``qkv``. z* is clamped into the codes, which with the input shift changes nothing the layer computes."""
    import timm

    import dopq
    from dopq.export import OnnxModel, export_onnx

    torch.manual_seed(0)
    kwargs = dict(embed_dim=64, depth=2, num_heads=2, img_size=32, patch_size=8, num_classes=10)
    model = timm.create_model("vit_base_patch16_224", **kwargs).eval()
    with torch.no_grad():
        model.blocks[0].norm1.bias.add_(6.0)
    images = torch.randn(8, 3, 32, 32)
    qmodel, report = dopq.quantize_with_report(
        model, images, dopq.get_preset("recommended", w_bits=8, a_bits=8), progress=False
    )
    assert "blocks.0.norm1" in report.reparam.targets  # a pair, re-parameterized
    qkv = qmodel.blocks[0].attn.qkv.input_quantizer
    assert float(qkv.zero_point) == qkv.code_range[0]  # clamped: the channels' own zero points lie below
    export_onnx(qmodel, tmp_path / "q.onnx")
    with torch.no_grad():
        out = qmodel(images)
        assert (OnnxModel(tmp_path / "q.onnx", threads=1)(images) - out).abs().max() < 0.05 * out.std()


def test_mosf_rule_matters_with_fractional_zero_point():
    images = torch.randn(8, 3, 160, 160)
    a = _quantized_logits("mean", False, images)
    b = _quantized_logits("median", False, images)
    assert not torch.allclose(a, b, atol=1e-3 * float(a.abs().max()))


def test_the_float_check_leaves_each_quantizer_on_or_off_as_it_was():
    """The re-parameterization's float check runs the model with its quantizers off; afterwards every
    quantizer is as the caller left it (a quantizer switched off for an ablation stays off; the check
    used to switch every quantizer back on)."""
    from dopq.calibrate import capture_inputs

    model = _tiny_vit()
    images = torch.randn(4, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    plan = prepare_model(model, get_preset("repq"))
    with capture_inputs(model, plan.paired_linears) as captured:
        calibrate(model, images)
    kept_off = model.blocks[1].mlp.fc2.input_quantizer
    kept_off.enabled = False
    before = {name: q.enabled for name, q in quantizers_of(model)}
    reparameterize(model, plan, check_images=images, captured=captured)
    assert {name: q.enabled for name, q in quantizers_of(model)} == before
    assert not kept_off.enabled
