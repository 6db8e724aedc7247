"""Quantizer math: levels, codes, range searches, lookup tables, and their errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dopq.config import TANQ_CENTERS_WIDE
from dopq.quantizers import (
    Consumer,
    Log2Quantizer,
    LogSqrt2Quantizer,
    PerChannel,
    PerTensor,
    TanQQuantizer,
    UniformQuantizer,
    build_quantizer,
    fake_quantize_uniform,
    list_quantizers,
    quantize_uniform,
    register_quantizer,
    search_output_range,
    search_uniform_range,
    tan_levels,
)
from dopq.quantizers.adaround import AdaRoundQuantizer
from dopq.quantizers.levels import codes_from_thresholds, float32_decision_points
from dopq.quantizers.ranges import row_quantiles
from dopq.quantizers.tanq import tan_codes
from dopq.quantizers.uniform import OUTPUT_PERCENTILES, TIE_NUDGE, TIE_SHARE, off_ties, tie_share


def _attention(shape=(2, 3, 40, 40), temp=4.0) -> torch.Tensor:
    return torch.softmax(torch.randn(shape) * temp, dim=-1)


def _observe(q, x, context=None):
    q.observing = True
    out = q(x, context) if context is not None else q(x)
    q.observing = False
    return out


@pytest.mark.parametrize(
    ("rows", "length", "make"),
    [
        (2, 1001, torch.randn),
        (1, 1_200_000, torch.randn),  # long rows take the sampled-threshold top-k path
        (1, 1_200_000, lambda *s: torch.rand(*s).pow(8)),  # skewed, like attention
        (1, 1_200_000, lambda *s: torch.randint(0, 3, s).float()),  # heavy ties
    ],
)
def test_row_quantiles_match_numpy(rows, length, make):
    x = make(rows, length)
    qs = (0.999, 0.9999, 0.99999, 0.001, 0.5)
    got = row_quantiles(x, qs)
    ref = np.quantile(x.double().numpy(), qs, axis=1)
    assert np.allclose(got.numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uniform_levels_and_zero(bits):
    x = torch.randn(10_000) * 2 + 0.5
    scale, zp = search_uniform_range(x, bits)
    y = fake_quantize_uniform(x, scale, zp, bits)
    levels = torch.unique(y)
    assert len(levels) <= 2**bits
    assert float(zp) == round(float(zp))  # integer zero point: 0 is exactly representable
    assert float(fake_quantize_uniform(torch.zeros(1), scale, zp, bits)) == 0.0
    codes = levels / scale + zp  # every level sits on the integer grid
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.min() >= -1e-3 and codes.max() <= 2**bits - 1 + 1e-3
    inside = (x >= levels.min()) & (x <= levels.max())
    assert (y - x)[inside].abs().max() <= scale * 0.5 * (1 + 1e-4)


def test_uniform_error_falls_with_bits():
    x = torch.randn(50_000)
    errs = []
    for bits in (2, 3, 4, 6, 8):
        s, z = search_uniform_range(x, bits)
        errs.append(float((fake_quantize_uniform(x, s, z, bits) - x).pow(2).mean()))
    assert all(a > b for a, b in itertools.pairwise(errs))
    assert errs[-1] < 1e-4


def test_range_search_is_the_best_candidate():
    x = torch.cat([torch.randn(20_000), torch.tensor([40.0, -35.0])])  # two outliers
    s, z = search_uniform_range(x, 4)
    best = float((fake_quantize_uniform(x, s, z, 4) - x).pow(2).mean())
    for p in (0.999, 0.9999, 0.99999):
        lo, hi = torch.quantile(x, 1 - p), torch.quantile(x, p)
        sc = (hi - lo) / 15
        err = float((fake_quantize_uniform(x, sc, (-lo / sc).round(), 4) - x).pow(2).mean())
        assert best <= err + 1e-7


def _outlier_tokens() -> torch.Tensor:
    """Tokens whose channel 0 carries rare large outliers, the others a Gaussian bulk."""
    x = torch.randn(2000, 8)
    x[::97, 0] = 30.0
    return x


def _product_error(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, right: torch.Tensor) -> float:
    return float(((fake_quantize_uniform(x, s, z, 3) - x) @ right).pow(2).sum())


@pytest.mark.parametrize("outlier_weight", [0.0, 1.0])
def test_output_range_search_keeps_the_candidate_best_for_the_product(outlier_weight: float) -> None:
    x = _outlier_tokens()
    right = torch.full((8, 4), 0.1)
    right[0] = outlier_weight
    s, z = search_output_range(x, 3, lambda e: e @ right)
    best = _product_error(x, s, z, right)
    flat = x.reshape(1, -1)
    for p in OUTPUT_PERCENTILES:
        hi, lo = row_quantiles(flat, (p,))[0].clamp_min(0), row_quantiles(flat, (1 - p,))[0].clamp_max(0)
        sc = (hi - lo) / 7
        assert best <= _product_error(x, sc, (-lo / sc).round(), right) * (1 + 1e-6)
    # the outliers' clip costs what their weights make of it: nothing where they meet zeros, and
    # (nearly) the full range is worth its coarser steps where they meet weights ten times the others'
    full = float(x.max() - x.min()) / 7
    if outlier_weight == 0.0:
        assert float(s) < 0.3 * full
    else:
        assert float(s) > 0.95 * full


def test_output_objective_quantizer_searches_the_product_it_is_given() -> None:
    x = _outlier_tokens().reshape(4, 500, 8)
    weight = torch.full((4, 8), 0.1)  # a Linear's (out, in) weight: the outlier channel unused
    weight[:, 0] = 0.0
    by_output = UniformQuantizer(3, percentiles=OUTPUT_PERCENTILES, objective="output")
    by_output.initialize(x, weight.T)
    expected = search_output_range(x, 3, lambda e: e @ weight.T)
    assert torch.equal(by_output.scale, expected[0]) and torch.equal(by_output.zero_point, expected[1])
    by_mse = UniformQuantizer(3)
    by_mse.initialize(x, weight.T)
    assert float(by_output.scale) < 0.5 * float(by_mse.scale)
    # without a product, and per channel, the output objective is the squared-error search
    for granularity in (PerTensor(), PerChannel(-1)):
        plain, output = UniformQuantizer(3, granularity), UniformQuantizer(3, granularity, objective="output")
        plain.initialize(x, None)
        output.initialize(x, None if granularity == PerTensor() else weight.T)
        assert torch.equal(plain.scale, output.scale)


def test_output_objective_scores_the_right_operand_through_the_left_factor() -> None:
    torch.manual_seed(1)
    a = torch.randn(2, 3, 10, 6)  # (batch, heads, tokens, d) @ (batch, heads, d, tokens)
    a[..., 2] = 0.0  # the left factor never reads row 2 of the right operand
    b = torch.randn(2, 3, 6, 10)
    b[..., 2, ::3] = 25.0
    q = UniformQuantizer(3, percentiles=OUTPUT_PERCENTILES, objective="output")
    q.initialize(b, Consumer(left=a))
    expected = search_output_range(b, 3, lambda e: a @ e)
    assert torch.equal(q.scale, expected[0])
    mse = UniformQuantizer(3)
    mse.initialize(b, None)
    assert float(q.scale) < float(mse.scale)


def test_unknown_range_objective_is_refused() -> None:
    with pytest.raises(ValueError, match="objective"):
        UniformQuantizer(3, objective="kl")


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_row_whose_squared_errors_overflow_keeps_a_searched_range(symmetric: bool) -> None:
    """Values of 1e20 square past float32: every candidate's error was inf, none replaced the
    placeholder, and the channel got scale 1 and zero point 0 (every value clamped to a few units)."""
    x = torch.randn(4, 64) * torch.tensor([1.0, 1.0, 1e20, 1.0])[:, None]
    q = UniformQuantizer(4, PerChannel(0), symmetric=symmetric)
    q.observing = True
    x_hat = q(x)
    assert float(q.scale[2]) > 1e18 and torch.isfinite(x_hat).all()
    assert float((x_hat[2] - x[2]).abs().max()) < 0.2 * float(x[2].abs().max())


def test_per_channel_search_equals_channel_loop():
    x = torch.randn(6, 50, 16) * torch.linspace(0.1, 20, 16)
    s, z = search_uniform_range(x, 4, channel_axis=-1)
    for c in range(16):
        sc, zc = search_uniform_range(x[..., c], 4)
        assert torch.allclose(s[c], sc[0], rtol=1e-5) and z[c] == zc[0]


def test_uniform_module_per_channel_weights():
    w = torch.randn(8, 32) * torch.arange(1, 9)[:, None]
    q = UniformQuantizer(3, PerChannel(0))
    w_hat = _observe(q, w)
    assert q.scale.shape == (8,)
    for row in w_hat:
        assert len(torch.unique(row)) <= 8
    assert torch.allclose(q(w), w_hat)  # frozen after calibration


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_symmetric_weights_are_signed_codes_without_zero_point(bits: int) -> None:
    """``symmetric=True``: every channel's zero point is ``2^(b-1)``, so codes minus it are signed
    b-bit integers; each channel's grid is the best centred candidate and reaches its magnitude."""
    w = torch.randn(8, 64) * torch.arange(1, 9)[:, None] + torch.linspace(-2, 2, 8)[:, None]  # skewed rows
    q = UniformQuantizer(bits, PerChannel(0), symmetric=True)
    w_hat = _observe(q, w)
    half = 2 ** (bits - 1)
    assert torch.equal(q.zero_point, torch.full((8,), float(half)))
    centred = q.codes(w) - half
    assert int(centred.min()) >= -half and int(centred.max()) <= half - 1
    levels = torch.arange(-half, half).float()[None, :] * q.scale[:, None]
    assert all(set(row.tolist()) <= set(lv.tolist()) for row, lv in zip(w_hat, levels, strict=True))
    for row, scale in zip(w, q.scale, strict=True):  # the smallest error among the centred candidates
        for p in (0.999, 0.9999, 0.99999):
            candidate = torch.quantile(row.abs(), p) / (half - 1)
            err = float((fake_quantize_uniform(row, candidate, float(half), bits) - row).pow(2).mean())
            best = float((fake_quantize_uniform(row, scale, float(half), bits) - row).pow(2).mean())
            assert best <= err * (1 + 1e-5) + 1e-7
    asymmetric = _observe(UniformQuantizer(bits, PerChannel(0)), w)
    # a centred grid spends levels on the side a skewed row does not use: never a smaller error
    assert float((w_hat - w).pow(2).mean()) >= float((asymmetric - w).pow(2).mean()) - 1e-7


