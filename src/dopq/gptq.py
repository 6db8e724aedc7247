"""GPTQ-style weight rounding at calibration time (Frantar et al., 2023, "OPTQ").

Each quantized Linear / Conv2d keeps its calibrated per-output-channel grid (scale, zero point);
only the choice of grid point changes. Columns (input channels) are rounded one after another and
the rounding error of each is spread over the columns not yet rounded, weighted by the inverse
Hessian ``H = X^T X`` of the layer's calibration inputs, which minimises ``||X (W - W_q)^T||^2``
to second order; damping adds a fraction of the mean diagonal to ``H``. The sweep runs as the
nearest-plane rounding GPTQ is equivalent to (Chen et al., 2025, "The Geometry of LLM Quantization:
GPTQ as Babai's Nearest Plane Algorithm"): against an upper triangular ``V`` with ``H = V V^T``, one
Cholesky factorization that the float target's solve shares, with no inverse of ``H``; blocks of
columns are updated lazily (one matrix product per block).

In a model (:func:`gptq_model`) the layers are rounded in forward order during one pass over the
calibration images: a pre-hook rounds a layer from the inputs it receives in the quantized model,
so every layer sees what the already-rounded layers before it produce. ``X`` is the input the
layer's weights really multiply: after its input quantizer (plus the post-LayerNorm input offset),
so the error being minimised is the one the quantized layer makes (docs/gptq.md). The rounded
weights are points of the grid, so ``weight_quantizer(weight)`` returns them unchanged and the
saved codes and the export are the GPTQ codes.

With ``target="float"`` (the asymmetric objective of GPTAQ, Li et al. 2025) a layer aims at the output
the float model computes, ``||X_fp W^T - X_q W_q^T||^2``, where ``X_fp`` is the layer's input in the
float model (all quantizers off, same re-parameterization): the error the earlier layers made is then
compensated too. It reduces exactly to ordinary GPTQ: the least-squares target ``W'`` of
:func:`float_target_weight` leaves a residual orthogonal to ``X_q``, so GPTQ of ``W'`` under
``H_q = X_q^T X_q`` minimises the asymmetric objective up to a constant.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

from dopq.config import GPTQ_TARGETS
from dopq.errors import CalibrationError
from dopq.modules import (
    QuantConv2d,
    QuantLinear,
    StopForward,
    quantized_weight,
    quantizers_off,
    removing_hooks,
)
from dopq.quantizers import UniformQuantizer

__all__ = [
    "GPTQ_BLOCK",
    "GPTQ_TARGETS",
    "DampedHessian",
    "float_target_weight",
    "gptq_model",
    "gptq_round",
    "input_hessian",
    "layer_inputs",
    "sample_rows",
]

GPTQ_BLOCK = 128  # columns per lazy batch update (the reference implementation's default)
# GPTQ's input statistics come from at most this many token rows per layer: the (in, in) moments
# cost rows * in^2, which on many-token stages (Swin's first two: 25 088-100 352 rows of 32 images)
# outweighs the rest of GPTQ, while a few thousand rows already estimate them (ViT layers see 6 304)
GPTQ_MIN_ROWS = 8192
GPTQ_ROWS_PER_INPUT = 16  # ... or this many per input channel, whichever is more
_DAMP_RETRIES = 4  # each retry multiplies the damping by 10 before giving up
# The float target's X_fp rows are held from the float pass until their layer is rounded: every
# layer's at once would be 0.8 GB for ViT-S and 1.6 GB for ViT-B on 32 images, up to 8 GB on 256.
# Above this many bytes the layers are rounded in chunks, each after a float pass of its own (from a
# float copy of the model): the same rows and codes, at the cost of repeating the passes' beginnings.
GPTQ_FLOAT_ROWS_BYTES = 1 << 30


def input_hessian(rows: torch.Tensor) -> torch.Tensor:
    """``X^T X / n`` (float64) of input rows ``(n, in_features)``.

    Raises:
        CalibrationError: no rows.
    """
    if rows.shape[0] == 0:
        raise CalibrationError("GPTQ needs calibration inputs, but the layer received none")
    x = rows.float()
    return (x.T @ x).double() / rows.shape[0]


class DampedHessian:
    """One factorization of ``H + lam I`` (``lam = damp * mean(diag H)``) for both of GPTQ's uses.

    It keeps the lower Cholesky factor ``L`` of the *reversed* matrix ``P (H + lam I) P`` (``P`` reverses
    the channel order), so that ``V = P L P`` is upper triangular with ``H + lam I = V V^T``: the
    column sweep rounds against ``V`` (:func:`gptq_round`), and the float target's solve can reuse
    ``L``. The damping grows tenfold while the matrix is not positive definite (a rank-deficient
    Hessian from few or collinear inputs).

    Args:
        hessian: ``(in, in)`` ``X^T X`` of the layer's inputs (any positive scale).
        damp: fraction of the mean diagonal added to the diagonal.
        unit_dead: give an input channel that was always 0 (diagonal 0) a unit diagonal before the
            mean is taken, as the rounding does (the channel is then decoupled: rounded to nearest,
            spreading no error); the float target leaves it at the damping alone.

    Raises:
        CalibrationError: NaN/Inf values, or not positive definite even with the largest damping.
    """

    def __init__(self, hessian: torch.Tensor, damp: float, unit_dead: bool = True) -> None:
        if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
            raise ValueError(f"GPTQ needs a square Hessian, got {tuple(hessian.shape)}")
        if not bool(torch.isfinite(hessian).all()):
            raise CalibrationError("GPTQ: the layer's input Hessian has NaN/Inf values")
        self.matrix = hessian.double()
        self.has_dead = bool((self.matrix.diagonal() == 0).any())
        h = self.matrix.clone()
        if unit_dead:
            h.diagonal()[h.diagonal() == 0] = 1.0
        h = h.flip(0, 1)
        # an all-zero H (every input always 0, kept so by unit_dead=False) would get no damping and no
        # factor; with a unit ridge the float target is then W itself (C - H == 0), as it should be
        mean_diag = float(h.diagonal().mean()) or 1.0
        eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        for attempt in range(_DAMP_RETRIES + 1):
            lower, info = torch.linalg.cholesky_ex(h + eye * (damp * 10**attempt * mean_diag))
            if int(info) == 0:
                self._reversed_lower = lower
                return
        raise CalibrationError(
            "GPTQ: the input Hessian is not positive definite even with damping "
            f"{damp * 10**_DAMP_RETRIES:g}; the calibration inputs are degenerate (NaN/Inf or all equal)"
        )

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``(H + lam I)^-1 rhs`` (float64) for ``rhs`` ``(in, k)``."""
        return torch.cholesky_solve(rhs.double().flip(0), self._reversed_lower).flip(0)

    def upper(self) -> torch.Tensor:
        """The upper triangular ``V`` with ``H + lam I = V V^T`` (float64)."""
        return self._reversed_lower.flip(0, 1)


