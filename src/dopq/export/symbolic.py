"""Quantization steps as autograd Functions whose ONNX ``symbolic`` is the integer-friendly form.

Each ``forward`` computes in torch exactly what the ONNX ops compute (so a deploy model can be
checked against the simulation without onnxruntime); each ``symbolic`` emits standard ONNX ops
(``integer_linear`` adds onnxruntime's ``com.microsoft`` ``MatMulIntegerToFloat``):

* ``qdq``: ``[Clip] -> QuantizeLinear -> DequantizeLinear`` with a uint8 container. Below 8 bits the
  float ``Clip`` to ``[(0 - z) s, (2^b - 1 - z) s]`` keeps the codes inside the b-bit range, so the
  exported codes equal the simulated ``clamp(round(x / s) + z, 0, 2^b - 1)``; for onnxruntime
  (``clip_codes``) the uint8 codes are clipped to ``[0, 2^b - 1]`` after the ``QuantizeLinear``
  instead: the same codes from a pass over a quarter of the bytes.
* ``dequantize_weight``: ``DequantizeLinear`` of a constant integer initializer, per output channel.
* ``counted_levels``: the level value of a post-Softmax (table) quantizer, its code counted as the
  number of the quantizer's own decision points strictly below ``x`` (``Greater -> Cast -> Add`` per
  point, no transcendental op; a runtime that fuses elementwise chains, as OpenVINO does, runs it
  as one pass), then one ``Gather`` of the level table. The codes are the simulation's for every
  float32 input, by construction (``LevelQuantizer.decision_points``).
* ``indexed_levels``: the level value of a post-Softmax quantizer whose thresholds sit on a
  ``2^-G`` grid (``LevelQuantizer.code_grid``): the element's grid cell ``floor(x * 2^G)`` (``Mul``
  by a power of two, exact, then ``Cast`` to int32, which truncates) reads the level from one table
  (``GatherElements`` over the flattened map: onnxruntime runs it several times faster than ``Gather``).
  Three passes over the map whatever the bit width; the codes are the simulation's for every float32
  ``x`` in ``[0, 1]`` (post-Softmax values).
* ``log_levels`` / ``tan_levels``: the same codes from the families' closed forms (``Log``/``Exp``,
  ``Tan``/``Atan``), for tables too large to count (above ``COUNTED_LEVELS_MAX_BITS``);
  ``threshold_levels``: any table, by a ``Where`` per threshold (float64 reference form).
* ``bias_gemm``: ``Q -> Reshape -> DQ -> Gemm(DQ(W), DQ(int32 bias codes)) -> Reshape``, a Linear
  with its bias inside the integer product (onnxruntime's ``QGemm``, standard ops).
* ``integer_linear``: ``QuantizeLinear -> [Clip]`` (below 8 bits the uint8 codes clipped to the
  b-bit range: the same codes as clipping the float input first, from a pass over a quarter of the
  bytes) and one ``com.microsoft`` ``MatMulIntegerToFloat`` of the codes and the weight codes with
  the float bias: the Linear form onnxruntime's QDQ fusions cannot reach (they fuse a float bias
  only with a scale computed at run time).
* ``symmetric_qdq``: ``[Clip] -> QuantizeLinear -> DequantizeLinear`` whose dequantization has zero
  point 0 (the codes shifted into an int8 or uint8 container): an operand of a product of two
  activations in the form OpenVINO's integer MatMul needs; the caller removes the shift's share.

The float64 form (``to_deploy(..., dtype=torch.float64)``) cannot use ``QuantizeLinear`` /
``DequantizeLinear`` (float32 only in onnxruntime); it uses:

* ``quantize_codes``: ``Div -> Round -> Add -> Clip -> Cast(uint8)``, the simulation's
  ``clamp(round(x / s) + z, 0, 2^b - 1)`` in float64;
* ``integer_matmul``: ``MatMulInteger`` (exact int32 sums of codes minus zero points), then
  ``Cast(float64) -> Mul`` by the product of the two scales.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "CONTRIB_DOMAIN",
    "bias_gemm",
    "counted_levels",
    "dequantize_weight",
    "indexed_levels",
    "int8_shift",
    "integer_linear",
    "integer_matmul",
    "log_levels",
    "qdq",
    "quantize_codes",
    "symmetric_qdq",
    "tan_levels",
    "threshold_levels",
]

_ONNX_FLOAT, _ONNX_UINT8, _ONNX_INT32, _ONNX_INT64, _ONNX_DOUBLE = 1, 2, 6, 7, 11  # onnx.TensorProto types
CONTRIB_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops (OpenVINO's ONNX reader takes this one too)


def _const(g, value: float | int | torch.Tensor, dtype: torch.dtype = torch.float32):
    return g.op("Constant", value_t=torch.as_tensor(value, dtype=dtype))


def _clip_to_codes(g, x, scale: float, zero_point: int, bits: int):
    """``Clip`` of ``x`` to the b-bit code range's values, ``[(0 - z) s, (2^b - 1 - z) s]`` (float32
    bounds, as the runtime holds them), so that a wider container's codes stay b-bit codes."""
    bounds = ((0 - zero_point) * scale, (2**bits - 1 - zero_point) * scale)
    return g.op("Clip", x, *(_const(g, b) for b in bounds))


