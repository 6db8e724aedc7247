"""Asymmetric uniform quantization: pure tensor math.

``q = clamp(round(x / d) + z, 0, 2^b - 1)`` and ``x_hat = (q - z) * d``. The range search follows
RepQ-ViT: candidate clipping ranges from the (p, 1-p) quantiles, kept by the smallest mean squared
error, done for all channels at once. The output objective keeps instead the candidate with the
smallest error in the product the tensor enters (:func:`search_output_range`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dopq.quantizers.base import Consumer, Context, PerChannel, PerTensor, Quantizer, register_quantizer
from dopq.quantizers.ranges import row_quantiles, to_rows

__all__ = [
    "DEFAULT_PERCENTILES",
    "OUTPUT_PERCENTILES",
    "RANGE_OBJECTIVES",
    "UniformQuantizer",
    "fake_quantize_uniform",
    "off_ties",
    "quantize_uniform",
    "round_ste",
    "search_output_range",
    "search_symmetric_range",
    "search_uniform_range",
    "tie_share",
]

DEFAULT_PERCENTILES = (0.999, 0.9999, 0.99999)
# the output objective's own grid: tight clips, which its error keeps only where the outliers they
# cut meet small weights, up to the full range
OUTPUT_PERCENTILES = (0.99, 0.995, 0.999, 0.9999, 0.99999, 1.0)
RANGE_OBJECTIVES = ("mse", "output")
# rows of the tensor (tokens) that score each candidate of the output objective: a few clips rank
# the same on a sample, and a Swin stage-1 input has 10^5 rows
OUTPUT_SAMPLE_ROWS = 4096
_MIN_SCALE = 1e-8
# A per-tensor scale that puts more than this share of its calibration input exactly on rounding ties
# (x / s = k + 1/2) is moved by TIE_NUDGE (relative): see off_ties
TIE_SHARE = 1e-3
TIE_NUDGE = 2.0**-20
_TIE_SAMPLE = 1 << 20


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


def quantize_uniform(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """Integer codes in ``[0, 2^bits - 1]`` (as a float tensor).

    The gradient (STE) passes where the code lies strictly inside ``(0, 2^b - 1)`` and is 0 on and
    beyond the bounds, as in :func:`fake_quantize_uniform`.
    """
    codes = round_ste(x / scale) + zero_point
    # not torch.clamp's gradient: on a bound it is 1 in torch 2.5-2.8 and 0 in 2.14, and every input
    # that rounds to a bound code lies on one
    inside = (codes > 0) & (codes < 2**bits - 1)
    return torch.where(inside, codes, codes.detach().clamp(0, 2**bits - 1))


def fake_quantize_uniform(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | float,
    bits: int,
    integral_zero_point: bool = False,
) -> torch.Tensor:
    """Quantize and dequantize; differentiable in ``x`` (STE) and ``scale`` (LSQ-style).

    ``integral_zero_point`` (the caller knows every zero point is a whole number) allows a shorter
    form with the same values; a per-tensor zero point may come as a Python number.
    """
    # traced (torch.jit.trace), one form whatever autograd's state: the tracer's check runs the
    # model again without autograd, and a graph with the autograd Function in it cannot be saved
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad) and not torch.jit.is_tracing():
        return _FakeQuantizeSTE.apply(x, scale, zero_point, bits)
    # no autograd: the same values (the STE's ``(r - a) + a`` is exactly ``r``) in place,
    # one allocation instead of seven: quantized evaluation is bound by these passes
    if integral_zero_point:
        # whole numbers below 2^24 add exactly, so clamp(r + z, 0, n) - z is clamp(r, -z, n - z):
        # four passes over x instead of six
        return (x / scale).round_().clamp_(-zero_point, (2**bits - 1) - zero_point).mul_(scale)
    return _codes(x, scale, zero_point, bits).sub_(zero_point).mul_(scale)


def _codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(x / s) + z, 0, 2^b - 1)`` in one new tensor, no autograd."""
    return (x / scale).round_().add_(zero_point).clamp_(0, 2**bits - 1)