def float_target_weight(
    weight: torch.Tensor,
    cross: torch.Tensor,
    hessian: torch.Tensor | DampedHessian,
    damp: float = 0.1,
    shrink: float = 1.0,
) -> torch.Tensor:
    """The weight ``W'`` whose output on the quantized inputs best matches the float model's output.

    ``W' = argmin ||X_fp W^T - X_q W'^T||^2 + lam ||W' - W||^2 = W + W (C - H)(H + lam I)^-1`` with
    ``C = X_fp^T X_q`` and ``H = X_q^T X_q`` (same normalisation), ``lam = damp * mean(diag H)``. The
    ridge pulls towards ``W`` rather than 0, so equal inputs (``C == H``) give ``W' == W`` exactly and
    directions the calibration inputs do not excite keep their float weight.

    Args:
        weight: ``(out, in)`` float weight.
        cross: ``(in, in)`` ``X_fp^T X_q``.
        hessian: ``(in, in)`` ``X_q^T X_q``, or its :class:`DampedHessian` (whose damping then applies).
        damp: ridge, a fraction of the mean diagonal of ``hessian``.
        shrink: ``alpha`` of ``W + alpha (W' - W)``: 1 is the least-squares target, 0 the float weight.

    Returns:
        ``W'`` ``(out, in)`` in the weight's dtype.

    Raises:
        CalibrationError: NaN/Inf statistics, or ``H`` not positive definite even with more damping.
    """
    matrix = hessian.matrix if isinstance(hessian, DampedHessian) else hessian
    if cross.shape != matrix.shape or matrix.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"float target: shapes {weight.shape}, {cross.shape}, {matrix.shape} do not match")
    if not bool(torch.isfinite(cross).all()):
        raise CalibrationError("GPTQ: the layer's float/quantized input statistics have NaN/Inf values")
    factor = hessian if isinstance(hessian, DampedHessian) else DampedHessian(hessian, damp, unit_dead=False)
    w = weight.detach().double()
    # (H + lam I) D^T = (C - H)^T W^T, solved with the factor: never an explicit inverse
    delta = factor.solve((cross.double() - factor.matrix).T @ w.T).T
    return (w + shrink * delta).to(weight.dtype)


