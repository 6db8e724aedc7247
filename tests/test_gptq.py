"""GPTQ weight rounding: lower output error than nearest rounding on held-out inputs, exact codes of the
existing weight quantizer, determinism, degenerate inputs, and the model pass (save, export, bias
correction, reconstruction's starting point)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch import nn

import dopq
from dopq.calibrate import correct_bias, observing
from dopq.errors import CalibrationError
from dopq.export import to_deploy
from dopq.gptq import (
    GPTQ_MIN_ROWS,
    DampedHessian,
    float_target_weight,
    gptq_model,
    gptq_round,
    input_hessian,
    layer_inputs,
    sample_rows,
)
from dopq.modules import QuantConv2d, QuantLinear, quantizers_off
from dopq.quantizers import PerChannel, UniformQuantizer
from dopq.quantizers.adaround import AdaRoundQuantizer
from dopq.serialize import load_quantized, save_quantized


def _correlated_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    """Token-like inputs: a few strong shared directions plus noise (a far from diagonal Hessian)."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(8, dim, generator=torch.Generator().manual_seed(99))
    return torch.randn(n, 8, generator=gen) @ mixing + 0.3 * torch.randn(n, dim, generator=gen)


def _weight_quantizer(w: torch.Tensor, bits: int) -> UniformQuantizer:
    q = UniformQuantizer(bits, PerChannel(0))
    q.observing = True
    q(w)
    q.observing = False
    return q


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_lowers_held_out_output_error_against_nearest(bits: int, act_order: bool) -> None:
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    q = _weight_quantizer(w, bits)
    train, held_out = _correlated_inputs(1024, 64, seed=2), _correlated_inputs(1024, 64, seed=3)
    codes = gptq_round(w, input_hessian(train), q, act_order=act_order)
    w_gptq, w_nearest = q.dequantize(codes), q(w)

    def error(w_hat: torch.Tensor) -> float:
        return float((held_out @ (w_hat - w).T).pow(2).mean())

    assert error(w_gptq) < 0.7 * error(w_nearest)


def _textbook_gptq(w: torch.Tensor, h: torch.Tensor, q: UniformQuantizer, damp: float) -> torch.Tensor:
    """GPTQ as its paper writes it (float64, no lazy blocks): round column i, then move every later
    column by the error times row i of the upper Cholesky factor of the damped inverse Hessian."""
    h = h + torch.eye(h.shape[0], dtype=torch.float64) * damp * h.diagonal().mean()
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w = w.double().clone()
    scale, zero_point = q.scale.double().reshape(-1), q.zero_point.double().reshape(-1)
    lo, hi = q.code_range
    codes = torch.empty_like(w)
    for i in range(w.shape[1]):
        codes[:, i] = torch.round(w[:, i] / scale + zero_point).clamp(lo, hi)
        err = (w[:, i] - (codes[:, i] - zero_point) * scale) / upper[i, i]
        w[:, i:] -= err[:, None] * upper[i, i:][None, :]
    return codes.long()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nearest_plane_sweep_gives_the_codes_of_textbook_gptq(bits: int) -> None:
    # the library rounds against V (H = V V^T) with lazy blocks in float32; the textbook updates with
    # the inverse Hessian's factor in float64: the same codes, clipped columns included
    w = torch.randn(40, 300, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.2, 2, 300)
    q = _weight_quantizer(w[:, :150], bits)  # grids from half the columns: the rest clip
    h = input_hessian(_correlated_inputs(2048, 300, seed=bits))
    codes = gptq_round(w, h, q, damp=0.1, block_size=32)
    assert bool(((q.dequantize(codes) - w).abs() > q.scale.reshape(-1, 1)).any())  # some were clipped
    assert torch.equal(codes, _textbook_gptq(w, h, q, damp=0.1))
    assert torch.equal(codes, gptq_round(w, h, q, damp=0.1))  # the block size changes nothing


def test_damped_hessian_factor_and_solve() -> None:
    h = input_hessian(_correlated_inputs(512, 24, seed=4))
    damped = h + torch.eye(24, dtype=torch.float64) * 0.1 * h.diagonal().mean()
    factor = DampedHessian(h, 0.1)
    v = factor.upper()
    assert torch.equal(v, v.triu()) and bool((v.diagonal() > 0).all())
    torch.testing.assert_close(v @ v.T, damped)
    rhs = torch.randn(24, 5, dtype=torch.float64)
    torch.testing.assert_close(factor.solve(rhs), torch.linalg.solve(damped, rhs))
    with pytest.raises(ValueError, match="square"):
        DampedHessian(torch.zeros(3, 4), 0.1)


