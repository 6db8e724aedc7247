"""Deploy Linear and Conv2d layers: integer weight codes from the weight quantizer (``WeightCodes``),
the activation Q/DQ before them and, from 8-bit inputs, the bias inside the integer product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dopq.errors import ExportError
from dopq.export.qdq import ActivationQDQ, optional_qdq, symmetric_target
from dopq.export.symbolic import (
    bias_gemm,
    dequantize_weight,
    integer_linear,
    integer_matmul,
)
from dopq.modules import (
    QuantConv2d,
    QuantLinear,
    quantized_weight,
)
from dopq.quantizers import UniformQuantizer

__all__ = [
    "BIAS_CODE_LIMIT",
    "INTEGER_BIAS_MIN_BITS",
    "DeployConv2d",
    "DeployLinear",
    "WeightCodes",
    "symmetric_weights",
]


class WeightCodes(nn.Module):
    """Integer weight codes with per-output-channel scales and zero points.

    Two storages, by the runtime the export is for (``symmetric``). For onnxruntime, codes are
    stored centred, ``q - z`` with zero point 0 (symmetric, the fast case of integer GEMMs), when that
    fits the container (int4 up to 4 bits, where the export packs them, int8 for 5-7 bits); otherwise
    shifted by half the range, ``q - 2^(b-1)`` with zero points ``z - 2^(b-1)``, which always fits
    (8-bit codes too, ``weight_type="int8"``); with ``weight_type="uint8"`` 8-bit codes are stored as
    they are, uint8 with their zero points (see :data:`WEIGHT_TYPES`). For
    OpenVINO (``symmetric``), codes are stored as ``q - z + c`` with zero point ``c``, per channel
    the smallest shift that fits the signed container (0 where the centred codes fit). OpenVINO has
    no integer kernel for weights with zero points, so the shift must go before the product: up to
    4 bits the export subtracts it from the codes in int8, a constant ``Sub`` that OpenVINO folds at
    compile time (:attr:`shift_in_graph`; ``q - z`` always fits int8, not always INT4, the file's
    container); 8-bit codes, where ``q - z`` may not fit int8, dequantize without the zero points,
    ``codes * s`` (:meth:`symmetric`), with :attr:`offset` holding ``c * s``:
    ``x @ W = x @ symmetric - rowsum(x) * offset``. ``flatten`` stores a
    convolution kernel as ``(out, in * kh * kw)`` (before ``transpose``), the patches-times-weights form.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        q: UniformQuantizer,
        where: str,
        transpose: bool,
        flatten: bool = False,
        symmetric: bool = False,
        weight_type: str = "int8",
    ) -> None:
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
        shape = (-1,) + (1,) * (codes.ndim - 1)
        centred = codes - zero_point.long().view(shape)
        container_bits = 4 if self.bits <= 4 else 8  # INT4 (packed by the export) or int8
        limit = 2 ** (container_bits - 1)
        dtype = torch.int8
        if symmetric:
            shift = _container_shift(centred.reshape(channels, -1), container_bits)
            stored, zp = centred + shift.view(shape), shift
        elif self.bits == 8 and weight_type == "uint8":  # exact on CPUs without VNNI (WEIGHT_TYPES)
            stored, zp, dtype = codes, zero_point.long(), torch.uint8
        elif -limit <= centred.min() and centred.max() < limit:
            stored, zp = centred, torch.zeros_like(zero_point.long())
        else:
            half = 2 ** (self.bits - 1)
            stored, zp = codes - half, zero_point.long() - half
        self.axis = 1 if transpose else 0
        stored = stored.reshape(channels, -1) if flatten else stored  # a kernel as one row per output
        stored = stored.t() if transpose else stored
        self.register_buffer("codes", stored.to(dtype).contiguous())
        self.register_buffer("scale", q.scale.detach().float().reshape(-1).expand(channels).clone())
        self.register_buffer("zero_point", zp.to(dtype))
        self.register_buffer("offset", (zp.double() * self.scale.double()).float())
        self.symmetric_storage = symmetric

    @property
    def needs_vnni(self) -> bool:
        """8-bit codes in int8: exact in uint8 x int8 kernels only on CPUs with VNNI (``WEIGHT_TYPES``)."""
        return self.bits == 8 and self.codes.dtype == torch.int8

    @property
    def shift_in_graph(self) -> bool:
        """Shifted OpenVINO codes that the exported graph centres itself, by an int8 ``Sub`` before
        ``DequantizeLinear`` (``onnx_export``): a product without row sums."""
        return self.symmetric_storage and self.bits <= 4

    @property
    def has_zero_points(self) -> bool:
        return bool(self.zero_point.any())

    @property
    def dtype(self) -> torch.dtype:
        """The dequantized weight's dtype: ``transformers`` models read ``weight.dtype`` of their
        patch embedding to cast the images."""
        return self.scale.dtype

    def forward(self) -> torch.Tensor:
        if not self.has_zero_points:
            # no zero-point input at all: OpenVINO took even an all-zero one for weights with zero
            # points and ran the Linear on float kernels (centred W8/A8 DeiT-Tiny: 1.4x FP32, not 2x)
            return self.symmetric()
        return dequantize_weight(self.codes, self.scale, self.zero_point, self.axis)

    def symmetric(self) -> torch.Tensor:
        """``codes * s``: the weights plus ``offset`` per output channel."""
        return dequantize_weight(self.codes, self.scale, None, self.axis)

    def dequantize64(self) -> torch.Tensor:
        """``(codes - z) * s`` in float64."""
        shape = [1] * self.codes.ndim
        shape[self.axis] = -1
        return (self.codes.double() - self.zero_point.double().view(shape)) * self.scale.double().view(shape)


