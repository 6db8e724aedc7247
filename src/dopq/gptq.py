"""GPTQ-style weight rounding at calibration time (Frantar et al., 2023, "OPTQ").

Each quantized Linear / Conv2d keeps its calibrated per-output-channel grid (scale, zero point);
only the choice of grid point changes. Columns (input channels) are rounded one after another and
the rounding error of each is spread over the columns not yet rounded, weighted by the inverse
Hessian ``H = X^T X`` of the layer's calibration inputs, which minimises ``||X (W - W_q)^T||^2``
to second order. Blocks of columns are updated lazily (one matrix product per block), from the
upper Cholesky factor of ``H^-1``; damping adds a fraction of the mean diagonal to ``H``.

In a model (:func:`gptq_model`) the layers are rounded in forward order during one pass over the
calibration images: a pre-hook rounds a layer from the inputs it receives in the quantized model,
so every layer sees what the already-rounded layers before it produce. ``X`` is the input the
layer's weights really multiply: after its input quantizer (plus the post-LayerNorm input offset),
so the error being minimised is the one the quantized layer makes (docs/gptq.md). The rounded
weights are points of the grid, so ``weight_quantizer(weight)`` returns them unchanged and the
saved codes and the export are the GPTQ codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dopq.errors import CalibrationError
from dopq.modules import QuantConv2d, QuantLinear
from dopq.quantizers import UniformQuantizer

__all__ = ["GPTQ_BLOCK", "gptq_model", "gptq_round", "input_hessian", "layer_inputs"]

GPTQ_BLOCK = 128  # columns per lazy batch update (the reference implementation's default)
_DAMP_RETRIES = 4  # each retry multiplies the damping by 10 before giving up


def input_hessian(rows: torch.Tensor) -> torch.Tensor:
    """``X^T X / n`` (float64) of input rows ``(n, in_features)``.

    Raises:
        CalibrationError: no rows.
    """
    if rows.shape[0] == 0:
        raise CalibrationError("GPTQ needs calibration inputs, but the layer received none")
    x = rows.float()
    return (x.T @ x).double() / rows.shape[0]


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``; the damping grows tenfold
    while ``H`` is not positive definite (a rank-deficient Hessian from few or collinear inputs)."""
    mean_diag = float(hessian.diagonal().mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(_DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(hessian + eye * (damp * 10**attempt * mean_diag))
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise CalibrationError(
        f"GPTQ: the input Hessian is not positive definite even with damping {damp * 10**_DAMP_RETRIES:g}; "
        "the calibration inputs are degenerate (NaN/Inf or all equal)"
    )


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
        hessian: ``(in, in)`` ``X^T X`` of the layer's inputs (any positive scale).
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
    if weight.ndim != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"GPTQ needs a 2-D weight and its square Hessian, got {weight.shape}, {hessian.shape}"
        )
    if not bool(torch.isfinite(hessian).all()):
        raise CalibrationError("GPTQ: the layer's input Hessian has NaN/Inf values")
    h = hessian.double().clone()
    # an input channel that was always 0 carries no error information: round it to nearest
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else None
    if order is not None:
        h = h[order][:, order]
    # the factor in float64 (a near-singular H), the column sweep in float32 as the reference code
    hinv = _inverse_cholesky(h, damp).float()
    w = weight.detach().float().clone()
    w = w[:, order] if order is not None else w
    # per output channel (a per-tensor grid broadcasts): vectors of length out
    scale = quantizer.scale.detach().float().reshape(-1).expand(w.shape[0])
    zero_point = quantizer.zero_point.detach().float().reshape(-1).expand(w.shape[0])
    lo, hi = quantizer.code_range
    codes = torch.empty_like(w)
    n = w.shape[1]
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        block, hblock = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        errors = torch.empty_like(block)
        diagonal = hblock.diagonal().tolist()  # Python floats: fewer tiny tensor ops per column
        for i in range(i2 - i1):
            col = block[:, i]
            q = torch.round(col / scale).add_(zero_point).clamp_(lo, hi)
            codes[:, i1 + i] = q
            err = errors[:, i]
            torch.sub(col, (q - zero_point).mul_(scale), out=err).div_(diagonal[i])
            block[:, i:].addr_(err, hblock[i, i:], alpha=-1)
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
    if order is not None:
        codes = codes[:, torch.argsort(order)]
    return codes.long()


def layer_inputs(module: QuantLinear | QuantConv2d, x: torch.Tensor, quantized: bool = True) -> torch.Tensor:
    """The rows ``(n, fan_in)`` that the layer's weights multiply, for input ``x``.

    With ``quantized`` the input passes through the layer's input quantizer first (what the
    quantized layer computes with); the post-LayerNorm input offset is added either way.
    """
    if quantized:
        x = module.input_quantizer(x)
    if isinstance(module, QuantConv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise CalibrationError("GPTQ supports ungrouped, zero-padded Conv2d layers only")
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if module.input_offset is not None:
        x = x + module.input_offset
    return x.reshape(-1, x.shape[-1])


def _gptq_layers(model: nn.Module) -> list[tuple[str, QuantLinear | QuantConv2d]]:
    """Layers with an enabled uniform weight quantizer (the ones whose codes GPTQ chooses)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (QuantLinear, QuantConv2d))
        and isinstance(m.weight_quantizer, UniformQuantizer)
        and m.weight_quantizer.enabled
    ]


@torch.no_grad()
def gptq_model(
    model: nn.Module,
    images: torch.Tensor,
    damp: float = 0.1,
    act_order: bool = False,
    quantized_inputs: bool = True,
) -> dict[str, torch.Tensor]:
    """Round the weights of every quantized Linear / Conv2d with GPTQ, in forward order, in place.

    Args:
        model: a calibrated (and re-parameterized) model.
        images: the calibration batch on the model's device.
        damp: GPTQ damping (fraction of the mean Hessian diagonal).
        act_order: round columns in order of decreasing Hessian diagonal.
        quantized_inputs: build each Hessian from the layer's quantized inputs (see
            :func:`layer_inputs`) rather than from its float inputs.

    Returns:
        Each rounded layer's float weight before rounding (for bias correction's reference).

    Raises:
        CalibrationError: a quantized layer received no input in the pass, or its Hessian is degenerate.
    """
    originals: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module: QuantLinear | QuantConv2d, args: tuple) -> None:
            if name in originals:  # a layer called twice in one forward is rounded once
                return
            rows = layer_inputs(module, args[0], quantized_inputs)
            weight = module.weight.detach()
            q: UniformQuantizer = module.weight_quantizer
            try:
                w2d = weight.reshape(weight.shape[0], -1)
                codes = gptq_round(w2d, input_hessian(rows), q, damp, act_order)
            except CalibrationError as exc:
                raise CalibrationError(f"{name}: {exc}") from None
            originals[name] = weight.clone()
            module.weight.copy_(q.dequantize(codes).reshape(weight.shape).to(weight.dtype))
            if not torch.equal(q.codes(module.weight), codes.reshape(weight.shape)):
                raise RuntimeError(f"{name}: GPTQ weights do not map onto their own codes")

        return hook

    layers = _gptq_layers(model)
    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers]
    try:
        model.eval()
        model(images)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, _ in layers if n not in originals]
    if missing:
        raise CalibrationError(
            f"GPTQ: {len(missing)} quantized layers received no calibration input (e.g. {missing[0]})"
        )
    return originals
