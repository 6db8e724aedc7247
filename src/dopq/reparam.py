"""Post-LayerNorm scale re-parameterization (RepQ-ViT) with pluggable target-scale rules (MOSF).

A Linear fed by a LayerNorm first gets a per-channel input quantizer ``(d_c, z_c)``. With a
layer-wise target ``(d*, z*)``, ``r_c = d_c / d*`` and ``b_c = d* (z* - z_c)``; folding
``gamma_c /= r_c``, ``beta_c = beta_c / r_c - b_c`` and ``W[:, c] *= r_c`` keeps the float function
once the shift ``b`` is given back, while one per-tensor quantizer ``(d*, z*)`` now gives every
channel the grid it had channel-wise (exactly so when ``z*`` is an integer). The shift goes back
either into the bias with the float weights (``bias += W b``, RepQ-ViT; the quantized layer then
misses ``(Q(W) - W) b``) or as the Linear's ``input_offset``, multiplied by the quantized weights
(exact: per-channel integer zero points). The rule that picks ``d*`` is what DopQ-ViT's MOSF changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dopq.config import LN_SHIFTS
from dopq.errors import ConfigError
from dopq.models.prepare import QuantPlan
from dopq.modules import QuantLinear, float_logits
from dopq.quantizers import PerTensor, UniformQuantizer, fake_quantize_uniform

__all__ = [
    "TARGET_RULES",
    "ReparamReport",
    "check_float_change",
    "fold_factors",
    "fold_layernorm",
    "reparameterize",
    "target_scale",
]

TargetRule = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
MAD_THRESHOLD = 3.0  # inliers: |d_c - median| <= 3 * 1.4826 * MAD (a normal-consistent 3 sigma)


def _mean(d: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return d.mean(), z.mean()


def _median(d: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the channel whose scale is the median, so (d*, z*) is a range one channel really has
    idx = d.argsort()[(d.numel() - 1) // 2]
    return d[idx], z[idx]


def _mad(d: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    med = d.median()
    mad = (d - med).abs().median()
    inlier = (d - med).abs() <= MAD_THRESHOLD * 1.4826 * mad.clamp_min(1e-12)
    return d[inlier].mean(), z[inlier].mean()


TARGET_RULES: dict[str, TargetRule] = {"mean": _mean, "median": _median, "mad": _mad}


def target_scale(rule: str, d: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-wise ``(d*, z*)`` from per-channel scales and zero points by a closed-form rule."""
    if rule not in TARGET_RULES:
        raise ConfigError(f"unknown ln_scale rule {rule!r}; choose from {sorted(TARGET_RULES)} or 'search'")
    return TARGET_RULES[rule](d, z)