@torch.no_grad()
def gptq_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantizer: UniformQuantizer,
    damp: float = 0.1,
    act_order: bool = False,
    block_size: int = GPTQ_BLOCK,
) -> torch.Tensor:
    """GPTQ rounding of a 2-D weight onto its quantizer's per-output-channel grid.

    Args:
        weight: ``(out, in)`` float weight.
        hessian: ``(in, in)`` ``X^T X`` of the layer's inputs (any positive scale), or its
            :class:`DampedHessian` (whose damping then applies, unless ``act_order`` reorders it).
        quantizer: the calibrated weight quantizer (per tensor or per output channel); its scale and
            zero point are kept.
        damp: fraction of the mean Hessian diagonal added to the diagonal.
        act_order: round columns in order of decreasing Hessian diagonal (largest inputs first).
        block_size: columns per lazy batch update.

    Returns:
        Integer codes ``(out, in)`` (int64, in the quantizer's code range); the weight is
        ``quantizer.dequantize(codes)``.

    Raises:
        CalibrationError: a NaN/Inf Hessian, or one not positive definite even with more damping.

    Example:
        >>> from dopq.quantizers import PerChannel
        >>> q = UniformQuantizer(3, PerChannel(0)); q.observing = True
        >>> w = torch.randn(4, 8); _ = q(w); x = torch.randn(64, 8)
        >>> codes = gptq_round(w, input_hessian(x), q)
        >>> int(codes.min()) >= 0 and int(codes.max()) <= 7
        True
    """
    matrix = hessian.matrix if isinstance(hessian, DampedHessian) else hessian
    if weight.ndim != 2 or matrix.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"GPTQ needs a 2-D weight and its square Hessian, got {weight.shape}, {matrix.shape}"
        )
    order = None
    if act_order:
        order = torch.argsort(matrix.diagonal(), descending=True, stable=True)
        hessian = DampedHessian(matrix[order][:, order], damp)
    elif not isinstance(hessian, DampedHessian):
        hessian = DampedHessian(hessian, damp)
    w = weight.detach().float()
    w = w[:, order] if order is not None else w
    # per output channel (a per-tensor grid broadcasts): vectors of length out
    scale = quantizer.scale.detach().float().reshape(-1).expand(w.shape[0])
    zero_point = quantizer.zero_point.detach().float().reshape(-1).expand(w.shape[0])
    # the factor in float64 (a near-singular H), the column sweep in float32 as the reference code
    upper = hessian.upper().float()
    codes = _sweep(w.T.contiguous(), upper, scale, zero_point, quantizer.code_range, block_size).T
    if order is not None:
        codes = codes[:, torch.argsort(order)]
    return codes.long()


