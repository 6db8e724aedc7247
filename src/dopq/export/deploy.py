"""The deploy form of a quantized model: integer weights, per-tensor activation Q/DQ, post-Softmax
codes counted against the quantizer's own decision points. It is built from the quantizers' own API
(``codes``, ``dequantize``, ``level_table``, ``decision_points``, the warp parameters) and computes
in torch what the exported ONNX graph computes.

:func:`to_deploy` swaps, in a copy, every ``QuantLinear`` / ``QuantConv2d`` / ``QuantMatMul`` for a
deploy module; everything else (LayerNorm, Softmax, GELU, residual adds, position embeddings and
Swin's relative position bias) stays float. The post-LayerNorm input offset (``ln_shift=input``,
per-channel integer zero points) is folded into the bias with the *quantized* weights, so every
activation stays per tensor: ``(x + o) W^T + b = x W^T + (W o + b)``.

``dtype=torch.float64`` builds the float64 form: the float parts (LayerNorm, Softmax, residual
adds, scales) run in float64, activations are quantized to uint8 codes by float64 ops and every
quantized product is an ``integer_matmul`` (``MatMulInteger``, exact int32 sums). Float32 rounding
differences are far too small to move any float64 value across a rounding boundary, so this form
computes the simulation's codes in any runtime and on any thread count (docs/export.md). This
torch form computes GELU in float64, as the simulation does; onnxruntime has no float64 ``erf``, so
the export rewrites the graph's GELU into nodes that give the same codes
(:mod:`dopq.export.float64_gelu`). One step of the exported graph stays float32: the post-Softmax
code rule above ``EXACT_LEVELS_MAX_BITS``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dopq.config import RUNTIMES, WEIGHT_TYPES
from dopq.errors import ExportError
from dopq.export.runtime import saturating_cpu
from dopq.export.symbolic import (
    bias_gemm,
    counted_levels,
    dequantize_weight,
    indexed_levels,
    int8_shift,
    integer_linear,
    integer_matmul,
    log_levels,
    qdq,
    quantize_codes,
    symmetric_qdq,
    tan_levels,
    threshold_levels,
)
from dopq.modules import (
    Float64Model,
    QuantConv2d,
    QuantLinear,
    QuantMatMul,
    quantized_weight,
    quantizers_of,
    replace_module,
)
from dopq.quantizers import LevelQuantizer, LogQuantizer, Quantizer, TanQQuantizer, UniformQuantizer
from dopq.quantizers.levels import snapped_in

__all__ = [
    "TARGETS",
    "WEIGHT_TYPES",
    "ActivationQDQ",
    "DeployConv2d",
    "DeployLinear",
    "DeployMatMul",
    "SoftmaxLevels",
    "WeightCodes",
    "check_quantized",
    "default_weight_type",
    "to_deploy",
]


def check_quantized(model: nn.Module) -> None:
    """Refuse a model without calibrated quantizers (a float model, or one still to calibrate)."""
    quantizers = list(quantizers_of(model))
    if not quantizers:
        raise ExportError(
            "the model has no quantizers: quantize it first (dopq.quantize / dopq quantize --save)"
        )
    missing = [name for name, q in quantizers if not q.is_ready()]
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
        self.clip_codes = False  # below 8 bits, clip the uint8 codes instead of the float input
        q = _per_tensor(q, where)
        self.bits, self.scale, zero_point = q.bits, float(q.scale), float(q.zero_point)
        lo, hi = q.code_range
        if not self.scale > 0:  # a grid mirrored through 0: runtimes compute it differently
            raise ExportError(f"{where}: step size {self.scale:g} is not positive")
        if zero_point != round(zero_point):
            raise ExportError(
                f"{where}: zero point {zero_point:g} is not an integer code in [{lo}, {hi}]; "
                "integer kernels need one (use --integer-zero-point on, as the dopq recipe does)"
            )
        if not lo <= zero_point <= hi:  # a range that leaves out 0: 0.0 is no level of it
            raise ExportError(
                f"{where}: zero point {zero_point:g} lies outside the codes [{lo}, {hi}]; "
                "integer kernels need a range that holds 0"
            )
        self.zero_point = int(zero_point)
        self.register_buffer("zero_code", torch.tensor(self.zero_point, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qdq(x, self.scale, self.zero_point, self.bits, self.clip_codes)

    def symmetric(self, x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, float]:
        """``x``'s Q/DQ with zero point 0 and the offset it adds to every value: its codes as they
        are, ``q`` in uint8 (offset ``z s``), or ``signed``, ``q - z + c`` in int8 with the smallest
        shift ``c`` that fits (offset ``c s``; 0 up to 7 bits). A product of two activations runs on
        OpenVINO's integer kernels only in this form; the product removes the offsets' share."""
        if not self.zero_point:
            return self(x), 0.0
        shift = int8_shift(self.zero_point, self.bits) if signed else self.zero_point
        return symmetric_qdq(x, self.scale, self.zero_point, self.bits, shift, signed), shift * self.scale

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 codes of a float64 ``x`` (the float64 form's integer operands)."""
        return quantize_codes(x, self.scale, self.zero_point, self.bits)

    def fake_quantize64(self, x: torch.Tensor) -> torch.Tensor:
        """``(codes - z) * s`` in float64, for a product without an integer kernel."""
        return (self.codes(x).double() - self.zero_point) * self.scale


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