def test_uncalibrated_quantizer_refuses():
    with pytest.raises(RuntimeError, match="calibrate"):
        UniformQuantizer(4)(torch.randn(4))


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=r"2\.\.8"):
        UniformQuantizer(bits)


def test_registry():
    assert {"uniform", "log2", "logsqrt2", "tanq"} <= set(list_quantizers())
    with pytest.raises(ValueError, match="already registered"):
        register_quantizer("tanq")(TanQQuantizer)
    with pytest.raises(ValueError, match="unknown quantizer"):
        build_quantizer("nope", 4)


def _repq_logsqrt2(x, delta, bits):
    """RepQ-ViT's log-sqrt2 formula, written out as the reference."""
    x_int = torch.round(-1 * (x / delta).log2() * 2)
    mask = x_int >= 2**bits
    x_quant = torch.clamp(x_int, 0, 2**bits - 1)
    odd = (x_quant % 2) * (2**0.5 - 1) + 1
    out = 2 ** (-1 * torch.ceil(x_quant / 2)) * odd * delta
    out[mask] = 0
    return out


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_logsqrt2_matches_repq_formula(bits):
    a = _attention()
    q = LogSqrt2Quantizer(bits)
    y = _observe(q, a)
    ref = _repq_logsqrt2(a, q.delta, bits)
    assert torch.allclose(y, ref, rtol=1e-6, atol=0)
    lut, thresholds = q.level_table()
    assert len(lut) == 2**bits + 1  # RepQ's extra exact zero
    assert torch.equal(q.codes(a), codes_from_thresholds(a, thresholds))


