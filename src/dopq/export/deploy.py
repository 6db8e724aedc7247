"""The deploy form of a quantized model: integer weights, per-tensor activation Q/DQ, closed-form
post-Softmax codes. It is built from the quantizers' own API (``codes``, ``dequantize``,
``level_table``, the warp parameters) and computes in torch what the exported ONNX graph computes.

:func:`to_deploy` swaps, in a copy, every ``QuantLinear`` / ``QuantConv2d`` / ``QuantMatMul`` for a
deploy module; everything else (LayerNorm, Softmax, GELU, residual adds, position embeddings and
Swin's relative position bias) stays float. The post-LayerNorm input offset (``ln_shift=input``,
per-channel integer zero points) is folded into the bias with the *quantized* weights, so every
activation stays per tensor: ``(x + o) W^T + b = x W^T + (W o + b)``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dopq.errors import ExportError
from dopq.export.symbolic import dequantize_weight, log_levels, qdq, tan_levels, threshold_levels
from dopq.modules import QuantConv2d, QuantLinear, QuantMatMul, quantizers_of
from dopq.quantizers import LevelQuantizer, LogQuantizer, Quantizer, TanQQuantizer, UniformQuantizer

__all__ = [
    "ActivationQDQ",
    "DeployConv2d",
    "DeployLinear",
    "DeployMatMul",
    "SoftmaxLevels",
    "WeightCodes",
    "check_quantized",
    "to_deploy",
]


def check_quantized(model: nn.Module) -> None:
    """Refuse a model without calibrated quantizers (a float model, or one still to calibrate)."""
    quantizers = list(quantizers_of(model))
    if not quantizers:
        raise ExportError(
            "the model has no quantizers: quantize it first (dopq.quantize / dopq quantize --save)"
        )
    missing = [name for name, q in quantizers if not bool(q.initialized)]
    if missing:
        raise ExportError(f"{len(missing)} quantizers were never calibrated (e.g. {missing[0]})")


def _per_tensor(q: Quantizer, where: str) -> UniformQuantizer:
    if not isinstance(q, UniformQuantizer) or q.scale.numel() != 1:
        raise ExportError(f"{where}: only per-tensor uniform activation quantizers export, got {q}")
    return q


class ActivationQDQ(nn.Module):
    """Per-tensor uniform Q/DQ of an activation, codes in a uint8 container.

    The zero point must be an integer code in ``[0, 2^b - 1]`` (0.0 is then exactly a level);
    RepQ-ViT's fractional post-LayerNorm zero point is not, so it is refused.
    """

    def __init__(self, q: UniformQuantizer, where: str) -> None:
        super().__init__()
        q = _per_tensor(q, where)
        self.bits, self.scale, zero_point = q.bits, float(q.scale), float(q.zero_point)
        lo, hi = q.code_range
        if zero_point != round(zero_point) or not lo <= zero_point <= hi:
            raise ExportError(
                f"{where}: zero point {zero_point:g} is not an integer code in [{lo}, {hi}]; "
                "integer kernels need one (use --integer-zero-point on, as the dopq recipe does)"
            )
        self.zero_point = int(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qdq(x, self.scale, self.zero_point, self.bits)


class WeightCodes(nn.Module):
    """Integer weight codes with per-output-channel scales and zero points.

    Codes ``q`` in ``[0, 2^b - 1]`` with zero points ``z`` are stored centred, ``q - z`` with zero
    point 0 (symmetric, the fast case of integer GEMMs), when that fits the container (int4 up to 4
    bits, where the export packs them, int8 above); otherwise shifted by half the range,
    ``q - 2^(b-1)`` with zero points ``z - 2^(b-1)``, which always fits.
    """

    def __init__(self, weight: torch.Tensor, q: UniformQuantizer, where: str, transpose: bool) -> None:
        super().__init__()
        if not isinstance(q, UniformQuantizer) or q.channel_axis not in (0, None):
            raise ExportError(f"{where}: weights need a per-output-channel uniform quantizer, got {q}")
        self.bits = q.bits
        codes = q.codes(weight.detach())
        channels = codes.shape[0]
        zero_point = q.zero_point.detach().reshape(-1).expand(channels)
        lo, hi = q.code_range
        if not torch.equal(zero_point, zero_point.round()) or zero_point.min() < lo or zero_point.max() > hi:
            raise ExportError(f"{where}: weight zero points are not integer codes in [{lo}, {hi}]")
        zero_point = zero_point.long()
        shape = (-1,) + (1,) * (codes.ndim - 1)
        centred = codes - zero_point.view(shape)
        container_bits = 4 if self.bits <= 4 else 8  # INT4 (packed by the export) or int8
        limit = 2 ** (container_bits - 1)
        if -limit <= centred.min() and centred.max() < limit:
            stored, zp = centred, torch.zeros_like(zero_point)
        else:
            half = 2 ** (self.bits - 1)
            stored, zp = codes - half, zero_point - half
        self.axis = 1 if transpose else 0
        stored = stored.t() if transpose else stored
        self.register_buffer("codes", stored.to(torch.int8).contiguous())
        self.register_buffer("scale", q.scale.detach().float().reshape(-1).expand(channels).clone())
        self.register_buffer("zero_point", zp.to(torch.int8))

    def forward(self) -> torch.Tensor:
        return dequantize_weight(self.codes, self.scale, self.zero_point, self.axis)


def _optional_qdq(q: nn.Module, where: str) -> nn.Module:
    if isinstance(q, Quantizer) and q.enabled:
        return ActivationQDQ(q, where)
    return nn.Identity()


def _weight_quantizer(module: nn.Module, where: str) -> UniformQuantizer:
    q = module.weight_quantizer
    if not isinstance(q, UniformQuantizer) or not q.enabled:
        raise ExportError(f"{where}: the weight is not quantized; export needs integer weights")
    return q


class DeployLinear(nn.Module):
    """``x_q @ W_q^T + b'`` with int8 weight codes stored transposed (``(in, out)``, DequantizeLinear
    on axis 1) so that the integer MatMul sees them directly, and the input offset in ``b'``."""

    def __init__(self, layer: QuantLinear, where: str) -> None:
        super().__init__()
        wq = _weight_quantizer(layer, where)
        self.input_qdq = _optional_qdq(layer.input_quantizer, where)
        self.weight = WeightCodes(layer.weight, wq, where, transpose=True)
        bias = torch.zeros(layer.out_features, dtype=torch.float64)
        if layer.bias is not None:
            bias += layer.bias.detach().double()
        if layer.input_offset is not None:
            w_hat = wq.dequantize(wq.codes(layer.weight)).double()
            bias += w_hat @ layer.input_offset.detach().double()
        self.register_buffer("bias", bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.input_qdq(x), self.weight()) + self.bias


