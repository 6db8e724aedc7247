"""AdaRound: learned rounding of weights onto a fixed uniform grid (for block reconstruction).

``w_soft = (clamp(floor(w / s) + h(alpha) + z, 0, 2^b - 1) - z) * s`` with the rectified sigmoid
``h(alpha) = clamp(sigmoid(alpha) * 1.2 - 0.1, 0, 1)``; ``alpha`` starts where ``h`` equals the
fractional part of ``w / s`` (so the soft weights start at the float weights), and a regularizer
pushes ``h`` to 0 or 1. After optimisation the hard choice ``alpha >= 0`` is baked into the weight.
With ``straight_through`` the forward pass uses the hard choice from the start and the gradient
flows through ``h(alpha)`` (no soft/hard gap, no regularizer needed): better on short schedules.
Optionally the per-channel step ``s`` is learned too, as ``s0 * exp(g)`` (a relative change, so one
learning rate fits channels of any size); the integer codes keep their meaning.
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
        base: the calibrated weight quantizer (its zero point is kept; its scale too unless
            ``learn_scale``).
        weight: the float weight it quantizes.
        learn_scale: also learn the per-channel step size (log-gain ``g``, starting at 0).
        straight_through: hard rounding in the forward pass, ``h(alpha)``'s gradient in the backward.
    """

    def __init__(
        self,
        base: UniformQuantizer,
        weight: torch.Tensor,
        learn_scale: bool = False,
        straight_through: bool = False,
    ) -> None:
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
        self.log_gain = nn.Parameter(torch.zeros_like(self.scale), requires_grad=learn_scale)
        self.hard = False
        self.straight_through = straight_through

    def rounding(self) -> torch.Tensor:
        """0/1 (or soft) offsets from the floor of ``w / s``."""
        up = (self.alpha >= 0).float()
        if self.hard:
            return up
        soft = rectified_sigmoid(self.alpha)
        return up + (soft - soft.detach()) if self.straight_through else soft

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(self.floor + self.rounding() + self.zero_point, 0, 2**self.base.bits - 1)
        return (q - self.zero_point) * self.step()

    def step(self) -> torch.Tensor:
        """The (possibly learned) per-channel step size, broadcastable to the weight."""
        return self.scale * self.log_gain.exp() if self.log_gain.requires_grad else self.scale

    def regularizer(self, beta: float) -> torch.Tensor:
        """Pushes each ``h`` to 0 or 1; larger ``beta`` tolerates values near 0.5 more."""
        h = rectified_sigmoid(self.alpha)
        return (1 - (2 * h - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def bake(self) -> torch.Tensor:
        """The hard-rounded weight, a point of the base quantizer's grid.

        A learned step size is written into the base quantizer first, so the base quantizer
        maps the returned weight onto itself.
        """
        self.hard = True
        if self.log_gain.requires_grad:
            self.base.set_qparams(self.step().reshape(-1), self.base.zero_point)
            self.scale = _broadcast(self.base.scale, self.floor, self.base.channel_axis).detach()
            self.log_gain.zero_()
        return self.forward(torch.empty(0))