def _quantize_linear(g, x, scale: float, zero_point: int, bits: int, clip_codes: bool = False):
    """``QuantizeLinear`` to b-bit codes in uint8, with the scale and zero-point constants. Below 8
    bits the b-bit range is clipped on the float input before it (``Clip`` to the range's values)
    or, with ``clip_codes``, on the uint8 codes after it (``Clip`` to ``[0, 2^b - 1]``): the same
    codes, since the container saturates at 0 and 255 first, from a pass over a quarter of the
    bytes. onnxruntime fuses a ``DequantizeLinear`` of clipped codes into its integer kernels as it
    does one of a ``QuantizeLinear``; OpenVINO takes the float ``Clip`` into its quantization."""
    clip = bits < 8
    if clip and not clip_codes:
        x = _clip_to_codes(g, x, scale, zero_point, bits)
    s, z = _const(g, scale), _const(g, zero_point, torch.uint8)
    codes = g.op("QuantizeLinear", x, s, z)
    if clip and clip_codes:
        codes = g.op("Clip", codes, _const(g, 0, torch.uint8), _const(g, 2**bits - 1, torch.uint8))
    return codes, s, z


class _QDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, bits, clip_codes=False):
        codes = torch.round(x / scale)
        if zero_point:  # no "+ 0": the TorchScript tracer's peephole pass would drop it and fail
            return (torch.clamp(codes + zero_point, 0, 2**bits - 1) - zero_point) * scale
        return torch.clamp(codes, 0, 2**bits - 1) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, bits, clip_codes=False):
        codes, s, z = _quantize_linear(g, x, scale, zero_point, bits, clip_codes)
        return g.op("DequantizeLinear", codes, s, z)


def qdq(x: torch.Tensor, scale: float, zero_point: int, bits: int, clip_codes: bool = False) -> torch.Tensor:
    """Per-tensor uniform quantize-dequantize with a uint8 container (``0 <= zero_point < 2^bits``).
    Below 8 bits the graph clips the float input to the b-bit range before ``QuantizeLinear``, or,
    with ``clip_codes`` (onnxruntime), the uint8 codes after it: the same codes either way."""
    return _QDQ.apply(x, scale, zero_point, bits, clip_codes)


def int8_shift(zero_point: int, bits: int) -> int:
    """The smallest ``c`` that puts the centred codes ``q - z + c`` of a b-bit code ``q`` in int8:
    0 up to 7 bits (centred codes fit), ``z - 128`` at 8 bits."""
    low, high = -zero_point, 2**bits - 1 - zero_point
    return -128 - low if low < -128 else min(0, 127 - high)


class _SymmetricQDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, bits, shift, signed):
        centred = torch.clamp(torch.round(x / scale), -zero_point, 2**bits - 1 - zero_point)
        if shift:  # no "+ 0" (see _QDQ)
            centred = centred + shift
        return centred * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, bits, shift, signed):
        low = -128 if signed else 0
        if shift - zero_point != low or 2**bits - 1 - zero_point + shift != low + 255:
            x = _clip_to_codes(g, x, scale, zero_point, bits)
        s, container = _const(g, scale), torch.int8 if signed else torch.uint8
        codes = g.op("QuantizeLinear", x, s, _const(g, shift, container))
        return g.op("DequantizeLinear", codes, s, _const(g, 0, container))


def symmetric_qdq(
    x: torch.Tensor, scale: float, zero_point: int, bits: int, shift: int, signed: bool
) -> torch.Tensor:
    """``(q - z + shift) * s`` for the b-bit codes ``q`` of ``x`` (zero point ``z``): the codes
    ``q - z + shift`` in an int8 (``signed``) or uint8 container, dequantized with zero point 0 (the
    form OpenVINO's integer MatMul of two activations needs); the caller removes ``shift * s``."""
    return _SymmetricQDQ.apply(x, scale, zero_point, bits, shift, signed)