def _sweep(
    columns: torch.Tensor,
    upper: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    code_range: tuple[int, int],
    block_size: int,
) -> torch.Tensor:
    """GPTQ's column sweep as the nearest-plane rounding it is equivalent to.

    With ``H + lam I = V V^T`` (``V`` upper triangular) the objective ``(w - q) H (w - q)^T`` of one
    output channel is ``sum_j (sum_{k <= j} e_k V_kj)^2`` with ``e = w - q``: rounding the columns in
    order, column ``j``'s term vanishes at ``w_j + sum_{k < j} e_k V_kj / V_jj``, which is the
    column GPTQ's inverse-Hessian updates arrive at, so rounding that gives GPTQ's codes without
    inverting ``H``. The earlier columns' share comes in one product per block of columns, the
    block's own columns one at a time.

    Args:
        columns: ``(in, out)``, the weight transposed: each of its columns is one contiguous row.
        upper: ``V``, ``(in, in)``.
        scale, zero_point: per output channel, length ``out``.
        code_range: the quantizer's smallest and largest code.
        block_size: columns per lazy batch.

    Returns:
        The codes ``(in, out)`` (float).
    """
    lo, hi = code_range
    codes = torch.empty_like(columns)
    errors = torch.empty_like(columns)  # e_k = w_k - dequantized code, per output channel
    n = columns.shape[0]
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        shift = upper[:i1, i1:i2].T @ errors[:i1]  # sum_{k < i1} e_k V_kj for the block's columns j
        ublock = upper[i1:i2, i1:i2]
        diagonal = ublock.diagonal().tolist()  # Python floats: fewer tiny tensor ops per column
        for i in range(i2 - i1):
            column = columns[i1 + i]
            q = (
                torch.round(shift[i].div_(diagonal[i]).add_(column).div_(scale))
                .add_(zero_point)
                .clamp_(lo, hi)
            )
            codes[i1 + i] = q
            err = errors[i1 + i]
            torch.sub(column, (q - zero_point).mul_(scale), out=err)
            shift[i + 1 :].addr_(ublock[i, i + 1 :], err)
    return codes


def sample_rows(rows: torch.Tensor) -> torch.Tensor:
    """At most ``max(GPTQ_MIN_ROWS, GPTQ_ROWS_PER_INPUT * in_features)`` of the input rows
    ``(n, in_features)``, evenly spaced (every image, spread over its tokens); all when fewer. The
    same rows for the same ``n``, so a layer's float and quantized inputs stay paired."""
    n, fan_in = rows.shape
    keep = max(GPTQ_MIN_ROWS, GPTQ_ROWS_PER_INPUT * fan_in)
    if n <= keep:
        return rows
    return rows[torch.linspace(0, n - 1, keep, device=rows.device).round().long()]


def layer_inputs(module: QuantLinear | QuantConv2d, x: torch.Tensor, quantized: bool = True) -> torch.Tensor:
    """The rows ``(n, fan_in)`` that the layer's weights multiply, for input ``x``.

    With ``quantized`` the input passes through the layer's input quantizer first (what the
    quantized layer computes with); the post-LayerNorm input offset is added either way.
    """
    if quantized:
        x = module.input_quantizer(x)
    if isinstance(module, QuantConv2d):
        if not _unfolds(module):
            raise CalibrationError("GPTQ supports ungrouped, zero-padded Conv2d layers only")
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if module.input_offset is not None:
        x = x + module.input_offset
    return x.reshape(-1, x.shape[-1])


def _unfolds(module: QuantLinear | QuantConv2d) -> bool:
    """Whether the layer's product is one matrix product of unfolded input rows (a Linear, or a
    Conv2d that is not grouped and pads with zeros), the form GPTQ's Hessian is built for."""
    return isinstance(module, QuantLinear) or (module.groups == 1 and module.padding_mode == "zeros")