@pytest.mark.parametrize("bits", [3, 4])
def test_log2_levels_fit_in_bits(bits):
    a = _attention()
    q = Log2Quantizer(bits)
    y = _observe(q, a)
    assert len(q.lookup_table()) == 2**bits
    assert set(torch.unique(y).tolist()) <= set(q.lookup_table().tolist())


def test_tan_levels_shape_and_ends():
    c, m, d = torch.tensor(8.0), torch.tensor(0.5), torch.tensor(0.9)
    levels, thresholds = tan_levels(c, m, d, 4)
    assert levels[0] == 0 and torch.isclose(levels[-1], d)
    assert (levels.diff() > 0).all()
    gaps = levels.diff()
    assert gaps[0] < gaps[7] and gaps[-1] < gaps[7]  # crowded at both ends
    assert torch.allclose(thresholds, (levels[1:] + levels[:-1]) / 2)
    near_uniform, _ = tan_levels(torch.tensor(1e-3), m, torch.tensor(1.0), 3)
    assert torch.allclose(near_uniform, torch.linspace(0, 1, 8), atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_tanq_codes_are_nearest_levels_and_lut_is_exact(bits):
    a = _attention((2, 2, 30, 30))
    q = TanQQuantizer(bits, objective="mse")
    y = _observe(q, a)
    levels, thresholds = q.level_table()
    edge = torch.cat([levels, thresholds, thresholds + 1e-7, thresholds - 1e-7, torch.tensor([0.0, 1.0])])
    for x in (a.flatten(), edge):
        nearest = (x[:, None] - levels[None]).abs().argmin(1)
        codes = q.codes(x)
        # ties at a threshold may go either way; otherwise the code is the nearest level
        assert torch.allclose((x - levels[codes]).abs(), (x - levels[nearest]).abs(), rtol=0, atol=1e-6)
    # the integer path: codes in [0, 2^b) and a lookup table give the simulated output bit for bit
    codes = q.codes(a)
    assert codes.min() >= 0 and codes.max() < 2**bits
    assert torch.equal(q.lookup_table()[codes], y)


def test_tan_codes_vectorized_over_candidates():
    x = torch.rand(1000)
    c, m, d = torch.tensor([1.0, 8.0]), torch.tensor([0.5, 0.35]), torch.tensor([1.0, 0.7])
    _levels, th = tan_levels(c, m, d, 3)
    codes = tan_codes(x, c, m, d, 3, th)
    for k in range(2):
        assert torch.equal(codes[k], codes_from_thresholds(x, th[k]))


def test_tanq_beats_log_quantizers_near_one():
    # attention with a heavy tail near 1: TanQ must place levels there
    a = _attention((4, 2, 50, 50), temp=9.0)
    errs = {}
    for name in ("log2", "logsqrt2", "tanq"):
        q = build_quantizer(name, 3, **({"objective": "mse"} if name == "tanq" else {}))
        y = _observe(q, a)
        high = a > 0.5
        errs[name] = float((y - a)[high].pow(2).mean())
    assert errs["tanq"] < errs["log2"] and errs["tanq"] < errs["logsqrt2"]


@pytest.mark.parametrize("bits", [3, 4])
def test_wide_tanq_centres_cut_the_error_of_diffuse_attention(bits: int) -> None:
    # ViT-like rows (197 tokens, most values near 1/197): centres above 1/2 put more levels near 0;
    # the wider grid must beat dopq's by a clear margin and both log grids (docs/tanq.md)
    gen = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(2, 3, 197, 197, generator=gen) * 2.5, -1)
    v = torch.randn(2, 3, 197, 16, generator=gen)
    ref = attn @ v

    def error(q) -> float:
        y = _observe(q, attn, v) if isinstance(q, TanQQuantizer) else _observe(q, attn)
        return float((y @ v - ref).pow(2).sum() / ref.pow(2).sum())

    default = error(TanQQuantizer(bits))
    wide = error(TanQQuantizer(bits, centers=TANQ_CENTERS_WIDE))
    assert wide < 0.75 * default
    assert wide < min(error(build_quantizer("log2", bits)), error(build_quantizer("logsqrt2", bits)))