class _DequantizeWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis):
        shape = [1] * codes.ndim
        shape[axis] = -1
        if zero_point is None:
            return codes.float() * scale.view(shape)
        return (codes.float() - zero_point.float().view(shape)) * scale.view(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis):
        if zero_point is None:  # symmetric: OpenVINO's integer kernels need no zero point input
            return g.op("DequantizeLinear", codes, scale, axis_i=axis)
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, axis: int
) -> torch.Tensor:
    """``(codes - z) * s`` with per-``axis`` scale and zero point (None: 0); codes int8/uint8."""
    return _DequantizeWeight.apply(codes, scale, zero_point, axis)


class _BiasGemm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, scale, zero_point, bits, codes, weight_scale, weight_zero_point, bias_codes, bias_unit
    ):
        rows = _QDQ.forward(ctx, x, scale, zero_point, bits).reshape(-1, codes.shape[0])
        weight = _DequantizeWeight.forward(ctx, codes, weight_scale, weight_zero_point, 1)
        out = torch.addmm(bias_codes.double().mul(bias_unit.double()).float(), rows, weight)
        return out.reshape(*x.shape[:-1], codes.shape[1])

    @staticmethod
    def symbolic(
        g, x, scale, zero_point, bits, codes, weight_scale, weight_zero_point, bias_codes, bias_unit
    ):
        q, s, z = _quantize_linear(g, x, scale, zero_point, bits)
        # the leading dimensions from the codes, not from x: a second reader of x would keep
        # onnxruntime from moving the Q above the reshapes before it (attn @ v as QLinearMatMul)
        if g.opset >= 15:
            lead = g.op("Shape", q, end_i=-1)
        else:
            lead = g.op("Slice", g.op("Shape", q), *(_const(g, [v], torch.int64) for v in (0, -1)))
        features_in, features_out = codes.type().sizes()
        rows = g.op("Reshape", q, _const(g, [-1, features_in], torch.int64))
        weight = g.op("DequantizeLinear", codes, weight_scale, weight_zero_point, axis_i=1)
        bias = g.op("DequantizeLinear", bias_codes, bias_unit, axis_i=0)
        out = g.op("Gemm", g.op("DequantizeLinear", rows, s, z), weight, bias)
        return g.op("Reshape", out, g.op("Concat", lead, _const(g, [features_out], torch.int64), axis_i=0))


def bias_gemm(
    x: torch.Tensor,
    scale: float,
    zero_point: int,
    bits: int,
    codes: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor,
    bias_codes: torch.Tensor,
    bias_unit: torch.Tensor,
) -> torch.Tensor:
    """``qdq(x) @ W + b`` over the rows of ``x`` with int32 bias codes in the product's units:
    ``Q -> Reshape (-1, in) -> DQ -> Gemm(DQ(W, z_w), DQ(bias codes, s_x s_w)) -> Reshape``, the
    pattern onnxruntime fuses into one ``QGemm`` (the weights' zero-point input present, even where
    it is zero; W stored ``(in, out)``), back in ``x``'s leading dimensions."""
    return _BiasGemm.apply(
        x, scale, zero_point, bits, codes, weight_scale, weight_zero_point, bias_codes, bias_unit
    )


class _IntegerLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, bits, codes, weight_scale, weight_zero_point, bias):
        weight = _DequantizeWeight.forward(ctx, codes, weight_scale, weight_zero_point, 1)
        return torch.matmul(_QDQ.forward(ctx, x, scale, zero_point, bits), weight) + bias

    @staticmethod
    def symbolic(g, x, scale, zero_point, bits, codes, weight_scale, weight_zero_point, bias):
        q, s, z = _quantize_linear(g, x, scale, zero_point, bits, clip_codes=True)
        out = g.op(
            f"{CONTRIB_DOMAIN}::MatMulIntegerToFloat", q, codes, s, weight_scale, z, weight_zero_point, bias
        )
        # the output's type, which the exporter cannot infer for a contrib op
        sizes = x.type().varyingSizes()
        if sizes is not None:
            out.setType(x.type().with_sizes([*sizes[:-1], codes.type().sizes()[1]]))
        return out