def test_float_target_ridge_ignores_dead_inputs_where_rounding_gives_them_a_unit_diagonal() -> None:
    # an input channel that is always 0 in the quantized model (a 3-bit v channel rounded to 0 makes
    # one in proj's input): the target's ridge is damp * mean(diag H) of H as it is, while the
    # rounding first gives that channel a unit diagonal (which also enters its mean)
    x_fp, x_q = _float_and_quantized_inputs(512, seed=8)
    x_q[:, 3] = 0.0
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(8))
    h, c = input_hessian(x_q), _cross(x_fp, x_q)
    ridge = 0.1 * h.diagonal().mean()
    expected = w.double() + w.double() @ (c - h) @ torch.linalg.inv(
        h + ridge * torch.eye(64, dtype=torch.float64)
    )
    target = float_target_weight(w, c, h, damp=0.1)
    torch.testing.assert_close(target.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(target[:, 3], w[:, 3])  # a dead input's weights are left as they are
    unit = h.clone()
    unit[3, 3] = 1.0
    torch.testing.assert_close(
        DampedHessian(h, 0.1).upper() @ DampedHessian(h, 0.1).upper().T,
        unit + 0.1 * unit.diagonal().mean() * torch.eye(64, dtype=torch.float64),
    )
    assert DampedHessian(h, 0.1).has_dead and not DampedHessian(unit, 0.1).has_dead


def test_sample_rows_keeps_evenly_spaced_rows_only_above_the_cap() -> None:
    small = torch.randn(GPTQ_MIN_ROWS, 8)
    assert sample_rows(small) is small
    rows = torch.arange(3 * GPTQ_MIN_ROWS, dtype=torch.float32)[:, None].expand(-1, 8)
    kept = sample_rows(rows)[:, 0]
    assert kept.shape == (GPTQ_MIN_ROWS,) and kept[0] == 0 and kept[-1] == 3 * GPTQ_MIN_ROWS - 1
    gaps = kept.diff()
    assert int(gaps.min()) >= 2 and int(gaps.max()) <= 4  # evenly spread, no row twice
    assert torch.equal(sample_rows(rows + 1)[:, 0], kept + 1)  # the same rows for the same count
    wide = torch.randn(3 * GPTQ_MIN_ROWS, 1024)  # wide layers keep 16 rows per input channel
    assert sample_rows(wide).shape == (16 * 1024, 1024)


def test_codes_are_integer_codes_in_range_that_the_quantizer_reproduces() -> None:
    w = torch.randn(32, 40) * torch.linspace(0.1, 3, 32)[:, None]  # channels of different ranges
    q = _weight_quantizer(w, 3)
    codes = gptq_round(w, input_hessian(_correlated_inputs(512, 40, seed=0)), q)
    assert codes.dtype == torch.int64 and int(codes.min()) >= 0 and int(codes.max()) <= 7
    w_gptq = q.dequantize(codes)
    assert torch.equal(q.codes(w_gptq), codes)  # the stored weight maps onto exactly these codes
    assert torch.equal(q(w_gptq), w_gptq)
    assert not torch.equal(codes, q.codes(w))  # and they are not simply the nearest ones


def test_gptq_is_deterministic() -> None:
    w = torch.randn(16, 24)
    q = _weight_quantizer(w, 3)
    h = input_hessian(_correlated_inputs(256, 24, seed=5))
    assert torch.equal(gptq_round(w, h, q), gptq_round(w, h, q))
    assert torch.equal(gptq_round(w, h, q, act_order=True), gptq_round(w, h, q, act_order=True))


def test_diagonal_hessian_gives_nearest_rounding() -> None:
    # uncorrelated inputs: an error has nothing to be compensated by, so GPTQ is round-to-nearest
    w = torch.randn(16, 24)
    q = _weight_quantizer(w, 3)
    h = torch.diag(torch.rand(24, dtype=torch.float64) + 0.5)
    assert torch.equal(gptq_round(w, h, q), q.codes(w))


def test_singular_hessian_is_damped_and_dead_inputs_round_to_nearest() -> None:
    x = _correlated_inputs(256, 24, seed=0)
    x[:, 5] = 0.0  # an input channel never active in calibration
    x[:, 7] = x[:, 6]  # collinear inputs: H is singular without damping
    w = torch.randn(16, 24)
    q = _weight_quantizer(w, 3)
    codes = gptq_round(w, input_hessian(x), q, damp=1e-8)  # the retry raises the damping as needed
    assert int(codes.min()) >= 0 and int(codes.max()) <= 7
    assert torch.equal(codes[:, 5], q.codes(w)[:, 5])
    # an all-zero Hessian (every input 0) leaves nothing to compensate: nearest rounding
    assert torch.equal(gptq_round(w, torch.zeros(24, 24, dtype=torch.float64), q), q.codes(w))


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(CalibrationError, match="received none"):
        input_hessian(torch.empty(0, 8))
    w = torch.randn(4, 8)
    q = _weight_quantizer(w, 3)
    h = torch.eye(8, dtype=torch.float64)
    h[2, 2] = float("nan")
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        gptq_round(w, h, q)


def _float_and_quantized_inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float inputs and their "quantized" version: the float ones plus an error that is partly a
    systematic shift per channel (what upstream rounding leaves) and partly noise."""
    x_fp = _correlated_inputs(n, 64, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    bias = torch.randn(64, generator=torch.Generator().manual_seed(7)) * 0.3
    return x_fp, x_fp + bias + 0.2 * torch.randn(n, 64, generator=gen)


def _cross(x_fp: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
    return (x_fp.T @ x_q).double() / x_q.shape[0]


@pytest.mark.parametrize("bits", [3, 4])
def test_float_target_lowers_held_out_error_against_the_float_output(bits: int) -> None:
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    q = _weight_quantizer(w, bits)
    x_fp, x_q = _float_and_quantized_inputs(2048, seed=2)
    h = input_hessian(x_q)
    plain = q.dequantize(gptq_round(w, h, q))
    w_target = float_target_weight(w, _cross(x_fp, x_q), h)
    asym = q.dequantize(gptq_round(w_target, h, q))
    held_fp, held_q = _float_and_quantized_inputs(2048, seed=3)  # fresh draws, same distribution

    def error(w_hat: torch.Tensor) -> float:
        return float((held_fp @ w.T - held_q @ w_hat.T).pow(2).mean())

    assert error(asym) < 0.8 * error(plain)
    assert error(w_target) < error(w)  # the unrounded target already beats the float weight


def test_float_target_with_equal_inputs_is_the_float_weight_and_plain_gptq() -> None:
    # the ridge pulls towards W, so X_q == X_fp gives W' == W exactly (C - H == 0), whatever damping
    w = torch.randn(32, 64)
    q = _weight_quantizer(w, 3)
    x = _correlated_inputs(512, 64, seed=4)
    h = input_hessian(x)
    for damp in (0.01, 0.1):
        target = float_target_weight(w, _cross(x, x), h, damp)
        assert torch.equal(target, w)
        assert torch.equal(gptq_round(target, h, q), gptq_round(w, h, q))


def test_float_target_of_a_layer_whose_inputs_are_all_zero_is_the_float_weight() -> None:
    """A layer whose quantized inputs are all 0 (all-zero calibration images at the patch embedding,
    or 1e-8 weights before it, under the activation grid's floor) had an all-zero Hessian, no
    damping and a CalibrationError, at W3/A3 only (the float target): W/A4 quantized the same model."""
    w = torch.randn(8, 16)
    zeros = torch.zeros(16, 16, dtype=torch.float64)
    assert torch.equal(float_target_weight(w, zeros, zeros), w)
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10).eval()
    q = dopq.quantize(model, torch.zeros(2, 3, 160, 160), dopq.get_preset("recommended", w_bits=3, a_bits=3))
    assert bool(torch.isfinite(q(torch.randn(1, 3, 160, 160))).all())


def test_float_target_codes_are_in_range_and_deterministic() -> None:
    w = torch.randn(32, 64) * torch.linspace(0.1, 3, 32)[:, None]
    q = _weight_quantizer(w, 3)
    x_fp, x_q = _float_and_quantized_inputs(512, seed=5)
    h, c = input_hessian(x_q), _cross(x_fp, x_q)
    codes = gptq_round(float_target_weight(w, c, h), h, q)
    assert codes.dtype == torch.int64 and int(codes.min()) >= 0 and int(codes.max()) <= 7
    assert torch.equal(codes, gptq_round(float_target_weight(w, c, h), h, q))
    # shrink 0 is the float weight, shrink 1 the least-squares target, in between a straight line
    half = float_target_weight(w, c, h, shrink=0.5)
    assert torch.equal(float_target_weight(w, c, h, shrink=0.0), w)
    torch.testing.assert_close(half, (w + float_target_weight(w, c, h)) / 2)
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        float_target_weight(w, c * float("nan"), h)


def test_float_target_in_a_model_aims_at_the_float_output() -> None:
    # two layers: the second one's quantized input carries the first one's rounding error, which
    # only the float target can compensate; the codes stay on the calibrated grid
    torch.manual_seed(0)
    x = _correlated_inputs(512, 16, seed=6)
    outputs = []
    for target in ("quantized", "float"):
        torch.manual_seed(0)
        model = nn.Sequential(
            QuantLinear(nn.Linear(16, 32), None, UniformQuantizer(3, PerChannel(0))),
            QuantLinear(nn.Linear(32, 8), None, UniformQuantizer(3, PerChannel(0))),
        )
        with torch.no_grad(), quantizers_off(model):
            reference = model(x)
        originals = dopq_calibrate_then_gptq(model, x, target=target)
        with torch.no_grad():
            for layer in model:
                assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)
            outputs.append(float((model(x) - reference).pow(2).mean()))
        assert set(originals) == {"0", "1"}
    assert outputs[1] < outputs[0]
    with pytest.raises(ValueError, match="target"):
        gptq_model(model, x, target="both")


class _OneUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = QuantLinear(nn.Linear(8, 8), None, UniformQuantizer(3, PerChannel(0)))
        self.unused = QuantLinear(nn.Linear(8, 4), None, UniformQuantizer(3, PerChannel(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_a_layer_without_calibration_input_is_named() -> None:
    model = _OneUsed()
    for layer in (model.used, model.unused):
        layer.weight_quantizer.observing = True
        layer.weight_quantizer(layer.weight)
        layer.weight_quantizer.observing = False
    with pytest.raises(CalibrationError, match=r"no calibration input.*unused"):
        gptq_model(model, torch.randn(16, 8))


class _DepthwiseStem(nn.Module):
    """A depthwise convolution (as in a convolutional stem) before a dense one."""

    def __init__(self) -> None:
        super().__init__()
        self.depthwise = QuantConv2d(
            nn.Conv2d(4, 4, 3, padding=1, groups=4), None, UniformQuantizer(3, PerChannel(0))
        )
        self.dense = QuantConv2d(nn.Conv2d(4, 6, 2, stride=2), None, UniformQuantizer(3, PerChannel(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.depthwise(x))


def test_a_grouped_conv_keeps_nearest_rounding_and_the_rest_is_gptq() -> None:
    """GPTQ's Hessian is for one matrix product of unfolded rows; a depthwise Conv2d is not one, and
    GPTQ stopped the whole recipe on it (timm's vitamin stem)."""
    torch.manual_seed(0)
    model = _DepthwiseStem()
    for layer in (model.depthwise, model.dense):
        layer.weight_quantizer.observing = True
        layer.weight_quantizer(layer.weight)
        layer.weight_quantizer.observing = False
    float_weights = {n: m.weight.detach().clone() for n, m in model.named_children()}
    nearest = {n: m.weight_quantizer(m.weight).detach() for n, m in model.named_children()}
    originals = gptq_model(model, torch.randn(16, 4, 8, 8))
    assert set(originals) == {"dense"}
    assert torch.equal(
        model.depthwise.weight, float_weights["depthwise"]
    )  # its quantizer rounds it to nearest
    assert torch.equal(model.dense.weight, model.dense.weight_quantizer(model.dense.weight))  # on its grid
    assert not torch.equal(model.dense.weight, nearest["dense"])  # GPTQ moved some codes


def test_conv_inputs_are_the_patches_the_weight_multiplies() -> None:
    conv = nn.Conv2d(3, 6, kernel_size=4, stride=4)
    layer = QuantConv2d(conv, None, UniformQuantizer(3, PerChannel(0)))
    x = torch.randn(2, 3, 8, 8)
    rows = layer_inputs(layer, x)
    out = (rows @ conv.weight.reshape(6, -1).T).reshape(2, 4, 6).transpose(1, 2).reshape(2, 6, 2, 2)
    torch.testing.assert_close(out + conv.bias[:, None, None], conv(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def gptq_vit() -> tuple[nn.Module, torch.Tensor, dopq.QuantConfig, dict]:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10).eval()
    x = torch.randn(8, 3, 160, 160)
    config = dopq.get_preset("dopq", w_bits=3, a_bits=4, weight_rounding="gptq")
    model, report = dopq.quantize_with_report(model, x, config, progress=False)
    return model, x, config, report.to_dict()


def test_model_weights_are_on_their_grid_and_report_the_stage(gptq_vit) -> None:
    model, _, _, report = gptq_vit
    layers = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    assert layers
    for layer in layers:  # the quantizer maps each stored weight onto itself: the codes are GPTQ's
        with torch.no_grad():
            assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)
    assert report["timings"]["gptq"] > 0 and report["calib_seconds"] > report["timings"]["gptq"]
    # W3/A4: the width rule's float target, half way
    assert report["gptq"] == {"target": "float", "target_shrink": 0.5, "layers": len(layers)}


def test_saved_and_deployed_models_reproduce_the_gptq_codes(gptq_vit, tmp_path: Path) -> None:
    model, x, config, _ = gptq_vit
    loaded, loaded_config, _ = load_quantized(save_quantized(model, tmp_path / "q.pt", config))
    assert loaded_config.weight_rounding == "gptq"
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        simulated, deployed = model(x), to_deploy(model)(x)
    assert torch.allclose(deployed, simulated, atol=1e-5 * float(simulated.abs().max()))


def test_gptq_weights_are_reconstruction_s_starting_point(gptq_vit) -> None:
    model, _, _, _ = gptq_vit
    layer = model.blocks[0].mlp.fc1
    ada = AdaRoundQuantizer(layer.weight_quantizer, layer.weight.detach(), straight_through=True)
    with torch.no_grad():
        assert torch.equal(ada.bake(), layer.weight)


def test_bias_correction_measures_against_the_float_weights() -> None:
    # after GPTQ a layer's weight holds its quantized value; bias correction must still remove the
    # mean error of the weight rounding, so it compares with the float weight from before rounding
    torch.manual_seed(0)
    layer = QuantLinear(nn.Linear(16, 8), None, UniformQuantizer(3, PerChannel(0)))
    model = nn.Sequential(layer)
    x = _correlated_inputs(256, 16, seed=1) + 1.0  # a non-zero input mean makes the error's mean show
    originals = dopq_calibrate_then_gptq(model, x)
    bias = layer.bias.detach().clone()
    expected = (x @ (layer.weight - originals["0"]).T).mean(0)
    corrections = correct_bias(model, x[None], reference_weights=originals)
    torch.testing.assert_close(bias - layer.bias.detach(), expected, rtol=1e-4, atol=1e-6)
    assert corrections["0"] > 0
    # without the reference the weight error would be invisible: nothing to correct
    assert correct_bias(model, x[None])["0"] < 1e-5


def dopq_calibrate_then_gptq(model: nn.Module, x: torch.Tensor, **gptq: Any) -> dict[str, torch.Tensor]:
    with observing(model), torch.no_grad():
        model(x)
    return gptq_model(model, x, **gptq)


def test_reconstruction_starts_from_the_gptq_weights() -> None:
    from dopq.config import ReconstructConfig

    torch.manual_seed(0)
    x = torch.randn(4, 3, 160, 160)
    config = dopq.get_preset("dopq", w_bits=3, a_bits=4, weight_rounding="gptq")
    models = []
    for recon in (None, ReconstructConfig(calib_size=4, iters=0, batch_size=4)):
        torch.manual_seed(0)
        model = timm.create_model("test_vit", num_classes=10).eval()
        models.append(dopq.quantize(model, x, config.replace(reconstruct=recon), progress=False))
    # zero optimisation steps: reconstruction's baked rounding is exactly GPTQ's
    for (name, a), b in zip(models[0].named_modules(), models[1].modules(), strict=True):
        if isinstance(a, QuantLinear):
            assert torch.equal(a.weight, b.weight), name


def test_config_and_command_line_switches() -> None:
    from dopq.cli import _config_from, build_parser
    from dopq.errors import ConfigError

    with pytest.raises(ConfigError, match="weight_rounding must be one of"):
        dopq.QuantConfig(weight_rounding="stochastic")
    with pytest.raises(ConfigError, match="gptq_damp"):
        dopq.QuantConfig(gptq_damp=0.0)
    args = build_parser().parse_args(
        ["quantize", "--model", "m", "--data", "d", "--weight-rounding", "gptq", "--softmax-quantizer", "auto",
         "--gptq-act-order", "on", "--gptq-damp", "0.05", "--w-bits", "3", "--a-bits", "3",
         "--gptq-target", "float"]
    )  # fmt: skip
    config = _config_from(args)
    assert (config.weight_rounding, config.softmax_quantizer, config.gptq_act_order, config.gptq_damp) == (
        "gptq", "auto", True, 0.05,
    )  # fmt: skip
    assert config.gptq_target == "float" and config.to_dict()["gptq_target"] == "float"
    assert dopq.QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="gptq_target must be one of"):
        dopq.QuantConfig(gptq_target="fp")
    default = _config_from(build_parser().parse_args(["quantize", "--model", "m", "--data", "d"]))
    # the default recipe at W4/A4: GPTQ with damping 1.0, kept only where the calibration check passes
    assert (default.weight_rounding, default.gptq_act_order, default.gptq_check) == ("gptq", False, True)
    assert (default.gptq_target, default.gptq_target_shrink) == (None, 0.5)
    # the objective follows the width unless given: the float model's output at 3 bits and below
    assert default.gptq_target_used == "quantized"
    assert default.replace(w_bits=3, a_bits=3).gptq_target_used == "float"
    assert default.replace(w_bits=8, a_bits=3).gptq_target_used == "float"
    assert default.replace(w_bits=3, a_bits=3, gptq_target="quantized").gptq_target_used == "quantized"
    assert dopq.QuantConfig.from_dict(default.to_dict()) == default
    # the shrink reaches a recipe whose GPTQ aims at the float target (W3 by the width rule)
    quarter = build_parser().parse_args(
        ["quantize", "--model", "m", "--data", "d", "--w-bits", "3", "--gptq-target-shrink", "0.25"]
    )
    assert _config_from(quarter).gptq_target_shrink == 0.25
    with pytest.raises(ConfigError, match="gptq_target_shrink must be in"):
        dopq.QuantConfig(gptq_target_shrink=1.5)


def test_float_target_rounds_in_chunks_with_fewer_rows_held_and_the_same_weights(monkeypatch) -> None:
    # the float target holds each layer's float input rows from its float pass until the layer is
    # rounded; all layers' at once grew to gigabytes on ViT-B (O(layers x images)). Above
    # GPTQ_FLOAT_ROWS_BYTES the layers are rounded in chunks: fewer rows held, the same weights
    import weakref

    from dopq import gptq

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10).eval()
    x = torch.randn(4, 3, 160, 160)
    config = dopq.get_preset("dopq", w_bits=3, a_bits=4, weight_rounding="gptq")
    assert config.gptq_target_used == "float"
    whole, _ = dopq.quantize_with_report(copy.deepcopy(model), x, config, progress=False)

    # bytes: the patch embedding's rows (1.2 MB, 400 patches x 768) and a few blocks' (0.6 MB each) of 5 MB
    budget = 1_500_000
    monkeypatch.setattr(gptq, "GPTQ_FLOAT_ROWS_BYTES", budget, raising=False)
    held: list[weakref.ref] = []
    peak, passes = 0, 0
    float_inputs, sample_rows, cross_moment = gptq._float_inputs, gptq.sample_rows, gptq._cross_moment
    in_float_pass = False

    def counted_float_inputs(*args: Any, **kwargs: Any) -> Any:
        nonlocal in_float_pass, passes
        in_float_pass, passes = True, passes + 1
        try:
            return float_inputs(*args, **kwargs)
        finally:
            in_float_pass = False

    def tracked_rows(rows: torch.Tensor) -> torch.Tensor:
        out = sample_rows(rows)
        if in_float_pass:
            held.append(weakref.ref(out))
        return out

    def measured_cross_moment(x_fp: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
        nonlocal peak  # the float rows still alive when one layer's are used
        peak = max(peak, sum(r().numel() * r().element_size() for r in held if r() is not None))
        return cross_moment(x_fp, x_q)

    monkeypatch.setattr(gptq, "_float_inputs", counted_float_inputs)
    monkeypatch.setattr(gptq, "sample_rows", tracked_rows)
    monkeypatch.setattr(gptq, "_cross_moment", measured_cross_moment)
    chunked, _ = dopq.quantize_with_report(copy.deepcopy(model), x, config, progress=False)
    assert 0 < peak <= budget
    assert passes > 2
    expected = whole.state_dict()
    for key, value in chunked.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_float_target_chunks_with_the_check_run_their_float_passes_on_the_nearest_model(monkeypatch) -> None:
    # the calibration check's round-to-nearest copy is a float model taken before rounding: the later
    # chunks' float passes run on it rather than on a second deep copy of the model, same weights
    import dopq.api as api
    from dopq import gptq

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10).eval()
    x = torch.randn(6, 3, 160, 160)  # the fewest on which the check can keep GPTQ (it runs)
    config = dopq.get_preset("dopq", w_bits=3, a_bits=4, weight_rounding="gptq", gptq_check=True)
    assert config.gptq_target_used == "float"
    whole, _ = dopq.quantize_with_report(copy.deepcopy(model), x, config, progress=False)

    monkeypatch.setattr(gptq, "GPTQ_FLOAT_ROWS_BYTES", 1_500_000, raising=False)  # as the test above
    unrounded, passed_on = [], []
    gptq_model_, float_inputs_ = api.gptq_model, gptq._float_inputs

    def spy_gptq_model(*args: Any, **kwargs: Any) -> Any:
        unrounded.append(kwargs["unrounded"])
        return gptq_model_(*args, **kwargs)

    def spy_float_inputs(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        passed_on.append(model)
        return float_inputs_(model, *args, **kwargs)

    monkeypatch.setattr(api, "gptq_model", spy_gptq_model)
    monkeypatch.setattr(gptq, "_float_inputs", spy_float_inputs)
    chunked, _ = dopq.quantize_with_report(copy.deepcopy(model), x, config, progress=False)
    assert len(unrounded) == 1 and unrounded[0] is not None and len(passed_on) > 2
    assert all(m is unrounded[0] for m in passed_on[1:])  # the first pass is the model's own
    expected = whole.state_dict()
    for key, value in chunked.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_with_the_check_bias_correction_reads_the_float_weights_of_the_nearest_model(monkeypatch) -> None:
    # the calibration check's round-to-nearest copy already holds every float weight: GPTQ's
    # reference weights for bias correction are its tensors, not a second copy (340 MB on ViT-B)
    import dopq.api as api

    config = dopq.get_preset("recommended", w_bits=4, a_bits=4)
    assert config.gptq_check and config.gptq_target_used == "quantized"
    references, models = [], []
    correct_bias_, keep_better_rounding_ = api.correct_bias, api.keep_better_rounding

    def spy_correct_bias(model: nn.Module, images: torch.Tensor, **kwargs: Any) -> Any:
        references.append(kwargs.get("reference_weights"))
        return correct_bias_(model, images, **kwargs)

    def spy_check(model: nn.Module, nearest: nn.Module, *args: Any) -> Any:
        models.append(nearest)
        return keep_better_rounding_(model, nearest, *args)

    monkeypatch.setattr(api, "correct_bias", spy_correct_bias)
    monkeypatch.setattr(api, "keep_better_rounding", spy_check)
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10).eval()
    dopq.quantize_with_report(model, torch.randn(8, 3, 160, 160), config, progress=False)
    (nearest,) = models
    reference = references[0]  # the GPTQ model's correction; the nearest model's has none
    assert reference and references[1] is None
    for name, weight in reference.items():
        assert weight.data_ptr() == nearest.get_submodule(name).weight.data_ptr(), name