def test_tanq_output_objective_targets_attn_v():
    a = _attention((2, 2, 24, 24), temp=5.0)
    v = torch.randn(2, 2, 24, 8) * torch.linspace(0.1, 5, 24)[:, None]
    out_err = {}
    for objective in ("output", "mse"):
        q = TanQQuantizer(3, objective=objective, max_rows=10_000)  # all rows: exact objective
        y = _observe(q, a, v)
        out_err[objective] = float(((y - a) @ v).pow(2).mean())
    assert out_err["output"] <= out_err["mse"] + 1e-9


def test_adaround_starts_at_float_and_bakes_onto_grid():
    w = torch.randn(16, 32)
    base = UniformQuantizer(4, PerChannel(0))
    _observe(base, w)
    ada = AdaRoundQuantizer(base, w)
    lo = (-base.zero_point * base.scale)[:, None]
    hi = ((15 - base.zero_point) * base.scale)[:, None]
    inside = (w >= lo) & (w <= hi)  # clipped weights start at the clip, not at w
    assert ((ada(w) - w).abs()[inside] <= 0.01 * base.scale.max() + 1e-6).all()
    baked = ada.bake()
    assert torch.allclose(base(baked), baked, atol=1e-6)  # a grid point quantizes to itself
    assert ((baked - w).abs() <= base.scale[:, None] * 1.0001).all()  # floor or ceil only


def test_adaround_learned_scale_is_written_into_the_base_quantizer():
    w = torch.randn(16, 32)
    base = UniformQuantizer(3, PerChannel(0))
    _observe(base, w)
    old_scale = base.scale.clone()
    ada = AdaRoundQuantizer(base, w, learn_scale=True)
    torch.nn.functional.mse_loss(ada(w), w * 1.3).backward()  # a target only a larger step reaches
    assert ada.log_gain.grad is not None and (ada.log_gain.grad < 0).all()
    with torch.no_grad():
        ada.log_gain.fill_(0.25)
    ada.hard = True
    expected = ada(w).detach()
    baked = ada.bake()
    assert torch.allclose(base.scale, old_scale * math.exp(0.25))
    assert torch.allclose(baked, expected)
    assert torch.allclose(base(baked), baked, atol=1e-6)  # on the new grid
    assert not AdaRoundQuantizer(base, w).log_gain.requires_grad  # fixed step by default


def test_straight_through_rounding_is_hard_forward_and_soft_backward():
    w = torch.randn(16, 32)
    base = UniformQuantizer(3, PerChannel(0))
    _observe(base, w)
    ada = AdaRoundQuantizer(base, w, straight_through=True)
    out = ada(w)
    assert torch.allclose(base(out), out, atol=1e-6)  # grid points from the first step
    out.pow(2).sum().backward()
    assert ada.alpha.grad is not None and ada.alpha.grad.abs().sum() > 0
    assert torch.equal(ada.bake(), out.detach())  # baking changes nothing


def test_per_tensor_default_granularity():
    q = UniformQuantizer(4)
    assert q.granularity == PerTensor() and q.channel_axis is None


def test_quantize_uniform_passes_no_gradient_on_the_code_bounds():
    """An input that rounds to code 0 or 2^b - 1 gets no gradient, whatever torch's clamp gives on
    its bounds (1 in torch 2.5-2.8, 0 in 2.14)."""
    scale, zero_point = torch.tensor([0.5]), torch.tensor([2.0])
    x = (torch.tensor([-5.0, -2.2, -1.4, -0.4, 0.8, 4.0]) * scale).requires_grad_(True)
    codes = quantize_uniform(x, scale, zero_point, 2)
    assert codes.tolist() == [0.0, 0.0, 1.0, 2.0, 3.0, 3.0]
    codes.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 2.0, 2.0, 0.0, 0.0]  # d(x / s)/dx inside only


