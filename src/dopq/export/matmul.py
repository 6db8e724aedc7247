"""Deploy attention products: ``q @ k^T`` and ``attn @ v`` on quantized operands, and the post-Softmax
codes (``SoftmaxLevels``) counted against the quantizer's own decision points or read from its
cell table, without transcendental ops.
"""

from __future__ import annotations

import torch
from torch import nn

from dopq.export.qdq import ActivationQDQ, optional_qdq, symmetric_target
from dopq.export.symbolic import (
    counted_levels,
    indexed_levels,
    int8_shift,
    integer_matmul,
    log_levels,
    qdq,
    quantize_codes,
    tan_levels,
    threshold_levels,
)
from dopq.modules import (
    QuantMatMul,
)
from dopq.quantizers import LevelQuantizer, LogQuantizer, TanQQuantizer
from dopq.quantizers.levels import snapped_in

__all__ = [
    "COUNTED_LEVELS_MAX_BITS",
    "EXACT_LEVELS_MAX_BITS",
    "OPENVINO_COUNTED_MAX_BITS",
    "DeployMatMul",
    "SoftmaxLevels",
]


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
        threshold in float64 (``Greater -> Where`` per threshold, the thresholds ascending): no
        rounding decides a level, so it is the simulation's. A ``Where`` takes the level itself: the
        former ``Cast -> Mul -> Add`` per threshold had onnxruntime hold about 16 float64 copies of
        the attention map at once (4 GiB per image for a DINOv2-L at 518 px, against 1 GiB for the
        float64 simulation)."""
        levels, thresholds = self.table
        out = torch.full_like(x, levels[0])
        for threshold, level in zip(thresholds, levels[1:], strict=True):
            out = torch.where(x > threshold, torch.tensor(level, dtype=x.dtype), out)
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
        self.symmetric = symmetric_target(target, dtype)
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
            self.qdq_a = optional_qdq(qa, f"{where} (left operand)")
        self.qdq_b = optional_qdq(layer.quantizer_b, f"{where} (right operand)")
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