TARGETS = RUNTIMES  # the runtimes a float32 graph can be shaped for


def _symmetric(target: str, dtype: torch.dtype) -> bool:
    """Operands without zero points: OpenVINO's float32 form (the float64 form has its own products)."""
    return target == "openvino" and dtype == torch.float32


def symmetric_weights(weight: WeightCodes) -> bool:
    """Weights stored for OpenVINO with a per-channel shift whose share the product subtracts through
    the input's row sums (8-bit codes: the graph cannot centre them in int8)."""
    return weight.symmetric_storage and weight.has_zero_points and not weight.shift_in_graph


def _optional_qdq(q: nn.Module, where: str) -> nn.Module:
    if isinstance(q, Quantizer) and q.enabled:
        return ActivationQDQ(q, where)
    return nn.Identity()


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
        self.input_qdq = _optional_qdq(layer.input_quantizer, where)
        symmetric = _symmetric(target, dtype)
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
    products of two activations keep ``ReduceSum``: measured right on both shared models.)"""
    ones = torch.ones(x.shape[-1], 1, dtype=torch.int8)
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
        self.input_qdq = _optional_qdq(layer.input_quantizer, where)
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


class SoftmaxLevels(nn.Module):
    """The deploy form of a post-Softmax table quantizer: the level value of each element.

    Where the quantizer's thresholds sit on a grid (:meth:`LevelQuantizer.code_grid`, TanQ's
    default), the level of each element is read from the level of its grid cell: three passes over
    the map (``indexed_levels``; for OpenVINO above 4 bits, :func:`_reads_cell_table`). Otherwise, up
    to ``COUNTED_LEVELS_MAX_BITS`` its code is counted against the quantizer's own float32
    decision points (:meth:`LevelQuantizer.decision_points`: the simulation's codes for every
    float32 input, with no transcendental op) and the level read from the table; larger tables use
    the family's closed form (TanQ, log2, log-sqrt2) or a comparison per threshold. In float64
    (:meth:`exact`) the level comes from comparisons with the table's own thresholds.
    """

    def __init__(self, q: LevelQuantizer, target: str = "onnxruntime") -> None:
        super().__init__()
        q = q.resolve()  # a per-module choice ("auto") exports as the family it chose
        levels, thresholds = (t.detach() for t in q.level_table())
        code_grid = q.code_grid()
        if code_grid is not None:  # float64 values just below a grid point stay below it
            thresholds = snapped_in(thresholds, torch.float64)
        self.table = (levels.double().tolist(), thresholds.double().tolist())
        grid = code_grid if _reads_cell_table(target, q.bits) else None
        if grid is not None:
            cell_levels = q.lookup_table().float().cpu()[grid[1].cpu()]
            self.register_buffer("levels", cell_levels.clone())
            self.kind, self.args = "indexed", (grid[0],)
        elif len(thresholds) < 2**COUNTED_LEVELS_MAX_BITS:
            self.register_buffer("levels", q.lookup_table().float().clone())
            self.kind, self.args = "counted", (q.decision_points().double().tolist(),)
        elif isinstance(q, TanQQuantizer):
            self.kind, self.args = "tanq", (*q.warp_params(), q.bits)
        elif isinstance(q, LogQuantizer):
            self.kind, self.args = "log", (float(q.delta), q.step, q.n_nonzero)
        else:
            self.kind, self.args = "table", self.table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "indexed":
            return indexed_levels(x, self.levels.to(x.dtype), *self.args)
        if self.kind == "counted":
            return counted_levels(x, self.levels.to(x.dtype), *self.args)
        if self.kind == "tanq":
            return tan_levels(x, *self.args)
        if self.kind == "log":
            return log_levels(x, *self.args)
        return threshold_levels(x, *self.args)

    @property
    def has_exact_form(self) -> bool:
        """Few enough thresholds for :meth:`exact` (one pass each)."""
        return len(self.table[1]) < 2**EXACT_LEVELS_MAX_BITS

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        """The table's level of each element of a float64 ``x``, by comparing it with every
        threshold in float64 (``Greater -> Cast -> Mul -> Add`` per threshold): no rounding decides
        a level, so it is the simulation's."""
        levels, thresholds = self.table
        out = torch.full_like(x, levels[0])
        for threshold, low, high in zip(thresholds, levels, levels[1:], strict=False):
            out = out + (x > threshold).to(x.dtype) * (high - low)
        return out