@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_fake_quantize_matches_the_autograd_ste_form(per_channel):
    """Values and both gradients equal those autograd gives the plain STE/LSQ expression."""
    x = torch.randn(4, 6, 8) * 3
    x[0, 0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # clipped both ways
    shape = (1, 6, 1) if per_channel else (1,)
    scale = torch.rand(shape) * 0.3 + 0.2
    zero_point = torch.full(shape, 3.0)
    x[1, 0, 0] = (0 - 3) * scale.flatten()[0]  # exactly on the lower bound: no gradient there
    x[2, 0, 0] = (1 - 3) * scale.flatten()[0]  # one step inside: the gradient passes
    grad_out = torch.randn_like(x)

    def grads(fn):
        xi, si = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
        out = fn(xi, si)
        out.backward(grad_out)
        return out.detach(), xi.grad, si.grad

    reference = grads(lambda xi, si: (quantize_uniform(xi, si, zero_point, 3) - zero_point) * si)
    fused = grads(lambda xi, si: fake_quantize_uniform(xi, si, zero_point, 3))
    assert torch.equal(fused[0], reference[0])
    torch.testing.assert_close(fused[1], reference[1])  # autograd's is grad * s / s, rounded
    assert torch.equal(fused[1] == 0, reference[1] == 0)
    torch.testing.assert_close(fused[2], reference[2])
    assert fused[1][0, 0, 0] == 0 and fused[1][0, 0, 1] == 0 and fused[1][1, 0, 0] == 0
    assert fused[1][2, 0, 0] == grad_out[2, 0, 0]


# --- degenerate inputs: every registered quantizer, every bit width --------------------------------

_DEGENERATE = {
    "constant": lambda: torch.full((4, 64), 3.0),
    "negative-constant": lambda: torch.full((4, 64), -0.5),
    "all-zero": lambda: torch.zeros(4, 64),
    "single-element": lambda: torch.tensor([[0.7]]),
    # both signs: a per-channel range of one sign need not hold 0 (its zero point is then off the
    # grid by design), which this test passed only while the overflowing search left scale 1, zero 0
    "huge": lambda: (torch.rand(4, 64) - 0.5) * 1e30,
    "tiny": lambda: torch.rand(4, 64) * 1e-30,
}


def _quantizers(bits: int):
    from dopq.quantizers import PerChannel, PerTensor, UniformQuantizer, build_quantizer, list_quantizers

    yield "uniform-per-tensor", UniformQuantizer(bits, PerTensor())
    yield "uniform-per-channel", UniformQuantizer(bits, PerChannel(0))
    for name in list_quantizers():
        if name != "uniform":
            yield name, build_quantizer(name, bits, **({"objective": "mse"} if name == "tanq" else {}))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("kind", list(_DEGENERATE))
def test_degenerate_inputs_give_finite_parameters_and_an_exact_zero(kind: str, bits: int) -> None:
    from dopq.quantizers import UniformQuantizer

    for name, q in _quantizers(bits):
        raw = _DEGENERATE[kind]()
        x = raw if name.startswith("uniform") else raw.abs()  # post-Softmax quantizers see values >= 0
        q.observing = True
        out = q(x)
        q.observing = False
        assert all(bool(torch.isfinite(b).all()) for b in q.buffers()), (name, kind)
        assert bool(torch.isfinite(out).all()), (name, kind)
        if isinstance(q, UniformQuantizer):
            zp = q.zero_point
            assert torch.equal(zp, zp.round()) and zp.min() >= 0 and zp.max() <= 2**bits - 1, (name, kind, zp)
        assert float(q(torch.zeros_like(x)).abs().max()) == 0.0, (name, kind)  # 0.0 is a level


def test_non_finite_calibration_values_name_the_quantizer() -> None:
    import timm

    import dopq
    from dopq.errors import CalibrationError

    model = timm.create_model("test_vit", num_classes=10).eval()
    with torch.no_grad():
        model.blocks[1].mlp.fc1.bias[3] = float("nan")
    with pytest.raises(CalibrationError, match=r"blocks\.1\.mlp\.fc2\.input_quantizer sees \d+ NaN/Inf"):
        dopq.quantize(model, torch.randn(2, 3, 160, 160), dopq.get_preset("dopq"), progress=False)
    model = timm.create_model("test_vit", num_classes=10).eval()
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[0, 0] = float("inf")
    with pytest.raises(
        CalibrationError,
        match=r"blocks\.0\.attn\.proj\.weight_quantizer sees 1 NaN/Inf values in its weights",
    ):
        dopq.quantize(model, torch.randn(2, 3, 160, 160), dopq.get_preset("dopq"), progress=False)


# --- per-module choice of the post-Softmax family ("auto") -----------------------------------------


def _attention_and_values(sharpness: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    attn = torch.softmax(torch.randn(2, 3, 32, 32, generator=gen) * sharpness, -1)
    return attn, torch.randn(2, 3, 32, 16, generator=gen)


def _single_family_errors(
    attn: torch.Tensor, v: torch.Tensor, bits: int, grid_bits: int | None = None
) -> dict[str, float]:
    from dopq.quantizers import AUTO_CANDIDATES, build_quantizer
    from dopq.quantizers.auto import output_error

    errors = {}
    for name in AUTO_CANDIDATES:
        q = (
            build_quantizer(name, bits, grid_bits=grid_bits)
            if name == "tanq"
            else build_quantizer(name, bits)
        )
        q.observing = True
        errors[name] = output_error(attn, q(attn, v), v)
    return errors


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sharpness", [1.0, 4.0, 12.0])
def test_auto_softmax_is_never_worse_than_the_best_single_family(bits: int, sharpness: float) -> None:
    from dopq.quantizers import AutoLevelQuantizer
    from dopq.quantizers.auto import output_error

    attn, v = _attention_and_values(sharpness, seed=int(sharpness) + bits)
    q = AutoLevelQuantizer(bits)
    q.observing = True
    out = q(attn, v)
    singles = _single_family_errors(attn, v, bits)
    assert output_error(attn, out, v) == min(singles.values())
    assert q.kind == min(singles, key=singles.get)
    assert torch.equal(q.codes(attn), q.resolve().codes(attn))
    assert torch.equal(q.lookup_table(), q.resolve().lookup_table())
    # the choice is read from its buffer once, and again from a loaded state
    state = q.state_dict()
    other = (int(q.choice) + 1) % len(q.candidates)
    q.load_state_dict({**state, "choice": torch.tensor(other)})
    assert q.kind == list(q.candidates)[other]


def test_auto_softmax_chooses_per_module_in_a_model_and_reports_the_kinds() -> None:
    import timm

    import dopq
    from dopq.calibrate import calibrate
    from dopq.models import prepare_model, softmax_kinds
    from dopq.models.attention import QuantAttention
    from dopq.quantizers.auto import output_error

    model = timm.create_model("test_vit", num_classes=10).eval()
    x = torch.randn(4, 3, 160, 160)
    prepare_model(model, dopq.get_preset("dopq", w_bits=3, a_bits=3, softmax_quantizer="auto"))
    calibrate(model, x)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        m.matmul_av.register_forward_pre_hook(
            lambda mod, a, n=n: seen.setdefault(n, (a[0], mod.quantizer_b(a[1])))
        )
        for n, m in model.named_modules()
        if isinstance(m, QuantAttention)
    ]
    with torch.no_grad():  # the same inputs the observer pass calibrated on
        model(x)
    for h in hooks:
        h.remove()
    kinds = softmax_kinds(model)
    assert set(kinds) == set(seen) and len(seen) == 6
    for name, (attn, v) in seen.items():
        chooser = model.get_submodule(name).matmul_av.quantizer_a
        singles = _single_family_errors(attn, v, 3, grid_bits=16)  # the preset's TanQ grid
        assert output_error(attn, chooser(attn), v) <= min(singles.values()) * (1 + 1e-6), name
        assert kinds[name] == chooser.kind
    _, report = dopq.quantize_with_report(
        timm.create_model("test_vit", num_classes=10).eval(),
        x,
        dopq.get_preset("dopq", w_bits=3, a_bits=3, softmax_quantizer="auto"),
        progress=False,
    )
    recorded = report.to_dict()["coverage"]["softmax_kinds"]
    assert len(recorded) == 6 and set(recorded.values()) <= {"tanq", "log2", "logsqrt2"}
    assert "post-Softmax" in report.coverage.summary()


# --- property tests: random magnitudes, offsets and shapes (hypothesis) ----------------------------


@st.composite
def _activations(draw: st.DrawFn) -> torch.Tensor:
    """Rows of values at a random magnitude (1e-30..1e30) and offset, some rows constant."""
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 40))
    exponent = draw(st.integers(-30, 30))
    offset = draw(st.sampled_from([0.0, 1.0, -1.0, 0.5]))
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) + offset
    if draw(st.booleans()):
        x[0] = x[0, 0]  # a constant row
    return x * 10.0**exponent


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=_activations(), bits=st.integers(2, 8), per_channel=st.booleans())
def test_uniform_quantizer_properties(x: torch.Tensor, bits: int, per_channel: bool) -> None:
    """Whatever the input: finite parameters, integer zero points, codes in range and fake
    quantization == dequantize(codes). Per tensor (the activations integer kernels see) the zero
    point is a code and 0.0 is exact. Per channel, a row of one sign keeps its own range (widening
    it to 0 would cost post-LayerNorm channels with large offsets their resolution), so there only
    rows that span 0, and constant rows, must represent 0.0 exactly."""
    from dopq.quantizers import PerChannel, PerTensor, UniformQuantizer

    q = UniformQuantizer(bits, PerChannel(0) if per_channel else PerTensor())
    q.observing = True
    q(x)
    q.observing = False
    assert bool(torch.isfinite(q.scale).all()) and bool((q.scale > 0).all())
    zp = q.zero_point
    assert torch.equal(zp, zp.round())
    spans_zero = (x.amin(1) <= 0) & (x.amax(1) >= 0) | (x.amin(1) == x.amax(1))
    must_hold_zero = spans_zero if per_channel else torch.ones(1, dtype=torch.bool)
    in_range = (zp >= 0) & (zp <= 2**bits - 1)
    assert bool(in_range[must_hold_zero].all()), (zp, must_hold_zero)
    zeros = q(torch.zeros_like(x))[must_hold_zero.expand(x.shape[0])]
    assert zeros.numel() == 0 or float(zeros.abs().max()) == 0.0
    codes = q.codes(x)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert torch.equal(q.dequantize(codes), q(x))