def integer_linear(
    x: torch.Tensor,
    scale: float,
    zero_point: int,
    bits: int,
    codes: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """``qdq(x) @ W + b`` as ``QuantizeLinear -> [Clip] -> MatMulIntegerToFloat(codes, W codes,
    s_x, s_w, z_x, z_w, b)`` (``com.microsoft``): the integer product of the codes, scaled once per
    output channel, with the float bias added by the same kernel (W stored ``(in, out)``)."""
    return _IntegerLinear.apply(x, scale, zero_point, bits, codes, weight_scale, weight_zero_point, bias)


class _LogLevels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, step, n_nonzero):
        e = torch.round(-torch.log2(x / delta) / step).clamp_min(0)
        return torch.where(e < n_nonzero, delta * torch.exp2(-e * step), torch.zeros_like(x))

    @staticmethod
    def symbolic(g, x, delta, step, n_nonzero):
        # e = round(-log2(x / delta) / step): the simulation's own code formula; 0 -> e = inf -> 0
        ln = g.op("Log", g.op("Div", x, _const(g, delta)))
        e = g.op("Round", g.op("Mul", ln, _const(g, -1.0 / (math.log(2.0) * step))))
        e = g.op("Max", e, _const(g, 0.0))
        level = g.op("Mul", g.op("Exp", g.op("Mul", e, _const(g, -step * math.log(2.0)))), _const(g, delta))
        keep = g.op("Less", e, _const(g, float(n_nonzero)))
        return g.op("Where", keep, level, _const(g, 0.0))


def log_levels(x: torch.Tensor, delta: float, step: float, n_nonzero: int) -> torch.Tensor:
    """Level value of log2 / log-sqrt2 quantization (``delta * 2^(-e*step)``, or 0 past the last)."""
    return _LogLevels.apply(x, delta, step, n_nonzero)


def _tan_level(k: torch.Tensor, c: float, m: float, d: float, n: int) -> torch.Tensor:
    lo, span = math.atan(c * m), math.atan(c * (1 - m)) + math.atan(c * m)
    return d * (torch.atan(c * (k / n - m)) + lo) / span


class _TanLevels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c, m, d, bits):
        n = 2**bits - 1
        lo, span = math.atan(c * m), math.atan(c * (1 - m)) + math.atan(c * m)
        u = torch.tan(torch.clamp(x / d, 0, 1) * span - lo) / c + m
        j = torch.clamp(torch.floor(u * n), 0, n - 1)
        low, high = _tan_level(j, c, m, d, n), _tan_level(j + 1, c, m, d, n)
        return torch.where(x > (low + high) / 2, high, low)

    @staticmethod
    def symbolic(g, x, c, m, d, bits):
        # TanQ's own code rule (tan_codes): the level interval j from the inverse warp, then one
        # comparison with the midpoint of levels j and j+1, whose values come from the warp itself
        n = 2**bits - 1
        lo, span = math.atan(c * m), math.atan(c * (1 - m)) + math.atan(c * m)
        t = g.op("Clip", g.op("Div", x, _const(g, d)), _const(g, 0.0), _const(g, 1.0))
        t = g.op("Tan", g.op("Sub", g.op("Mul", t, _const(g, span)), _const(g, lo)))
        u = g.op("Add", g.op("Div", t, _const(g, c)), _const(g, m))
        j = g.op(
            "Clip", g.op("Floor", g.op("Mul", u, _const(g, float(n)))), _const(g, 0.0), _const(g, n - 1.0)
        )

        def level(k):
            w = g.op(
                "Atan",
                g.op("Mul", g.op("Sub", g.op("Div", k, _const(g, float(n))), _const(g, m)), _const(g, c)),
            )
            return g.op("Mul", g.op("Add", w, _const(g, lo)), _const(g, d / span))

        low, high = level(j), level(g.op("Add", j, _const(g, 1.0)))
        mid = g.op("Mul", g.op("Add", low, high), _const(g, 0.5))
        return g.op("Where", g.op("Greater", x, mid), high, low)


def tan_levels(x: torch.Tensor, sharpness: float, center: float, clip: float, bits: int) -> torch.Tensor:
    """Level value of TanQ quantization, by TanQ's elementwise code rule."""
    return _TanLevels.apply(x, sharpness, center, clip, bits)


class _CountedLevels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, levels, thresholds):
        # the number of thresholds strictly below x (bucketize's left rule), then the table
        return levels[torch.bucketize(x, torch.tensor(thresholds, dtype=x.dtype))]

    @staticmethod
    def symbolic(g, x, levels, thresholds):
        count = None
        for th in thresholds:
            step = g.op("Cast", g.op("Greater", x, _const(g, th)), to_i=_ONNX_FLOAT)
            count = step if count is None else g.op("Add", count, step)
        return g.op("Gather", levels, g.op("Cast", count, to_i=_ONNX_INT32), axis_i=0)


