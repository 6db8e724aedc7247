"""AdaRound: learned rounding of weights onto a fixed uniform grid (for block reconstruction).

``w_soft = (clamp(floor(w / s) + h(alpha) + z, 0, 2^b - 1) - z) * s`` with the rectified sigmoid
``h(alpha) = clamp(sigmoid(alpha) * 1.2 - 0.1, 0, 1)``; ``alpha`` starts where ``h`` equals the
fractional part of ``w / s`` (so the soft weights start at the float weights), and a regularizer
pushes ``h`` to 0 or 1. After optimisation the hard choice ``alpha >= 0`` is baked into the weight.
"""

from __future__ import annotations

import torch
from torch import nn

from dopq.quantizers.uniform import UniformQuantizer, _broadcast

__all__ = ["AdaRoundQuantizer", "rectified_sigmoid"]

_ZETA, _GAMMA = 1.1, -0.1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(alpha) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)


class AdaRoundQuantizer(nn.Module):
    """Learned-rounding view of a calibrated per-channel :class:`UniformQuantizer`.

    Args:
        base: the calibrated weight quantizer (its scale and zero point are kept).
        weight: the float weight it quantizes.
    """

    def __init__(self, base: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        axis = base.channel_axis
        self.scale = _broadcast(base.scale, weight, axis).detach()
        self.zero_point = _broadcast(base.zero_point, weight, axis).detach()
        scaled = weight.detach() / self.scale
        self.register_buffer("floor", scaled.floor())
        frac = (scaled - self.floor).clamp(0.01, 0.99)
        # inverse of the rectified sigmoid at the fractional part
        self.alpha = nn.Parameter(-torch.log((_ZETA - _GAMMA) / (frac - _GAMMA) - 1))
        self.hard = False

    def rounding(self) -> torch.Tensor:
        return (self.alpha >= 0).float() if self.hard else rectified_sigmoid(self.alpha)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(self.floor + self.rounding() + self.zero_point, 0, 2**self.base.bits - 1)
        return (q - self.zero_point) * self.scale

    def regularizer(self, beta: float) -> torch.Tensor:
        """Pushes each ``h`` to 0 or 1; larger ``beta`` tolerates values near 0.5 more."""
        h = rectified_sigmoid(self.alpha)
        return (1 - (2 * h - 1).abs().pow(beta)).sum()

    def baked_weight(self) -> torch.Tensor:
        """The hard-rounded weight, a point of the base quantizer's grid."""
        self.hard = True
        with torch.no_grad():
            return self.forward(torch.empty(0))