class _FakeQuantizeSTE(torch.autograd.Function):
    """``(clamp(round(x / s) + z, 0, 2^b - 1) - z) * s`` with the gradients autograd would give the
    STE form ``round_ste``, computed in a few fused passes: block reconstruction on the CPU is bound by
    these element-wise passes over activations, not by the matrix products.

    d/dx is 1 where the unclamped code lies strictly inside ``(0, 2^b - 1)`` and 0 elsewhere (0 on
    the bounds, as :func:`quantize_uniform` defines it); d/ds is ``q - z - x / s`` there and ``q - z``
    elsewhere (LSQ without its gradient scale).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        bits: int,
    ) -> torch.Tensor:
        codes = _codes(x, scale, zero_point, bits)
        inside = (codes > 0) & (codes < 2**bits - 1)  # a code on a bound was clamped or sits on it
        centred = codes.sub_(zero_point)  # q - z
        ctx.save_for_backward(x, scale, centred, inside)
        return centred * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale, centred, inside = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            local = torch.where(inside, centred - x / scale, centred)
            grad_scale = (grad * local).sum_to_size(scale.shape)
        return grad_x, grad_scale, None, None


@torch.no_grad()
def _row_mse(rows: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row mean squared error of :func:`fake_quantize_uniform` (its in-place no-autograd path)."""
    return fake_quantize_uniform(rows, scale, zero_point, bits).sub_(rows).pow_(2).mean(1)