def counted_levels(x: torch.Tensor, levels: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """``levels[#{k : x > thresholds[k]}]``: a table quantizer's level of each element, its code
    counted against ascending float32 decision points (exact: no rounding decides a code)."""
    return _CountedLevels.apply(x, levels, thresholds)


class _IndexedLevels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table, grid_bits):
        cells = (x.clamp(0.0, 1.0) * float(2**grid_bits)).long()
        return table.index_select(0, cells.reshape(-1)).view(x.shape)

    @staticmethod
    def symbolic(g, x, table, grid_bits):
        flat = g.op("Reshape", x, _const(g, [-1], torch.int64))
        cells = g.op("Cast", g.op("Mul", flat, _const(g, float(2**grid_bits))), to_i=_ONNX_INT32)
        return g.op("Reshape", g.op("GatherElements", table, cells, axis_i=0), g.op("Shape", x))


def indexed_levels(x: torch.Tensor, table: torch.Tensor, grid_bits: int) -> torch.Tensor:
    """``table[floor(x * 2^grid_bits)]``: the level of each post-Softmax value in ``[0, 1]`` read from
    the level of every grid cell (exact where the quantizer's thresholds sit on the grid)."""
    return _IndexedLevels.apply(x, table, grid_bits)


class _ThresholdLevels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, levels, thresholds):
        table, bounds = torch.tensor(levels, dtype=x.dtype), torch.tensor(thresholds, dtype=x.dtype)
        return table[torch.bucketize(x, bounds)]

    @staticmethod
    def symbolic(g, x, levels, thresholds):
        # level = levels[0] + sum_k (levels[k+1] - levels[k]) * [x > thresholds[k]]
        out = _const(g, levels[0])
        for k, th in enumerate(thresholds):
            above = g.op("Greater", x, _const(g, th))
            out = g.op("Where", above, g.op("Add", out, _const(g, levels[k + 1] - levels[k])), out)
        return out


def threshold_levels(x: torch.Tensor, levels: list[float], thresholds: list[float]) -> torch.Tensor:
    """Level value of any table quantizer by comparing with every threshold (exact, but one pass per
    threshold: the fallback for tables without a closed form)."""
    return _ThresholdLevels.apply(x, levels, thresholds)


class _QuantizeCodes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, bits):
        codes = torch.round(x / scale)
        if zero_point:  # no "+ 0" (see _QDQ)
            codes = codes + zero_point
        return torch.clamp(codes, 0, 2**bits - 1).to(torch.uint8)

    @staticmethod
    def symbolic(g, x, scale, zero_point, bits):
        codes = g.op("Round", g.op("Div", x, _const(g, scale, torch.float64)))
        if zero_point:
            codes = g.op("Add", codes, _const(g, float(zero_point), torch.float64))
        bounds = (_const(g, 0.0, torch.float64), _const(g, float(2**bits - 1), torch.float64))
        return g.op("Cast", g.op("Clip", codes, *bounds), to_i=_ONNX_UINT8)


def quantize_codes(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """uint8 codes ``clamp(round(x / s) + z, 0, 2^b - 1)`` of a float64 tensor (per tensor)."""
    return _QuantizeCodes.apply(x, scale, zero_point, bits)


class _IntegerMatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, a_zero, b_zero, scale):
        # float64 holds every partial sum of 8-bit products exactly (|sum| < 2^53)
        return ((a.double() - a_zero.double()) @ (b.double() - b_zero.double())) * scale

    @staticmethod
    def symbolic(g, a, b, a_zero, b_zero, scale):
        products = g.op("MatMulInteger", a, b, a_zero, b_zero)
        return g.op("Mul", g.op("Cast", products, to_i=_ONNX_DOUBLE), scale)


def integer_matmul(
    a: torch.Tensor, b: torch.Tensor, a_zero: torch.Tensor, b_zero: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``((a - a_zero) @ (b - b_zero)) * scale`` in float64, for integer codes ``a`` (uint8) and
    ``b`` (uint8 or int8). ``a_zero`` is a scalar, ``b_zero`` a scalar or one per column of ``b``,
    ``scale`` (float64) broadcasts against the product (one per column for weights)."""
    return _IntegerMatMul.apply(a, b, a_zero, b_zero, scale)
