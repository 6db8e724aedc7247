"""Per-tensor activation Q/DQ of the deploy form: the uint8 codes of an activation quantizer, read
through its own API (``codes``, ``dequantize``), as the exported graph computes them.
"""

from __future__ import annotations

import torch
from torch import nn

from dopq.errors import ExportError
from dopq.export.symbolic import (
    int8_shift,
    qdq,
    quantize_codes,
    symmetric_qdq,
)
from dopq.quantizers import Quantizer, UniformQuantizer

__all__ = [
    "ActivationQDQ",
    "optional_qdq",
    "symmetric_target",
]


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


def symmetric_target(target: str, dtype: torch.dtype) -> bool:
    """Operands without zero points: OpenVINO's float32 form (the float64 form has its own products)."""
    return target == "openvino" and dtype == torch.float32


def optional_qdq(q: nn.Module, where: str) -> nn.Module:
    if isinstance(q, Quantizer) and q.enabled:
        return ActivationQDQ(q, where)
    return nn.Identity()