def tie_share(x: torch.Tensor, scale: torch.Tensor) -> float:
    """Share of the elements of ``x`` (a strided sample of at most ``2^20``) at an exact rounding
    tie of a per-tensor ``scale``: ``x / s`` a whole number plus one half."""
    flat = x.detach().reshape(-1)
    t = flat[:: max(1, flat.numel() // _TIE_SAMPLE)].float() / scale.reshape(())
    return float(((t - t.floor()) == 0.5).float().mean())


def off_ties(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale``, or, where more than ``TIE_SHARE`` of ``x`` sits exactly on its rounding ties, the
    scale moved by ``TIE_NUDGE`` (once more if needed, at most three times).

    Runtimes round ties differently (ONNX's ``QuantizeLinear`` and torch half to even, OpenVINO's
    ``FakeQuantize`` half away from zero), which no export can reconcile. A continuous input meets a
    tie only by float32 granularity; an input on a lattice, such as ``attn @ v`` over 2-bit levels and
    codes (sums of a few products), meets one wherever the searched range spans a whole number of
    lattice steps: in a tiny DeiT-III at W2/A2 a tenth of the ``proj`` inputs, which OpenVINO then
    rounded the other way on most images. The move, one part in 2^20, changes no code of a value
    farther than that from a tie and takes every lattice point off them.
    """
    for _ in range(3):
        if tie_share(x, scale) <= TIE_SHARE:
            break
        scale = scale * (1.0 + TIE_NUDGE)
    return scale


def _range_to_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a constant row (lo == hi) would give the floor scale and a zero point of about -lo / 1e-8,
    # which no integer format holds: widen it to contain 0, so the constant is one end of the grid
    flat = (hi - lo) <= 1e-6 * torch.maximum(hi.abs(), lo.abs())
    lo, hi = torch.where(flat, lo.clamp_max(0), lo), torch.where(flat, hi.clamp_min(0), hi)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(_MIN_SCALE)
    zero_point = (-lo / scale).round()
    return scale, zero_point


def _candidate_qparams(
    rows: torch.Tensor, bits: int, percentiles: tuple[float, ...], include_zero: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-row ``(scale, zero_point)`` of each percentile candidate: the range from the mirrored
    quantile ``1 - p`` to ``p``, widened to contain 0 where ``include_zero``."""
    bounds = row_quantiles(rows, tuple(percentiles) + tuple(1.0 - p for p in percentiles))
    n = len(percentiles)
    if include_zero:
        bounds = torch.cat([bounds[:n].clamp_min(0), bounds[n:].clamp_max(0)])
    return [_range_to_qparams(bounds[n + i], bounds[i], bits) for i in range(n)]


def _replaces(err: torch.Tensor, best_err: torch.Tensor) -> torch.Tensor:
    """Rows where a candidate replaces the best so far: a lower error, or no finite best yet, so
    that a row whose squared errors all overflow float32 (values above about 1e19) keeps a searched
    range (the last, widest candidate), not the placeholder scale 1 and zero point 0."""
    return (err < best_err) | ~torch.isfinite(best_err)


def search_uniform_range(
    x: torch.Tensor,
    bits: int,
    channel_axis: int | None = None,
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
    include_zero: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point minimising the squared error over percentile candidates.

    Args:
        x: calibration tensor.
        bits: bit width.
        channel_axis: axis with one (scale, zero point) per index; None for per tensor.
        percentiles: upper quantiles tried; the lower bound is the mirrored quantile.
        include_zero: widen every candidate range to contain 0, so that the zero point is a code
            in ``[0, 2^b - 1]`` and 0.0 is exactly a level (what integer kernels need).

    Returns:
        ``(scale, zero_point)`` of shape ``(C,)`` (``(1,)`` per tensor).

    Example:
        >>> s, z = search_uniform_range(torch.linspace(-1, 3, 1001), bits=4)
        >>> round(float(s), 3), float(z)
        (0.266, 4.0)
    """
    rows = to_rows(x.detach().float(), channel_axis)
    best_err = torch.full((rows.shape[0],), float("inf"), device=rows.device)
    best_scale = torch.ones_like(best_err)
    best_zp = torch.zeros_like(best_err)
    for scale, zp in _candidate_qparams(rows, bits, percentiles, include_zero):
        err = _row_mse(rows, scale[:, None], zp[:, None], bits)
        better = _replaces(err, best_err)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def search_output_range(
    x: torch.Tensor,
    bits: int,
    output_error: Callable[[torch.Tensor], torch.Tensor],
    percentiles: tuple[float, ...] = OUTPUT_PERCENTILES,
    sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scale and integer zero point whose quantization error hurts a product least.

    The candidates are :func:`search_uniform_range`'s (percentile ranges widened to contain 0); the
    kept one has the smallest sum of squares of ``output_error(x_hat - x)``, where ``output_error``
    maps an error of ``x`` (or of ``sample``, rows of it) to the error of the output it causes: a
    clip that cuts an outlier channel costs what that channel's weights make of it, not its square.

    Args:
        x: calibration tensor (the quantiles come from all of it).
        bits: bit width.
        output_error: a linear map from an error of ``sample`` to the output error.
        percentiles: upper quantiles tried; the lower bound is the mirrored quantile.
        sample: the part of ``x`` the errors are measured on (default ``x``).

    Returns:
        ``(scale, zero_point)``, each of shape ``(1,)``.

    Example:
        >>> x = torch.linspace(-1, 1, 1001).reshape(-1, 1) * torch.tensor([[1.0, 20.0]])
        >>> weights = torch.tensor([[1.0], [0.0]])  # the outlier column meets a zero weight
        >>> s, z = search_output_range(x, 3, lambda e: e @ weights, percentiles=(0.9, 1.0))
        >>> float(s) < float(search_uniform_range(x, 3, percentiles=(1.0,), include_zero=True)[0])
        True
    """
    sample = x if sample is None else sample
    rows = to_rows(x.detach().float(), None)
    best_err, best = math.inf, None
    for scale, zp in _candidate_qparams(rows, bits, percentiles, include_zero=True):
        err = float(output_error(fake_quantize_uniform(sample, scale, zp, bits) - sample).pow(2).sum())
        if best is None or err < best_err:
            best_err, best = err, (scale, zp)
    return best


def _sampled_consumer(
    x: torch.Tensor, context: torch.Tensor | Consumer, rows: int = OUTPUT_SAMPLE_ROWS
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A fixed random sample of ``x`` and the map from its errors to the output errors of the
    product ``context`` describes: rows of ``x`` against a shared 2-D right factor (a Linear's
    weight), else whole matrices of a batched product, with the same matrices of its factors."""
    consumer = context if isinstance(context, Consumer) else Consumer(right=context)
    left, right = consumer.left, consumer.right
    generator = torch.Generator().manual_seed(0)
    if left is None and right is not None and right.dim() == 2:
        flat = x.reshape(-1, x.shape[-1])
        idx = torch.randperm(flat.shape[0], generator=generator)[:rows].to(x.device)
        return flat[idx].float(), lambda e: e @ right.float()
    matrices = x.reshape(-1, *x.shape[-2:])
    count = min(matrices.shape[0], max(1, math.ceil(rows / x.shape[-2])))
    idx = torch.randperm(matrices.shape[0], generator=generator)[:count].to(x.device)

    def pick(factor: torch.Tensor | None) -> torch.Tensor | None:
        if factor is None:
            return None
        if factor.dim() > 2:  # batched like x: the same matrices
            factor = factor.expand(*x.shape[:-2], *factor.shape[-2:]).reshape(-1, *factor.shape[-2:])[idx]
        return factor.float()

    left, right = pick(left), pick(right)

    def output_error(e: torch.Tensor) -> torch.Tensor:
        e = e if left is None else left @ e
        return e if right is None else e @ right

    return matrices[idx].float(), output_error


def search_symmetric_range(
    x: torch.Tensor,
    bits: int,
    channel_axis: int | None = None,
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`search_uniform_range` on grids centred on 0: zero point ``2^(b-1)`` (the codes minus it
    fill a signed b-bit integer, ``[-2^(b-1), 2^(b-1) - 1]``, with no zero point), scale
    ``m / (2^(b-1) - 1)`` for the candidate magnitudes ``m`` (upper quantiles of ``|x|``).

    Example:
        >>> s, z = search_symmetric_range(torch.linspace(-1, 3, 1001), bits=4)
        >>> round(float(s), 3), float(z)
        (0.428, 8.0)
    """
    rows = to_rows(x.detach().float(), channel_axis)
    half = 2 ** (bits - 1)
    zero_point = torch.full((rows.shape[0],), float(half), device=rows.device)
    best_err = torch.full_like(zero_point, float("inf"))
    best_scale = torch.ones_like(best_err)
    for bound in row_quantiles(rows.abs(), tuple(percentiles)):
        scale = (bound / (half - 1)).clamp_min(_MIN_SCALE)
        err = _row_mse(rows, scale[:, None], zero_point[:, None], bits)
        better = _replaces(err, best_err)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale, zero_point


_PER_TENSOR = PerTensor()


def _broadcast(param: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or param.numel() == 1:
        return param.reshape(())
    shape = [1] * x.ndim
    shape[axis] = -1
    return param.reshape(shape)


@register_quantizer("uniform")
class UniformQuantizer(Quantizer):
    """Uniform quantizer, per tensor or per channel: asymmetric (a range searched per channel), or
    ``symmetric`` (zero point ``2^(b-1)``: the codes minus it are signed b-bit integers, the form
    every runtime's integer kernels take for weights without a zero-point correction).

    Args:
        bits: bit width, 2..8.
        granularity: ``PerTensor()`` or ``PerChannel(axis)``.
        percentiles: candidate upper quantiles for the range search.
        symmetric: grids centred on 0 (:func:`search_symmetric_range`).
        objective: ``"mse"`` (the tensor's own squared error) or ``"output"``: per tensor, the error
            of the product it enters, when the caller passes that product as ``context``
            (:func:`search_output_range`; without a context, per channel and on grids centred on 0,
            whose candidates it does not search, the squared error).
        zero_in_range: per channel too, widen every candidate range to contain 0 (per tensor it
            always is): for weights, whose zero points an integer format must hold as codes; a row of
            one sign would otherwise get a zero point beyond the codes, which no export can store.

    Example:
        >>> q = UniformQuantizer(4, PerChannel(0)); q.observing = True
        >>> w = torch.randn(8, 16); w_hat = q(w)
        >>> q.scale.shape, len(torch.unique(w_hat[0])) <= 16
        (torch.Size([8]), True)
    """

    def __init__(
        self,
        bits: int,
        granularity: PerTensor | PerChannel = _PER_TENSOR,
        percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
        symmetric: bool = False,
        objective: str = "mse",
        zero_in_range: bool = False,
    ) -> None:
        super().__init__(bits)
        if objective not in RANGE_OBJECTIVES:
            raise ValueError(f"objective must be one of {RANGE_OBJECTIVES}, got {objective!r}")
        self.granularity = granularity
        self.percentiles = tuple(percentiles)
        self.symmetric = symmetric
        self.objective = objective
        self.zero_in_range = zero_in_range
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))

    def read_host_copies(self) -> None:
        super().read_host_copies()
        if self.is_ready():
            self.zero_point_is_integral()
            self._zero_point_for(self.zero_point)

    def zero_point_is_integral(self) -> bool:
        """Whether every zero point is a whole number (read from the device once per setting)."""
        return self.host_copy("integral", self.zero_point, lambda z: bool((z == z.round()).all()))

    @property
    def channel_axis(self) -> int | None:
        return self.granularity.axis if isinstance(self.granularity, PerChannel) else None

    def initialize(self, x: torch.Tensor, context: Context) -> None:
        # a per-tensor activation range always holds 0 (an integer zero point for integer kernels);
        # per-channel post-LayerNorm ranges need not: the re-parameterization moves them
        if (
            self.objective == "output"
            and context is not None
            and self.channel_axis is None
            and not self.symmetric
        ):
            sample, output_error = _sampled_consumer(x, context)
            scale, zero_point = search_output_range(x, self.bits, output_error, self.percentiles, sample)
        else:
            scale, zero_point = self.searched_qparams(x)
        if self.channel_axis is None:
            scale = off_ties(x, scale)
        self.set_qparams(scale, zero_point)

    def searched_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(scale, zero_point)`` this quantizer's range search gives ``x`` (not installed)."""
        axis = self.channel_axis
        if self.symmetric:
            return search_symmetric_range(x, self.bits, axis, self.percentiles)
        include_zero = axis is None or self.zero_in_range
        return search_uniform_range(x, self.bits, axis, self.percentiles, include_zero=include_zero)

    def set_qparams(
        self, scale: torch.Tensor, zero_point: torch.Tensor, granularity: PerTensor | PerChannel | None = None
    ) -> None:
        """Install parameters directly (used by re-parameterization and loading)."""
        if granularity is not None:
            self.granularity = granularity
        scale = scale.detach().reshape(-1).to(self.scale)
        if isinstance(self.scale, nn.Parameter):
            self.scale = nn.Parameter(scale)
        else:
            self.scale = scale
        self.zero_point = zero_point.detach().reshape(-1).to(self.zero_point)
        self.initialized.fill_(True)

    def make_scale_learnable(self) -> nn.Parameter:
        """Turn the step size into a trainable parameter (LSQ-style reconstruction)."""
        if not isinstance(self.scale, nn.Parameter):
            value = self.scale
            del self.scale
            self.scale = nn.Parameter(value.clone())
        return self.scale.requires_grad_(True)  # also after an earlier reconstruction froze it

    @property
    def code_range(self) -> tuple[int, int]:
        """Smallest and largest integer code, ``(0, 2^b - 1)``."""
        return 0, 2**self.bits - 1

    def qparams_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point broadcastable to ``x`` (per-channel ones along their axis)."""
        axis = self.channel_axis
        return _broadcast(self.scale, x, axis), _broadcast(self.zero_point, x, axis)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (int64) in :attr:`code_range`: the single definition that fake
        quantization, saving and export share; ``dequantize(codes(x)) == fake_quantize(x)``."""
        scale, zero_point = self.qparams_for(x)
        return _codes(x.detach().float(), scale, zero_point, self.bits).long()

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """``(codes - z) * s``: the float value of integer codes."""
        scale, zero_point = self.qparams_for(codes)
        return (codes.to(scale.dtype) - zero_point) * scale

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale = _broadcast(self.scale, x, self.channel_axis)
        zero_point = self._zero_point_for(x)
        return fake_quantize_uniform(x, scale, zero_point, self.bits, self.zero_point_is_integral())

    def _zero_point_for(self, x: torch.Tensor) -> torch.Tensor | float:
        """A single zero point as a Python number (read from the device once per setting: a number
        argument spares the element-wise ops their own small kernels), else broadcast to ``x``."""
        if self.zero_point.numel() != 1:
            return _broadcast(self.zero_point, x, self.channel_axis)
        return self.host_copy("number", self.zero_point, float)

    def extra_repr(self) -> str:
        symmetric = ", symmetric=True" if self.symmetric else ""
        objective = f", objective={self.objective!r}" if self.objective != "mse" else ""
        return f"{super().extra_repr()}, granularity={self.granularity}{symmetric}{objective}"