def _container_shift(centred: torch.Tensor, container_bits: int) -> torch.Tensor:
    """Per row, the smallest shift ``c`` with ``centred + c`` inside the signed container."""
    limit = 2 ** (container_bits - 1)
    low, high = centred.min(1).values, centred.max(1).values
    zeros = torch.zeros_like(low)
    return torch.where(low < -limit, -limit - low, torch.minimum(zeros, limit - 1 - high))


def symmetric_weights(weight: WeightCodes) -> bool:
    """Weights stored for OpenVINO with a per-channel shift whose share the product subtracts through
    the input's row sums (8-bit codes: the graph cannot centre them in int8)."""
    return weight.symmetric_storage and weight.has_zero_points and not weight.shift_in_graph


def _weight_quantizer(module: nn.Module, where: str) -> UniformQuantizer:
    q = quantized_weight(module)
    if q is None:
        raise ExportError(f"{where}: the weight is not quantized; export needs integer weights")
    return q


class DeployLinear(nn.Module):
    """``x_q @ W_q^T + b'`` with int8 weight codes stored transposed (``(in, out)``, DequantizeLinear
    on axis 1) so that the integer MatMul sees them directly, and the input offset in ``b'``.

    For onnxruntime, with an input quantized to :data:`INTEGER_BIAS_MIN_BITS` bits or more, the
    bias goes into the integer product as int32 codes in its units ``s_x s_w`` (:attr:`bias_codes`,
    ``round(b' / (s_x s_w))``, as integer kernels add a bias) and the product is a ``Gemm`` of the
    rows ``(-1, in)``: onnxruntime runs it as one ``QGemm``, bias included, where a ``MatMul`` left
    a float ``Add`` over the output (DeiT-Tiny's W8/A8 export ran about a tenth faster,
    docs/export.md). The rounding moves each output by at most half a unit ``s_x s_w / 2``
    (:meth:`bias_rounding`): with 8-bit inputs about as often as float rounding moves a prediction;
    a 4-bit activation network amplifies any change above float rounding (docs/export.md, "Agreement
    with the simulation"), and there it moved the next layers' 4-bit codes (DeiT-Tiny's W4/A4 export
    lost about a point against its simulation, with a unit 16 times finer too), so Linear layers with
    inputs below 8 bits keep the float bias, and so does a bias whose codes would not fit. Those
    export as onnxruntime's ``com.microsoft`` ``MatMulIntegerToFloat`` of the input's codes and the
    weight codes with the float bias (:attr:`contrib_product`): one integer kernel with the bias
    inside and the float form's function, where the QDQ form of a ``MatMul`` and an ``Add`` left a
    float ``Add`` over the output (onnxruntime fuses a float bias only with run-time scales).

    In float64 (``dtype``) the product is ``integer_matmul`` of the input's uint8 codes and the
    weight codes, scaled by ``s_x * s_w`` per output channel.
    """

    def __init__(
        self,
        layer: QuantLinear,
        where: str,
        dtype: torch.dtype = torch.float32,
        target: str = "onnxruntime",
        weight_type: str = "int8",
    ) -> None:
        super().__init__()
        wq = _weight_quantizer(layer, where)
        self.input_qdq = optional_qdq(layer.input_quantizer, where)
        symmetric = symmetric_target(target, dtype)
        self.weight = WeightCodes(
            layer.weight, wq, where, transpose=True, symmetric=symmetric, weight_type=weight_type
        )
        bias = _float64_bias(layer.bias, layer.out_features)
        if layer.input_offset is not None:  # with the quantized weights, in float64
            bias += layer.input_offset.detach().double() @ self.weight.dequantize64()
        self.float64 = dtype == torch.float64
        self.register_buffer("bias", bias.to(dtype))
        if self.float64:
            self.register_buffer("product_scale", _product_scale(self.input_qdq, self.weight.scale))
        integer_input = not self.float64 and not symmetric and isinstance(self.input_qdq, ActivationQDQ)
        codes = None
        if integer_input and self.input_qdq.bits >= INTEGER_BIAS_MIN_BITS:
            codes = _bias_codes(bias, _product_scale(self.input_qdq, self.weight.scale))
        self.register_buffer("bias_codes", codes)
        self.contrib_product = integer_input and codes is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float64:
            return _linear64(x, self.input_qdq, self.weight, self.product_scale) + self.bias
        if self.bias_codes is not None:
            return bias_gemm(x, *self._integer_operands(), self.bias_codes, self.bias_unit)
        if self.contrib_product:
            return integer_linear(x, *self._integer_operands(), self.bias)
        x = self.input_qdq(x)
        if not (symmetric_weights(self.weight) and isinstance(self.input_qdq, ActivationQDQ)):
            return torch.matmul(x, self.weight()) + self.bias
        # symmetric weights (OpenVINO's integer kernels need them) and the zero points' share
        # from the input's row sums: x @ ((q - c) s) = x @ (q s) - rowsum(x) (c s)
        product = torch.matmul(x, self.weight.symmetric()) - _row_sums(x) * self.weight.offset
        return product + self.bias  # the bias last: onnxruntime fuses it into BiasGelu

    def _integer_operands(self) -> tuple:
        """The input's quantization and the weight codes, as the integer products take them:
        ``(s_x, z_x, bits, W codes, s_w, z_w)``."""
        q, w = self.input_qdq, self.weight
        return q.scale, q.zero_point, q.bits, w.codes, w.scale, w.zero_point

    @property
    def bias_unit(self) -> torch.Tensor:
        """``s_x s_w`` per output channel: the unit of the integer product and of :attr:`bias_codes`."""
        return self.weight.scale * self.input_qdq.scale

    def bias_rounding(self) -> torch.Tensor:
        """What the int32 bias adds to each output channel against the float bias ``b'`` (zeros in
        the float form): at most half the product's unit ``s_x s_w``."""
        if self.bias_codes is None:
            return torch.zeros_like(self.bias)
        return (self.bias_codes.double() * self.bias_unit.double() - self.bias.double()).to(self.bias.dtype)

    def scale_rows(self, rows: slice, factor: float) -> None:
        """Multiply output channels ``rows`` by ``factor`` (their weight scales, offsets and bias;
        the codes stay)."""
        for values in (self.weight.scale, self.weight.offset, self.bias):  # and so the bias unit
            values[rows] *= factor


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(-1, keepdim=True)`` as a product with a column of int8 ones (dequantized, scale 1).
    OpenVINO lowered the ``ReduceSum`` of a Linear's quantized input to the input's integer type,
    where the sum wrapped (the real Swin-Tiny at W4/A4 fell to 16 % top-1); a MatMul does not. With
    int8 ones it runs on the integer kernels, summing the input's codes in int32 (with float ones it
    was a float GEMV on a converted copy of the input: 17 % slower for a W8/A8 DeiT-Tiny). (The
    products of two activations keep ``ReduceSum``: measured right on both shared models.) The column
    is a constant of the graph: built from the traced ``x.shape`` (``Shape -> ConstantOfShape``),
    OpenVINO ran the product as a float MatMul in Swin's shifted-window blocks."""
    ones = torch.ones(int(x.shape[-1]), 1, dtype=torch.int8)
    return x @ dequantize_weight(ones, torch.ones(1, dtype=x.dtype), None, 1)