def _gptq_layers(model: nn.Module) -> list[tuple[str, QuantLinear | QuantConv2d]]:
    """Layers with an enabled uniform weight quantizer whose codes GPTQ chooses; a grouped
    (depthwise) or non-zero-padded Conv2d, as in a convolutional stem, keeps round-to-nearest."""
    return [(name, m) for name, m in model.named_modules() if quantized_weight(m) is not None and _unfolds(m)]


def _float_inputs(
    model: nn.Module,
    images: torch.Tensor,
    layers: list[tuple[str, QuantLinear | QuantConv2d]],
    done: set[str] | frozenset[str] = frozenset(),
    budget: int | None = None,
) -> tuple[dict[str, torch.Tensor], bool]:
    """Each layer's input rows in the float model (every quantizer off, weights not yet rounded):
    the ``X_fp`` of the float target. A layer called twice keeps its first call, like the rounding pass.

    Layers in ``done`` are passed over; the pass stops at the layer whose rows would take those
    held above ``budget`` bytes (the first layer's rows are always kept). Returns the rows and
    whether the pass reached the end of the forward (every remaining layer's rows are in it)."""
    rows: dict[str, torch.Tensor] = {}
    held = 0

    def hook_for(name: str):
        def hook(module: QuantLinear | QuantConv2d, args: tuple) -> None:
            nonlocal held
            if name in rows or name in done:
                return
            layer_rows = sample_rows(layer_inputs(module, args[0], quantized=False).float())
            size = layer_rows.numel() * layer_rows.element_size()
            if budget is not None and rows and held + size > budget:
                raise StopForward
            rows[name] = layer_rows
            held += size

        return hook

    with removing_hooks([m.register_forward_pre_hook(hook_for(n)) for n, m in layers]):
        try:
            with quantizers_off(model):
                model(images)
        except StopForward:
            return rows, False
    return rows, True