@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.integers(2, 8), sharpness=st.floats(0.1, 30.0), seed=st.integers(0, 2**16),
       name=st.sampled_from(["log2", "logsqrt2", "tanq"]))  # fmt: skip
def test_post_softmax_quantizer_properties(bits: int, sharpness: float, seed: int, name: str) -> None:
    """Any attention map: finite parameters, outputs among the quantizer's levels in [0, 1], 0 kept."""
    from dopq.quantizers import build_quantizer

    gen = torch.Generator().manual_seed(seed)
    attn = torch.softmax(torch.randn(1, 2, 9, 9, generator=gen) * sharpness, dim=-1)
    q = build_quantizer(name, bits, **({"objective": "mse"} if name == "tanq" else {}))
    q.observing = True
    q(attn)
    q.observing = False
    out = q(attn)
    assert all(bool(torch.isfinite(b).all()) for b in q.buffers())
    assert bool(torch.isfinite(out).all()) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0 + 1e-6
    assert float(q(torch.zeros_like(attn)).abs().max()) == 0.0
    assert out.unique().numel() <= 2**bits + 1  # log-sqrt2 has one extra exact-zero level


def test_readiness_is_read_once_but_follows_reset_and_loaded_state() -> None:
    q = UniformQuantizer(4, PerTensor())
    q.observing = True
    q(torch.randn(256))
    q.observing = False
    assert q.is_ready() and "ready" in q._host  # later forwards read no device buffer
    q.initialized.fill_(False)  # an in-place write moves the version: read again
    assert not q.is_ready()
    q.initialized.fill_(True)
    q(torch.randn(8))
    q.load_state_dict(UniformQuantizer(4, PerTensor()).state_dict())  # a never-calibrated state
    with pytest.raises(RuntimeError, match="calibrate the model first"):
        q(torch.randn(8))
    q.observing = True
    q(torch.randn(256))
    q.reset()
    q.observing = False
    with pytest.raises(RuntimeError, match="calibrate the model first"):
        q(torch.randn(8))