INTEGER_BIAS_MIN_BITS = 8  # input bits from which a Linear's bias joins its integer product
BIAS_CODE_LIMIT = 2**30  # |int32 bias codes|: room left in int32 for the sum of code products


def _bias_codes(bias: torch.Tensor, unit: torch.Tensor) -> torch.Tensor | None:
    """``round(b / unit)`` per output channel as int32, or None where a unit is not positive or a
    code would pass :data:`BIAS_CODE_LIMIT` (a near-zero weight row): that layer keeps its float bias."""
    if not bool((unit > 0).all()):
        return None
    codes = torch.round(bias.double() / unit.double())
    if float(codes.abs().max()) > BIAS_CODE_LIMIT:
        return None
    return codes.to(torch.int32)


def _float64_bias(bias: torch.Tensor | None, features: int) -> torch.Tensor:
    """A layer's bias in float64, zeros when it has none."""
    out = torch.zeros(features, dtype=torch.float64)
    return out if bias is None else out + bias.detach().double()


def _product_scale(input_qdq: nn.Module, weight_scale: torch.Tensor) -> torch.Tensor:
    """``s_x * s_w`` per output channel in float64 (the integer product's scale)."""
    s_x = input_qdq.scale if isinstance(input_qdq, ActivationQDQ) else 1.0
    return weight_scale.double() * s_x