EXACT_LEVELS_MAX_BITS = 6  # float64 post-Softmax levels by comparisons: 2^b - 1 passes
COUNTED_LEVELS_MAX_BITS = 6  # float32: codes counted, 2^b - 1 comparisons (fused by OpenVINO)
# OpenVINO fuses the counted comparisons into one kernel, as fast as the cell-table read up to 4 bits
# (15 comparisons) and slower above (one DeiT-Tiny map, softmax_forms_xeon_b6 / _b7: 47.0 against
# 25.5 ms at 6 bits; at 7 bits, whose 127 thresholds had been the Tan/Atan closed form, 110.7 ms)
OPENVINO_COUNTED_MAX_BITS = 4


def _reads_cell_table(target: str, bits: int) -> bool:
    """Whether a post-Softmax quantizer with thresholds on a grid exports as the cell-table read
    (``indexed_levels``): always for onnxruntime, which runs each comparison as a pass of its own;
    for OpenVINO above ``OPENVINO_COUNTED_MAX_BITS``."""
    return target == "onnxruntime" or bits > OPENVINO_COUNTED_MAX_BITS


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
    In float64 (``dtype``) products of codes are ``integer_matmul``; post-Softmax levels up to
    ``EXACT_LEVELS_MAX_BITS`` come from comparisons with the table's thresholds in float64 (exact),
    above that from the float32 code rule (onnxruntime has no float64 ``Tan`` / ``Atan``).
    """

    def __init__(
        self,
        layer: QuantMatMul,
        where: str,
        integer_levels: bool,
        dtype: torch.dtype = torch.float32,
        target: str = "onnxruntime",
    ) -> None:
        super().__init__()
        self.symmetric = _symmetric(target, dtype)
        qa = layer.quantizer_a
        self.levels: SoftmaxLevels | None = None
        self.level_scale = 0.0
        self.float64 = dtype == torch.float64
        if isinstance(qa, LevelQuantizer) and qa.enabled:
            self.levels = SoftmaxLevels(qa, target)
            if integer_levels:
                self.level_scale = _fixed_point_scale(qa.lookup_table())
            self.qdq_a: nn.Module = nn.Identity()
        else:
            self.qdq_a = _optional_qdq(qa, f"{where} (left operand)")
        self.qdq_b = _optional_qdq(layer.quantizer_b, f"{where} (right operand)")
        self.register_buffer("zero", torch.tensor(0, dtype=torch.uint8))
        # OpenVINO runs attn @ v over float levels as a float MatMul whatever form v takes, and it ran
        # v's pair without zero point as a stand-alone FakeQuantize, whose float32 rounding of
        # x / s + 128 moved codes within ~1e-5 of a boundary and put values ~1e-5 off the grid:
        # below 8 bits, v keeps its uint8 codes with their zero point, clipped on the codes (no
        # FakeQuantize there), as in the onnxruntime form (docs/export.md, "Rounding in OpenVINO")
        self.float_levels_product = (
            self.symmetric
            and self.levels is not None
            and not self.level_scale
            and isinstance(self.qdq_b, ActivationQDQ)
            and self.qdq_b.bits < 8
        )
        if self.float_levels_product:
            self.qdq_b.clip_codes = True

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.float64:
            return self._forward64(a, b)
        if self.levels is not None:
            a = self.levels(a)
            if self.level_scale:
                a = qdq(a, self.level_scale, 0, 8)
        if self.symmetric and not self.float_levels_product:
            return _symmetric_product(self.qdq_a, a, self.qdq_b, b)
        return self.qdq_a(a) @ self.qdq_b(b)

    def _forward64(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.levels is not None:
            a = self.levels.exact(a) if self.levels.has_exact_form else self.levels(a.float()).double()
            if self.level_scale:
                codes = quantize_codes(a, self.level_scale, 0, 8)
                return self._integer_product(codes, self.zero, self.level_scale, b)
            return a @ _fake_quantize64(self.qdq_b, b)
        if isinstance(self.qdq_a, ActivationQDQ):
            return self._integer_product(self.qdq_a.codes(a), self.qdq_a.zero_code, self.qdq_a.scale, b)
        return a @ _fake_quantize64(self.qdq_b, b)

    def _integer_product(
        self, a_codes: torch.Tensor, a_zero: torch.Tensor, a_scale: float, b: torch.Tensor
    ) -> torch.Tensor:
        if not isinstance(self.qdq_b, ActivationQDQ):
            return ((a_codes.double() - a_zero.double()) * a_scale) @ b
        scale = torch.tensor(a_scale * self.qdq_b.scale, dtype=torch.float64)
        return integer_matmul(a_codes, self.qdq_b.codes(b), a_zero, self.qdq_b.zero_code, scale)


def _symmetric_product(qdq_a: nn.Module, a: torch.Tensor, qdq_b: nn.Module, b: torch.Tensor) -> torch.Tensor:
    """``qdq_a(a) @ qdq_b(b)`` from operands without zero points, as OpenVINO's integer MatMul of two
    activations needs them: the right one's codes in int8, the left one's in int8 where its centred
    codes fit (below 8 bits, or a grid centred on 0), else in uint8. With ``a' = a + alpha`` and
    ``b' = b + beta`` (their offsets), ``a @ b = a' @ b' - alpha colsum(b') - beta rowsum(a' - alpha)``;
    with no offset at all OpenVINO fuses the attention's products and Softmax into one kernel."""
    alpha = beta = 0.0
    if isinstance(qdq_a, ActivationQDQ):
        a, alpha = qdq_a.symmetric(a, signed=int8_shift(qdq_a.zero_point, qdq_a.bits) == 0)
    else:
        a = qdq_a(a)
    if isinstance(qdq_b, ActivationQDQ):
        b, beta = qdq_b.symmetric(b, signed=True)
    out = a @ b
    if alpha:
        out = out - b.sum(-2, keepdim=True) * alpha
    if beta:
        out = out - (a - alpha if alpha else a).sum(-1, keepdim=True) * beta
    return out


def _fake_quantize64(qdq_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return qdq_module.fake_quantize64(x) if isinstance(qdq_module, ActivationQDQ) else x


def _clip_codes_after_quantizing(deploy: nn.Module) -> None:
    """Below 8 bits, every activation's b-bit range is clipped on its uint8 codes (onnxruntime,
    whose fusions take them: one DeiT-Tiny W4/A4 export ran about a tenth faster); OpenVINO keeps
    the float ``Clip`` before its quantization."""
    for module in deploy.modules():
        if isinstance(module, ActivationQDQ):
            module.clip_codes = True


class ExplicitRmsNorm(nn.Module):
    """RMS normalization in elementary ops: the TorchScript exporter has no ``aten::rms_norm`` below
    ONNX opset 23. In float64, torch's own order, ``x * rsqrt(mean(x^2) + eps) * weight`` (the float64
    file stays the float64 simulation exactly); in float32 the weight first, ``(x * weight) * rsqrt(...)``:
    OpenVINO fuses torch's order into its RMS op, which, where a mean over the tokens and a quantizer
    follow (AIMv2's pooled head), moved a tiny AIMv2's W8/A8 logits by a few hundredths of their
    spread (a session-38 probe)."""

    def __init__(self, norm: nn.Module, weight_first: bool) -> None:
        super().__init__()
        shape = norm.normalized_shape
        self.dims = tuple(range(-(len(shape) if isinstance(shape, tuple | list) else 1), 0))
        self.eps = norm.eps
        self.weight = getattr(norm, "weight", None)
        self.weight_first = weight_first and self.weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        inverse_rms = torch.rsqrt(x.pow(2).mean(self.dims, keepdim=True) + eps)
        if self.weight_first:
            return (x * self.weight) * inverse_rms
        y = x * inverse_rms
        return y if self.weight is None else y * self.weight


def _rms_norm_classes() -> tuple[type[nn.Module], ...]:
    """Norm classes whose forward is ``F.rms_norm`` (timm's ``RmsNorm``, torch's ``RMSNorm``)."""
    import timm.layers

    return tuple(c for c in (getattr(timm.layers, "RmsNorm", None), getattr(nn, "RMSNorm", None)) if c)


def _traceable(deploy: nn.Module, dtype: torch.dtype) -> None:
    """Float modules the exporter cannot trace as they are, rewritten to the same function: RMS norms
    in elementary ops, and timm attention left float (``--allow-partial``) on its explicit path
    (its fused ``scaled_dot_product_attention`` call does not trace)."""
    rms = _rms_norm_classes()
    for name, module in list(deploy.named_modules()):
        if type(module) in rms:
            replace_module(deploy, name, ExplicitRmsNorm(module, weight_first=dtype == torch.float32))
        elif getattr(module, "fused_attn", False) is True:
            module.fused_attn = False


def default_weight_type(dtype: torch.dtype = torch.float32, target: str = "onnxruntime") -> str:
    """The container of 8-bit weight codes when none is asked for: uint8 in float64 (whose
    ``MatMulInteger`` products must be exact everywhere) and, for onnxruntime, on a CPU whose uint8 x
    int8 sums saturate (:func:`~dopq.export.runtime.saturating_cpu`: there uint8 is exact and the
    faster form); else int8, the fast exact form on VNNI / AMX CPUs and the only one OpenVINO takes."""
    if dtype == torch.float64:
        return "uint8"
    return "uint8" if target == "onnxruntime" and saturating_cpu() is not None else "int8"


@torch.no_grad()
def to_deploy(
    model: nn.Module,
    integer_levels: bool = False,
    dtype: torch.dtype = torch.float32,
    target: str = "onnxruntime",
    weight_type: str | None = None,
) -> nn.Module:
    """A CPU copy of a quantized model in deploy form (the model itself is not changed).

    Args:
        model: a model returned by :func:`dopq.quantize` (or loaded with ``load_quantized``).
        integer_levels: round post-Softmax levels to 8-bit fixed point for an integer ``attn @ v``.
        dtype: ``torch.float32`` (QDQ, onnxruntime's fused integer kernels, the fast form) or
            ``torch.float64`` (the float parts in float64: the simulation's codes on any runtime).
        target: the runtime whose integer kernels the float32 form is shaped for (``TARGETS``):
            ``onnxruntime`` (weights with zero points) or ``openvino`` (every integer operand
            without zero points, their share subtracted from row sums). The same codes either way.
        weight_type: the container of 8-bit weight codes for onnxruntime (:data:`WEIGHT_TYPES`):
            ``int8`` (fast; exact on CPUs with VNNI) or ``uint8`` (exact on every CPU). None:
            :func:`default_weight_type`. OpenVINO's kernels take int8 weights only.
    """
    check_quantized(model)
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}: use one of {', '.join(TARGETS)}")
    if dtype not in (torch.float32, torch.float64):
        raise ExportError(f"the deploy form is float32 or float64, not {dtype}")
    weight_type = weight_type or default_weight_type(dtype, target)
    if weight_type not in WEIGHT_TYPES:
        raise ExportError(f"unknown weight type {weight_type!r}: use one of {', '.join(WEIGHT_TYPES)}")
    if weight_type == "uint8" and _symmetric(target, dtype):
        raise ExportError("OpenVINO's integer kernels take int8 weights: drop --export-weight-type uint8")
    deploy = copy.deepcopy(model).cpu().eval()
    _traceable(deploy, dtype)
    for name, module in list(deploy.named_modules()):
        if isinstance(module, QuantLinear):
            replace_module(deploy, name, DeployLinear(module, name, dtype, target, weight_type))
        elif isinstance(module, QuantConv2d):
            replace_module(deploy, name, DeployConv2d(module, name, dtype, weight_type))
        elif isinstance(module, QuantMatMul):
            replace_module(deploy, name, DeployMatMul(module, name, integer_levels, dtype, target))
    if dtype == torch.float32:
        if target == "onnxruntime":
            _clip_codes_after_quantizing(deploy)
        return deploy
    return Float64Model(deploy.to(torch.float64))  # float buffers to float64; codes stay integer