def _cross_moment(x_fp: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
    """``X_fp^T X_q / n`` (float64), normalised like :func:`input_hessian`."""
    if x_fp.shape != x_q.shape:
        raise CalibrationError(
            f"GPTQ float target: float inputs {tuple(x_fp.shape)} and quantized inputs {tuple(x_q.shape)} differ"
        )
    return (x_fp.T @ x_q.float()).double() / x_q.shape[0]


def _round_layer(
    weight: torch.Tensor,
    rows: torch.Tensor,
    cross: torch.Tensor | None,
    q: UniformQuantizer,
    damp: float,
    act_order: bool,
    target_damp: float | None,
    target_shrink: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's GPTQ step on its sampled input ``rows``: the 2-D weight aimed at (the float weight,
    or with the float target's cross moment ``cross`` the shrunk least-squares ``W'``) and its codes."""
    w2d = weight.reshape(weight.shape[0], -1)
    hessian = DampedHessian(input_hessian(rows), damp)
    if cross is not None:
        ridge = damp if target_damp is None else target_damp
        # one factorization for both uses, unless dead inputs or another ridge tell them apart
        shared = ridge == damp and not hessian.has_dead
        w2d = float_target_weight(w2d, cross, hessian if shared else hessian.matrix, ridge, target_shrink)
    return w2d, gptq_round(w2d, hessian, q, damp, act_order)


@torch.no_grad()
def gptq_model(
    model: nn.Module,
    images: torch.Tensor,
    damp: float = 0.1,
    act_order: bool = False,
    quantized_inputs: bool = True,
    target: str = "quantized",
    target_damp: float | None = None,
    target_shrink: float = 0.5,
    unrounded: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Round the weights of every quantized Linear / Conv2d with GPTQ, in forward order, in place.

    Args:
        model: a calibrated (and re-parameterized) model.
        images: the calibration batch on the model's device.
        damp: GPTQ damping (fraction of the mean Hessian diagonal).
        act_order: round columns in order of decreasing Hessian diagonal.
        quantized_inputs: build each Hessian from the layer's quantized inputs (see
            :func:`layer_inputs`) rather than from its float inputs.
        target: "quantized" minimises ``||X_q (W - W_q)^T||^2``; "float" minimises
            ``||X_fp W^T - X_q W_q^T||^2`` against the float model's inputs (GPTAQ): one extra float
            pass stores each layer's ``X_fp`` rows until the layer is rounded.
        target_damp: ridge of the float target's least-squares solve (None: ``damp``).
        target_shrink: the float target moves ``W`` this fraction of the way to the least-squares ``W'``
            (half way by default: all the way loses on Swin-Tiny at W3/A3, docs/gptq.md).
        unrounded: a copy of ``model`` taken before rounding whose weights stay float (the
            calibration check's round-to-nearest model): with the quantized target the returned
            float weights are its tensors, not a second copy of every weight (340 MB on ViT-B), and
            with the float target in chunks the later chunks' float passes run on it, not on a copy.

    Returns:
        The weight each rounded layer aimed at, by name (for bias correction's reference): the float
        weight, or with the float target the least-squares ``W'``, whose output on the quantized
        inputs is the float model's output as nearly as a linear map can give it.

    Raises:
        CalibrationError: a quantized layer received no input in the pass, or its Hessian is degenerate.
    """
    if target not in GPTQ_TARGETS:
        raise ValueError(f"GPTQ target must be one of {', '.join(GPTQ_TARGETS)}; got {target!r}")
    layers = _gptq_layers(model)
    model.eval()
    # before any layer is rounded: X_fp is what the float model feeds each layer
    float_rows, complete = (
        _float_inputs(model, images, layers, budget=GPTQ_FLOAT_ROWS_BYTES)
        if target == "float"
        else ({}, True)
    )
    # too many rows to hold at once: later chunks' float passes run on a copy taken before rounding
    # (the caller's, where it has one: its weights stay float)
    float_model = None if complete else (unrounded if unrounded is not None else copy.deepcopy(model))
    originals: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module: QuantLinear | QuantConv2d, args: tuple) -> None:
            if name in originals:  # a layer called twice in one forward is rounded once
                return
            if target == "float" and name not in float_rows and not complete:
                raise StopForward  # the first layer of the next chunk
            rows = sample_rows(layer_inputs(module, args[0], quantized_inputs))
            weight = module.weight.detach()
            q: UniformQuantizer = module.weight_quantizer
            try:
                # the float rows are freed once used
                cross = _cross_moment(float_rows.pop(name), rows) if target == "float" else None
                w2d, codes = _round_layer(weight, rows, cross, q, damp, act_order, target_damp, target_shrink)
            except CalibrationError as exc:
                raise CalibrationError(f"{name}: {exc}") from None
            if target == "quantized" and unrounded is not None:  # w2d is its weight, unchanged
                originals[name] = unrounded.get_submodule(name).weight.detach()
            else:
                originals[name] = w2d.reshape(weight.shape).clone()
            module.weight.copy_(q.dequantize(codes).reshape(weight.shape).to(weight.dtype))
            if not torch.equal(q.codes(module.weight), codes.reshape(weight.shape)):
                raise RuntimeError(f"{name}: GPTQ weights do not map onto their own codes")

        return hook

    with removing_hooks([m.register_forward_pre_hook(hook_for(n)) for n, m in layers]):
        while True:  # one pass, or one per chunk of layers (each pass stops where its chunk ends)
            with contextlib.suppress(StopForward):
                model(images)
            if complete:
                break
            if float_rows:  # a layer the float pass reached and the rounding pass did not
                raise RuntimeError(f"GPTQ: the rounding pass did not reach {next(iter(float_rows))}")
            float_layers = [(n, float_model.get_submodule(n)) for n, _ in layers]
            float_rows, complete = _float_inputs(
                float_model, images, float_layers, set(originals), GPTQ_FLOAT_ROWS_BYTES
            )
    missing = [n for n, _ in layers if n not in originals]
    if missing:
        raise CalibrationError(
            f"GPTQ: {len(missing)} quantized layers received no calibration input (e.g. {missing[0]})"
        )
    return originals