# --- the short forms evaluation uses give the same values as the reference forms -----------------


def _edges(levels: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Every level and threshold, their float32 neighbours, and values beyond both ends."""
    points = torch.cat([levels, thresholds]).float()
    up, down = torch.nextafter(points, points + 1), torch.nextafter(points, points - 1)
    return torch.cat([points, up, down, torch.tensor([-1.0, 0.0, 2.0, float(levels[-1]) * 3])])


@pytest.mark.parametrize("grid_bits", [None, 16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("temp", [1.0, 4.0, 12.0])
def test_tanq_closed_form_codes_equal_the_threshold_search(
    bits: int, temp: float, grid_bits: int | None
) -> None:
    """On a GPU TanQ counts thresholds (one binary-search pass); on a CPU it uses its closed form
    (or, with thresholds on a grid, the code of the element's grid cell). The two must give the same
    code for every element, also at the thresholds and one float step either side, so CPU and GPU
    quantize alike. (The log quantizers keep their log-domain rounding everywhere: it can differ at
    a threshold, a rounding tie.)"""
    q = TanQQuantizer(bits, objective="mse", grid_bits=grid_bits)
    a = _attention((2, 2, 30, 30), temp=temp)
    _observe(q, a)
    levels, thresholds = q.level_table()
    for x in (a.flatten(), _edges(levels, thresholds)):
        closed = q.closed_form_codes(x, thresholds)
        searched = codes_from_thresholds(x, thresholds, out_int32=True)
        assert torch.equal(closed.long(), searched.long())
    assert torch.equal(q.lookup_table()[q.codes(a)], q(a))


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_tanq_grid_moves_each_threshold_by_at_most_half_a_cell(bits: int) -> None:
    """Snapped thresholds are the float32 just below a multiple of 2^-16, within half a cell of the
    exact midpoint; the levels do not move; a grid too coarse for the table keeps the midpoints."""
    a = _attention((2, 3, 40, 40), temp=4.0)
    exact, snapped = TanQQuantizer(bits, objective="mse"), TanQQuantizer(bits, objective="mse", grid_bits=16)
    _observe(exact, a)
    snapped.load_state_dict(exact.state_dict())
    (levels, midpoints), (same_levels, thresholds) = exact.level_table(), snapped.level_table()
    assert torch.equal(levels, same_levels) and exact.code_grid() is None
    above = torch.nextafter(thresholds, torch.tensor(1.0)).double() * 2**16
    assert torch.equal(above, above.round())
    assert float((thresholds.double() - midpoints.double()).abs().max()) <= 2**-17 + 1e-9
    assert snapped.code_grid() is not None
    # a table whose lowest levels sit closer than a cell (clip 0.01 on 2^-8 cells) keeps its midpoints
    coarse, fine = TanQQuantizer(bits, grid_bits=8), TanQQuantizer(bits, grid_bits=20)
    for q in (coarse, fine):
        q.clip.fill_(0.01)
        q.initialized.fill_(True)
    assert coarse.code_grid() is None and fine.code_grid() is not None
    assert torch.equal(coarse.level_table()[1], tan_levels(*coarse._params(), bits)[1])
    with pytest.raises(ValueError, match="grid_bits"):
        TanQQuantizer(bits, grid_bits=4)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_integral_zero_point_form_equals_the_code_form(per_channel: bool, bits: int) -> None:
    """With whole-number zero points evaluation clamps ``round(x / s)`` to ``[-z, n - z]`` (two passes
    fewer); the values equal ``dequantize(codes(x))`` exactly, at half steps and far outside too."""
    gen = torch.Generator().manual_seed(bits)
    shape = (1, 6, 1) if per_channel else (1,)
    scale = torch.rand(shape, generator=gen) * 0.3 + 0.05
    zero_point = torch.randint(0, 2**bits, shape, generator=gen).float()
    x = torch.randn(5, 6, 40, generator=gen) * 4
    x[0, :, :20] = (torch.arange(20).float() - 10 + 0.5) * scale.reshape(-1, 1)  # half steps: ties
    x[1, :, :2] = torch.tensor([-1e30, 1e30])
    short = fake_quantize_uniform(x, scale, zero_point, bits, integral_zero_point=True)
    reference = fake_quantize_uniform(x, scale, zero_point, bits)
    assert torch.equal(short, reference)


def test_integral_zero_point_fact_follows_new_parameters() -> None:
    """The quantizer reads whether its zero points are whole once, and again after new parameters
    (``set_qparams``, a loaded state, ``reset``): a fractional zero point takes the code form."""
    q = UniformQuantizer(4, PerTensor())
    _observe(q, torch.randn(256))
    assert q.zero_point_is_integral()
    x = torch.randn(64)
    q.set_qparams(torch.tensor([0.1]), torch.tensor([3.4]))
    assert not q.zero_point_is_integral()
    assert torch.equal(q(x), (torch.clamp(torch.round(x / 0.1) + 3.4, 0, 15) - 3.4) * 0.1)
    state = UniformQuantizer(4, PerTensor()).state_dict()
    state["zero_point"], state["initialized"] = torch.tensor([2.0]), torch.tensor(True)
    q.load_state_dict(state)
    assert q.zero_point_is_integral()
    q.load_state_dict({**state, "zero_point": torch.tensor([2.5])})
    assert not q.zero_point_is_integral()


def test_quantized_weight_is_remembered_only_while_nothing_changes() -> None:
    """In an evaluation (``constant_quantization``, autograd off) a weight is quantized once; an
    in-place change, new parameters, a dtype change or autograd make it quantize again, and leaving
    the block forgets it."""
    from dopq.modules import QuantLinear, constant_quantization

    layer = QuantLinear(torch.nn.Linear(16, 8), None, UniformQuantizer(4, PerChannel(0)))
    q = layer.weight_quantizer
    _observe(q, layer.weight)
    calls = []
    original = q.fake_quantize
    q.fake_quantize = lambda x: calls.append(1) or original(x)
    x = torch.randn(3, 16)

    def check() -> None:  # the output is the freshly quantized weight's, whatever was remembered
        with torch.no_grad():
            expected = torch.nn.functional.linear(x.to(layer.weight), original(layer.weight), layer.bias)
            assert torch.equal(layer(x.to(layer.weight)), expected)

    with constant_quantization(layer), torch.no_grad():
        check(), check()
        assert len(calls) == 1
        layer.weight.mul_(1.5)  # in place: a new version
        check()
        assert len(calls) == 2
        q.set_qparams(q.scale * 2, q.zero_point)
        check()
        assert len(calls) == 3
        layer.double()  # new storage
        check()
        assert len(calls) == 4
        layer.float()
        with torch.enable_grad():
            layer(x)
        assert len(calls) == 5
    assert not q._memos and not q.memoize
    with torch.no_grad():
        layer(x), layer(x)
    assert len(calls) == 7  # outside an evaluation nothing is remembered


@pytest.mark.parametrize(
    ("name", "bits"), [("tanq", 3), ("tanq", 4), ("tanq-m0.9", 4), ("log2", 3), ("logsqrt2", 4)]
)
def test_decision_points_count_to_the_codes_of_every_float(name: str, bits: int) -> None:
    kwargs = {"objective": "mse"} if name.startswith("tanq") else {}
    if name == "tanq-m0.9":  # the recommended grid's top centre: levels crowded near 0
        kwargs["centers"] = (0.9,)
    q = build_quantizer(name.removesuffix("-m0.9"), bits, **kwargs)
    q.observing = True
    q(torch.softmax(torch.randn(2, 3, 32, 32) * 4, dim=-1))
    q.observing = False
    points = q.decision_points()
    assert points.dtype == torch.float32 and bool((points[1:] >= points[:-1]).all())
    # every float32 in a window around each point, and a dense sweep of [0, 1]
    bits_of = points.view(torch.int32).long()
    around = (bits_of[:, None] + torch.arange(-64, 65)).clamp_min(0).to(torch.int32).view(torch.float32)
    x = torch.cat([around.reshape(-1), torch.linspace(0, 1, 200_001)])
    assert torch.equal(q.codes(x), codes_from_thresholds(x, points))
    if name.startswith("tanq"):  # TanQ's codes come from its table: the points are the table's midpoints
        assert torch.equal(points, q.level_table()[1])


def test_decision_points_refuse_a_code_function_that_is_not_monotone() -> None:
    def zigzag(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0.5, 2, torch.where(x > 0.25, 1, 0)) - ((x > 0.3) & (x < 0.31)).long()

    with pytest.raises(ValueError, match="not monotone"):
        float32_decision_points(zigzag, 3, 1.0)
    exact = float32_decision_points(lambda x: torch.where(x > 0.5, 2, torch.where(x > 0.25, 1, 0)), 3, 1.0)
    assert exact.tolist() == [0.25, 0.5]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_a_per_tensor_scale_is_moved_off_a_lattice_of_rounding_ties(bits: int) -> None:
    """Inputs on a lattice (whole multiples of a unit ``u``, as sums of products of codes are) whose
    searched range spans a whole number of steps sit on rounding ties, which runtimes round
    differently: the installed scale is moved by ``TIE_NUDGE`` and leaves none; a continuous input
    keeps its searched scale exactly."""
    u = 2.0**-5  # a unit whose multiples float32 holds exactly
    steps = 6 * (2**bits - 1)  # the range spans six lattice units per quantization step
    lattice = torch.arange(-2, steps - 1).float().repeat(50) * u
    q = UniformQuantizer(bits, percentiles=(1.0,))
    searched, _ = q.searched_qparams(lattice)
    assert tie_share(lattice, searched) > 0.1  # the searched range: many elements on ties
    q.observing = True
    q(lattice)
    assert float(q.scale / searched - 1) == pytest.approx(TIE_NUDGE, rel=1e-3)
    assert tie_share(lattice, q.scale) == 0.0
    # no code moves except at the ties: elsewhere the values keep their codes
    t = lattice / searched
    tied = (t - t.floor()) == 0.5
    moved = q.codes(lattice) != quantize_uniform(lattice, searched, q.zero_point, q.bits).long()
    assert bool((moved <= tied).all())
    continuous = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    c = UniformQuantizer(bits)
    c.observing = True
    c(continuous)
    assert tie_share(continuous, c.scale) <= TIE_SHARE
    assert torch.equal(c.scale, c.searched_qparams(continuous)[0].reshape(-1))
    assert torch.equal(off_ties(continuous, c.scale), c.scale)