def fold_factors(
    d: torch.Tensor, z: torch.Tensor, d_t: torch.Tensor, z_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The re-parameterization's per-channel factors in float64: ``r = d / d*`` divides the LayerNorm
    output and multiplies the weight column, ``b = d* (z* - z)`` is the shift put back after it."""
    d_t64 = d_t.double()
    return d.double() / d_t64, d_t64 * (z_t.double() - z.double())


def fold_layernorm(
    norm: nn.LayerNorm,
    linears: list[nn.Linear],
    d: torch.Tensor,
    z: torch.Tensor,
    d_t: torch.Tensor,
    z_t: torch.Tensor,
    shift: str = "bias",
) -> None:
    """Fold the channel-wise -> layer-wise change into ``norm`` and ``linears`` (in float64).

    ``shift`` says where the per-channel shift ``b`` goes back: ``"bias"`` (``bias += W b``) or
    ``"input"`` (each Linear's ``input_offset``; the Linears must be :class:`QuantLinear`).
    """
    if shift not in LN_SHIFTS:
        raise ConfigError(f"ln_shift must be one of {', '.join(LN_SHIFTS)}; got {shift!r}")
    if shift == "input" and not all(isinstance(lin, QuantLinear) for lin in linears):
        raise ConfigError("ln_shift 'input' needs QuantLinear layers (an input_offset slot)")
    r, b = fold_factors(d, z, d_t, z_t)
    with torch.no_grad():
        norm.weight.copy_(norm.weight.double() / r)
        norm.bias.copy_(norm.bias.double() / r - b)
        for lin in linears:
            w = lin.weight.double() * r
            lin.weight.copy_(w)
            if shift == "input":
                lin.input_offset = b.to(lin.weight.dtype)
                continue
            shift_out = w @ b
            if lin.bias is None:
                lin.bias = nn.Parameter(shift_out.to(lin.weight.dtype))
            else:
                lin.bias.copy_(lin.bias.double() + shift_out)


def _search_target(
    lin: QuantLinear, x: torch.Tensor, d: torch.Tensor, z: torch.Tensor, integer_zp: bool, shift: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """MOSF v1: the candidate target with the smallest output error of the re-parameterized,
    quantized layer on captured inputs ``x`` (float LayerNorm outputs)."""
    wq: UniformQuantizer = lin.weight_quantizer
    w = lin.weight.detach().double()
    y_ref = x.double() @ w.T
    candidates = [target_scale(rule, d, z) for rule in TARGET_RULES]
    order = d.argsort()
    for q in (0.1, 0.25, 0.75, 0.9):
        i = order[int(q * (d.numel() - 1))]
        candidates.append((d[i], z[i]))
    best, best_err = candidates[0], float("inf")
    for d_t, z_t in candidates:
        z_t = z_t.round() if integer_zp else z_t
        r, b = fold_factors(d, z, d_t, z_t)  # the fold this candidate would apply
        x_t = fake_quantize_uniform(x.double() / r - b, d_t.double(), z_t.double(), lin.input_quantizer.bits)
        w_t = w * r
        s, zp = wq.searched_qparams(w_t)  # per output channel, as the quantizer searches
        w_hat = fake_quantize_uniform(w_t, s.double()[:, None], zp.double()[:, None], wq.bits)
        y = (x_t + b) @ w_hat.T if shift == "input" else x_t @ w_hat.T + w_t @ b
        err = float((y - y_ref).pow(2).mean())
        if err < best_err:
            best, best_err = (d_t, z_t), err
    return best


@dataclass
class ReparamReport:
    """What the re-parameterization did: target scales per LayerNorm and the float check."""

    targets: dict[str, tuple[float, float]] = field(default_factory=dict)
    max_logit_change: float = 0.0


@torch.no_grad()
def reparameterize(
    model: nn.Module,
    plan: QuantPlan,
    rule: str = "mean",
    integer_zero_point: bool = False,
    shift: str = "bias",
    check_images: torch.Tensor | None = None,
    captured: dict[str, torch.Tensor] | None = None,
    tolerance: float = 1e-3,
) -> ReparamReport:
    """Re-parameterize every LayerNorm -> Linear pair, then re-calibrate those weight quantizers.

    Args:
        model: a calibrated model prepared with ``plan``.
        plan: from :func:`dopq.models.prepare_model`.
        rule: ``mean``, ``median``, ``mad`` or ``search`` (needs ``captured`` inputs).
        integer_zero_point: round ``z*`` to an integer code of the grid (clamped into it).
        shift: where the per-channel shift goes, ``"bias"`` or ``"input"`` (:func:`fold_layernorm`).
        check_images: images on which the float logits must not change (relative ``tolerance``).
        captured: per-Linear input rows for the ``search`` rule.

    Returns:
        A report with the chosen targets and the measured float logit change.

    Raises:
        RuntimeError: if the float function changed beyond ``tolerance``.
    """
    before = float_logits(model, check_images) if check_images is not None else None
    report = ReparamReport()
    for pair in plan.pairs:
        norm = model.get_submodule(pair.norm)
        linears: list[QuantLinear] = [model.get_submodule(n) for n in pair.linears]
        iq: UniformQuantizer = linears[0].input_quantizer
        d, z = iq.scale.detach().clone(), iq.zero_point.detach().clone()
        if rule == "search":
            if captured is None or pair.linears[0] not in captured:
                raise ConfigError("ln_scale 'search' needs captured layer inputs from calibration")
            d_t, z_t = _search_target(linears[0], captured[pair.linears[0]], d, z, integer_zero_point, shift)
        else:
            d_t, z_t = target_scale(rule, d, z)
        if integer_zero_point:
            # a code of the grid: per-channel ranges need not hold 0 (a channel of one sign), and an
            # integer kernel takes only a zero point in [0, 2^b - 1]; with the input shift the fold
            # is exact whatever integer z* is
            z_t = z_t.round().clamp(*iq.code_range)
        fold_layernorm(norm, linears, d, z, d_t, z_t, shift)
        for lin in linears:
            lin.input_quantizer.set_qparams(d_t.reshape(1), z_t.reshape(1), PerTensor())
            lin.weight_quantizer.initialize(lin.weight.detach(), None)
        report.targets[pair.norm] = (float(d_t), float(z_t))
    if before is not None:
        report.max_logit_change = check_float_change(
            before,
            float_logits(model, check_images),
            tolerance,
            "re-parameterization",
            (
                "a LayerNorm output is read by something other than its paired Linear layers, or reaches "
                "them through an operation that does not commute with a per-channel scale and shift"
            ),
        )
    return report


def check_float_change(
    before: torch.Tensor, after: torch.Tensor, tolerance: float, what: str, likely_cause: str
) -> float:
    """The largest change of the float logits a function-preserving rewrite (``what``) made; raises
    RuntimeError, naming ``likely_cause``, beyond ``tolerance`` relative to the largest logit."""
    change = float((after - before).abs().max())
    limit = tolerance * max(1.0, float(before.abs().max()))
    if change > limit:
        raise RuntimeError(f"{what} changed the float logits by {change:.3g} (> {limit:.3g}); {likely_cause}")
    return change