def _linear64(
    x: torch.Tensor, input_qdq: nn.Module, weight: WeightCodes, scale: torch.Tensor
) -> torch.Tensor:
    """``x @ W`` in float64: an integer product of codes, or float64 on a float input."""
    if isinstance(input_qdq, ActivationQDQ):
        return integer_matmul(input_qdq.codes(x), weight.codes, input_qdq.zero_code, weight.zero_point, scale)
    return x @ weight.dequantize64()


def _patch_size(layer: QuantConv2d, where: str) -> tuple[int, int]:
    """The patch of a non-overlapping convolution (kernel = stride, no padding); else an ExportError."""
    patch = tuple(layer.kernel_size)
    padded = layer.padding not in (0, "valid") and any(layer.padding)
    if tuple(layer.stride) != patch or padded or layer.groups != 1 or any(d != 1 for d in layer.dilation):
        raise ExportError(
            f"{where}: the float64 export runs only non-overlapping convolutions (kernel = stride, "
            "no padding, dilation 1, groups 1), as in ViT patch embeddings; export in float32"
        )
    return patch


class DeployConv2d(nn.Module):
    """Convolution of the Q/DQ input with int8 weight codes (patch embedding).

    In float64 (``dtype``; onnxruntime has no float64 ``Conv``, and ``ConvInteger`` takes only one
    weight zero point) a non-overlapping convolution (kernel = stride, no padding), which is what
    every ViT patch embedding is, runs as patches times weights: an ``integer_matmul``.
    """

    def __init__(
        self, layer: QuantConv2d, where: str, dtype: torch.dtype = torch.float32, weight_type: str = "int8"
    ) -> None:
        super().__init__()
        wq = _weight_quantizer(layer, where)
        self.input_qdq = optional_qdq(layer.input_quantizer, where)
        self.float64 = dtype == torch.float64
        if self.float64:
            self.patch = _patch_size(layer, where)
        # float64: codes as (in * kh * kw, out), the weights of the patches-times-weights product
        self.weight = WeightCodes(
            layer.weight, wq, where, transpose=self.float64, flatten=self.float64, weight_type=weight_type
        )
        self.stride, self.padding, self.dilation, self.groups = (
            layer.stride, layer.padding, layer.dilation, layer.groups,
        )  # fmt: skip
        if self.float64:
            self.register_buffer("bias", _float64_bias(layer.bias, layer.out_channels))
            self.register_buffer("product_scale", _product_scale(self.input_qdq, self.weight.scale))
        else:
            self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float64:
            return self._patch_matmul(x)
        x = self.input_qdq(x)
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _patch_matmul(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        ph, pw = self.patch
        rows, cols = h // ph, w // pw
        x = x[:, :, : rows * ph, : cols * pw]  # a convolution drops the incomplete border too
        patches = x.reshape(n, c, rows, ph, cols, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, rows * cols, -1)
        out = _linear64(patches, self.input_qdq, self.weight, self.product_scale) + self.bias
        return out.reshape(n, rows, cols, -1).permute(0, 3, 1, 2)