class DeployConv2d(nn.Module):
    """Convolution of the Q/DQ input with int8 weight codes (patch embedding)."""

    def __init__(self, layer: QuantConv2d, where: str) -> None:
        super().__init__()
        wq = _weight_quantizer(layer, where)
        self.input_qdq = _optional_qdq(layer.input_quantizer, where)
        self.weight = WeightCodes(layer.weight, wq, where, transpose=False)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.stride, self.padding, self.dilation, self.groups = (
            layer.stride, layer.padding, layer.dilation, layer.groups,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_qdq(x)
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class SoftmaxLevels(nn.Module):
    """The deploy form of a post-Softmax table quantizer: the level value of each element, from the
    family's closed form (TanQ, log2, log-sqrt2) or by comparisons with every threshold."""

    def __init__(self, q: LevelQuantizer) -> None:
        super().__init__()
        q = q.resolve()  # a per-module choice ("auto") exports as the family it chose
        if isinstance(q, TanQQuantizer):
            self.kind, self.args = "tanq", (*q.warp_params(), q.bits)
        elif isinstance(q, LogQuantizer):
            self.kind, self.args = "log", (float(q.delta), q.step, q.n_nonzero)
        else:
            levels, thresholds = q.level_table()
            self.kind, self.args = "table", (levels.tolist(), thresholds.tolist())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "tanq":
            return tan_levels(x, *self.args)
        if self.kind == "log":
            return log_levels(x, *self.args)
        return threshold_levels(x, *self.args)


def _fixed_point_scale(levels: torch.Tensor, max_code: int = 255) -> float:
    """``s`` with ``round(level / s)`` the 8-bit fixed-point levels: ``max level / 255``, nudged
    until no level sits within 1e-3 of a rounding tie, so that the runtime's level values (equal
    to the table's up to float rounding) round to the same integers as the table."""
    top = float(levels.max())
    if top <= 0:
        return 1.0
    values = levels.double()
    for step in range(1000):
        scale = top / (max_code - 1e-4 * step)
        frac = torch.frac(values / scale)
        if bool(((frac - 0.5).abs() > 1e-3).all()):
            return scale
    return top / max_code


class DeployMatMul(nn.Module):
    """``a @ b`` of two quantized activations; a post-Softmax ``a`` gets its level values.

    With ``integer_levels`` the level values are rounded to an 8-bit fixed-point grid
    (``round(level / s)``, ``s = max level / 255``) so that ``attn @ v`` also runs as an integer
    MatMul; this changes the simulated function slightly (docs/export.md measures it).
    """

    def __init__(self, layer: QuantMatMul, where: str, integer_levels: bool) -> None:
        super().__init__()
        qa = layer.quantizer_a
        self.levels: SoftmaxLevels | None = None
        self.level_scale = 0.0
        if isinstance(qa, LevelQuantizer) and qa.enabled:
            self.levels = SoftmaxLevels(qa)
            if integer_levels:
                self.level_scale = _fixed_point_scale(qa.lookup_table())
            self.qdq_a: nn.Module = nn.Identity()
        else:
            self.qdq_a = _optional_qdq(qa, f"{where} (left operand)")
        self.qdq_b = _optional_qdq(layer.quantizer_b, f"{where} (right operand)")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.levels is not None:
            a = self.levels(a)
            if self.level_scale:
                a = qdq(a, self.level_scale, 0, 8)
        return self.qdq_a(a) @ self.qdq_b(b)


def _set_child(root: nn.Module, qualified: str, new: nn.Module) -> None:
    parent, _, leaf = qualified.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


@torch.no_grad()
def to_deploy(model: nn.Module, integer_levels: bool = False) -> nn.Module:
    """A CPU copy of a quantized model in deploy form (the model itself is not changed).

    Args:
        model: a model returned by :func:`dopq.quantize` (or loaded with ``load_quantized``).
        integer_levels: round post-Softmax levels to 8-bit fixed point for an integer ``attn @ v``.
    """
    check_quantized(model)
    deploy = copy.deepcopy(model).cpu().eval()
    for name, module in list(deploy.named_modules()):
        if isinstance(module, QuantLinear):
            _set_child(deploy, name, DeployLinear(module, name))
        elif isinstance(module, QuantConv2d):
            _set_child(deploy, name, DeployConv2d(module, name))
        elif isinstance(module, QuantMatMul):
            _set_child(deploy, name, DeployMatMul(module, name, integer_levels))
    return deploy
